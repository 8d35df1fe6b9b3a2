"""``pkt``: Probabilistic Knowledge Transfer (Passalis & Tefas, Learning Deep Representations with
Probabilistic Knowledge Transfer, ECCV 2018), as mdistiller's ``PKT``.

Each model's pooled feature ``f`` (the classifier's input, ``[B, D]``) becomes a batch of conditional
probabilities over pairs: with ``u_i = f_i / (||f_i|| + eps)`` (a NaN set to 0), the cosine kernel
``k_ij = (u_i . u_j + 1) / 2`` is normalised per row, ``p_ij = k_ij / sum_l k_il``. The loss is the
teacher-to-student KL divergence averaged over the ``B x B`` entries,

    L_pkt = feat_weight * mean_ij  q_ij log((q_ij + eps) / (p_ij + eps))      (q: teacher, p: student)

NOTE(paper): the paper sums the KL over pairs of distinct samples (its probabilities leave the sample
itself out); mdistiller (as the authors' code) keeps the self-pairs, adds ``eps`` inside the log and
takes the mean over all ``B^2`` entries. We follow mdistiller.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from deepkd.errors import ConfigError
from deepkd.features import FeatureInfo, Features
from deepkd.losses.base import LossTerm, Method
from deepkd.losses.registry import register_method


def cosine_affinity(features: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-normalised cosine kernel ``[B, B]`` of ``features`` ``[B, D]`` (PKT's conditional probabilities)."""
    unit = features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    unit = unit.masked_fill(torch.isnan(unit), 0.0)
    kernel = (unit @ unit.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Mean over the ``B x B`` entries of ``q log((q + eps) / (p + eps))``: ``q`` the teacher's, ``p`` the
    student's :func:`cosine_affinity` (flattened features)."""
    p = cosine_affinity(student.flatten(1), eps)
    q = cosine_affinity(teacher.flatten(1), eps)
    return (q * torch.log((q + eps) / (p + eps))).mean()


def require_pooled(info: FeatureInfo, who: str, method: str) -> None:
    """A one-sentence ConfigError when a model exposes no pooled feature (the classifier's input)."""
    if info.pooled is None:
        raise ConfigError(f"{method} reads the {who}'s pooled feature (the classifier's input), which this model "
                          "does not expose: name it with FeatureExtractor's pooled= point or choose another method")


@register_method("pkt", paper="Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge "
                              "Transfer, ECCV 2018")
class PKT(Method):
    """``ce_weight CE + feat_weight pkt_loss(pooled_s, pooled_t)``; terms ``ce`` (task) and ``pkt``
    (target). Student and teacher may have different pooled widths (only ``B x B`` affinities are
    compared). No trainable modules. Defaults: mdistiller's CIFAR-100 (weights 1 and 30000, eps 1e-7)."""

    features = True

    def __init__(self, *, student_info: FeatureInfo, teacher_info: FeatureInfo, ce_weight: float = 1.0,
                 feat_weight: float = 30000.0, eps: float = 1e-7):
        super().__init__()
        require_pooled(student_info, "student", "pkt")
        require_pooled(teacher_info, "teacher", "pkt")
        if eps <= 0:
            raise ConfigError(f"pkt eps must be positive (it keeps the norms and the log finite), not {eps}")
        self.ce_weight, self.feat_weight, self.eps = ce_weight, feat_weight, eps

    def forward(self, student: Features, teacher: Optional[Features], target: torch.Tensor, *,
                epoch: int) -> Dict[str, LossTerm]:
        ce = F.cross_entropy(student.logits, target)
        loss = pkt_loss(student.pooled, teacher.pooled.detach(), self.eps)
        return {"ce": LossTerm(self.ce_weight * ce, "task"), "pkt": LossTerm(self.feat_weight * loss, "target")}
