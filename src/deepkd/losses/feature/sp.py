"""``sp``: Similarity-Preserving KD (Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019),
mdistiller's ``SP``.

A stage ``[B, C, H, W]`` flattened to ``Q`` ``[B, CHW]`` gives the batch's similarity matrix
``G = normalize_rows(Q Q^T)`` ``[B, B]`` (each row of unit L2 norm). The loss is
``feat_weight * sum_stages ||G_t - G_s||_F^2 / B^2``: it compares which samples a network finds alike,
so the two stages may differ in channels and size. Defaults: mdistiller's CIFAR-100 (the last stage of
each model only, weights 1 and 3000).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from deepkd.features import FeatureInfo, Features
from deepkd.losses.base import LossTerm, Method
from deepkd.losses.feature.at import stage_pairs
from deepkd.losses.registry import register_method


def similarity(feature: torch.Tensor) -> torch.Tensor:
    """``[B, B]``: the row-normalized Gram matrix of the batch's flattened features."""
    flat = feature.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def similarity_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """One stage pair's ``||G_t - G_s||_F^2 / B^2``."""
    batch = f_s.shape[0]
    return (similarity(f_t) - similarity(f_s)).pow(2).sum() / (batch * batch)


@register_method("sp", paper="Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019")
class SP(Method):
    """``ce_weight CE + feat_weight sum_stages ||G_t - G_s||_F^2 / B^2``; terms ``ce`` (task) and ``sp``
    (target). ``stages``: which stages to pair (``None``: each model's last stage, mdistiller's
    ``feats[-1]``; negative indices count from each model's end). No trainable parameters.
    NOTE(paper): the paper's loss sums over a set of layer pairs; mdistiller's default uses the last stage
    only, and so does deepkd's (``stages`` names others)."""

    features = True

    def __init__(self, *, student_info: FeatureInfo, teacher_info: FeatureInfo, stages: Optional[List[int]] = None,
                 ce_weight: float = 1.0, feat_weight: float = 3000.0):
        super().__init__()
        self.ce_weight, self.feat_weight = ce_weight, feat_weight
        self.pairs = stage_pairs(student_info, teacher_info, [-1] if stages is None else stages, "sp")

    def forward(self, student: Features, teacher: Optional[Features], target: torch.Tensor, *,
                epoch: int) -> Dict[str, LossTerm]:
        ce = F.cross_entropy(student.logits, target)
        loss = sum(similarity_loss(student.stages[i], teacher.stages[j].detach()) for i, j in self.pairs)
        return {"ce": LossTerm(self.ce_weight * ce, "task"), "sp": LossTerm(self.feat_weight * loss, "target")}
