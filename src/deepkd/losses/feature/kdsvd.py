"""``kdsvd``: KD-SVD (Lee et al., Self-supervised Knowledge Distillation Using Singular Value
Decomposition, ECCV 2018), mdistiller's ``KDSVD``.

Each paired stage ``[B, C, H, W]`` is viewed as a ``[B, CH, W]`` matrix and decomposed (SVD). The
teacher keeps its first ``k`` right singular vectors ``v_t`` ``[B, W, k]`` and singular values
(``s_t``, unit L2 norm over the ``k``); the student its first ``k + 3`` vectors, of which each teacher
vector takes the student vector of largest ``|cosine|`` with it, sign-flipped to agree (``v_s``
``[B, W, k]``). Both are scaled by the teacher's ``s_t``. Between consecutive stages ``i - 1, i`` the
Gaussian kernel ``R(v, v') = exp(-(v_a - v'_b)^2 / 8)`` (``[B, W_i, W_{i-1}, k]``, per singular vector)
is matched: ``feat_weight * sum_i sum (R(v_s^i, v_s^{i-1}) - R(v_t^i, v_t^{i-1}))^2 / B``, non-finite
entries dropped. Defaults: mdistiller's CIFAR-100 (every stage after the stem, ``k = 1``, weights 1 and 1).

NOTE(paper): the authors' TensorFlow code reshapes an NHWC feature to ``[B, HW, C]``, so its singular
vectors span the channels; mdistiller's port views the NCHW tensor as ``[B, CH, W]``, so they span the
image width, and paired stages must be equally wide (their channels may differ). deepkd follows
mdistiller. The authors' code also replaces the SVD's gradient with its own; mdistiller (and deepkd)
backpropagate through ``torch.linalg.svd`` as it is.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from deepkd.errors import ConfigError
from deepkd.features import FeatureInfo, Features
from deepkd.losses.base import LossTerm, Method
from deepkd.losses.feature.at import stage_pairs
from deepkd.losses.registry import register_method


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def leading_singular(feature: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s, v)``: the ``n`` largest singular values ``[B, n]`` (unit L2 norm together) and their right
    singular vectors ``[B, W, n]`` (each of unit norm) of ``feature`` ``[B, C, H, W]`` viewed as ``[B, CH, W]``,
    decomposed in at least float32 (mdistiller: always float32); non-finite entries become 0."""
    batch, channels, height, width = feature.shape
    matrix = feature.reshape(batch, channels * height, width)
    matrix = matrix.to(torch.promote_types(matrix.dtype, torch.float32))
    _, values, vectors_h = torch.linalg.svd(matrix, full_matrices=False)
    values, vectors = _finite(values), _finite(vectors_h.transpose(1, 2))
    return F.normalize(values[:, :n], dim=1), F.normalize(vectors[:, :, :n], dim=1)


def align(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """``[B, W, n_t]``: for each teacher vector, the student vector (of ``v_s`` ``[B, W, n_s]``) of largest
    ``|cosine|`` with it, times the cosine's sign (a tie sums the tied vectors, as mdistiller's mask does).
    The selection carries no gradient."""
    cosine = (v_s.transpose(1, 2) @ v_t).detach()
    best = cosine.abs().amax(1, keepdim=True)
    return v_s @ torch.where(cosine.abs() == best, cosine.sign(), torch.zeros_like(cosine))


def kernel(v: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``[B, W_i, W_{i-1}, k]``: ``exp(-(v[b, a, m] - previous[b, c, m])^2 / 8)``."""
    return torch.exp(-(v.unsqueeze(2) - previous.unsqueeze(1)).pow(2) / 8)


def svd_loss(student: List[torch.Tensor], teacher: List[torch.Tensor], k: int) -> torch.Tensor:
    """``sum_i sum (R_s^i - R_t^i)^2 / B`` over consecutive pairs of the given stages."""
    loss, previous, batch = 0, None, student[0].shape[0]
    for f_s, f_t in zip(student, teacher):
        s_t, v_t = leading_singular(f_t, k)
        _, v_s = leading_singular(f_s, k + 3)
        v_s = align(v_s, v_t)
        v_s, v_t = v_s * s_t.unsqueeze(1), v_t * s_t.unsqueeze(1)
        if previous is not None:
            gap = (kernel(v_s, previous[0]) - kernel(v_t, previous[1]).detach()).pow(2)
            loss = loss + _finite(gap).sum() / batch
        previous = (v_s, v_t)
    return loss


def _check(student_info: FeatureInfo, teacher_info: FeatureInfo, pairs: List[Tuple[int, int]], k: int) -> None:
    if k < 1:
        raise ConfigError(f"kdsvd: k (the teacher's number of singular vectors) must be at least 1, got {k}")
    if len(pairs) < 2:
        raise ConfigError("kdsvd matches consecutive stages, so method.stages needs at least two")
    for i, j in pairs:
        if student_info.sizes[i][1] != teacher_info.sizes[j][1]:
            raise ConfigError(f"kdsvd: student stage {i} is {student_info.sizes[i][1]} wide and teacher stage {j} "
                              f"{teacher_info.sizes[j][1]}, but KD-SVD compares singular vectors over the width: "
                              "pair equally wide stages in method.stages")


@register_method("kdsvd", paper="Lee et al., Self-supervised Knowledge Distillation Using Singular Value "
                                "Decomposition, ECCV 2018")
class KDSVD(Method):
    """``ce_weight CE + feat_weight sum_i sum (R_s^i - R_t^i)^2 / B`` (Gaussian kernels between the aligned
    leading right singular vectors of consecutive stages); terms ``ce`` (task) and ``kdsvd`` (target).
    ``stages``: which stages to pair, in order (``None``: all after the stem, mdistiller's ``feats[1:]``).
    No trainable parameters."""

    features = True

    def __init__(self, *, student_info: FeatureInfo, teacher_info: FeatureInfo, k: int = 1,
                 stages: Optional[List[int]] = None, ce_weight: float = 1.0, feat_weight: float = 1.0):
        super().__init__()
        self.k, self.ce_weight, self.feat_weight = k, ce_weight, feat_weight
        self.pairs = stage_pairs(student_info, teacher_info, stages, "kdsvd")
        _check(student_info, teacher_info, self.pairs, k)

    def forward(self, student: Features, teacher: Optional[Features], target: torch.Tensor, *,
                epoch: int) -> Dict[str, LossTerm]:
        ce = F.cross_entropy(student.logits, target)
        loss = svd_loss([student.stages[i] for i, _ in self.pairs],
                        [teacher.stages[j].detach() for _, j in self.pairs], self.k)
        return {"ce": LossTerm(self.ce_weight * ce, "task"), "kdsvd": LossTerm(self.feat_weight * loss, "target")}
