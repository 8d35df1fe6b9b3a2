"""``nst``: Neuron Selectivity Transfer (Huang & Wang, Like What You Like: Knowledge Distill via Neuron
Selectivity Transfer, arXiv 2017), mdistiller's ``NST``.

Each channel of a stage ``[B, C, H, W]`` is a distribution over the ``HW`` positions: flattened and
L2-normalized, ``a_i`` (student, ``C_s`` of them) and ``b_j`` (teacher, ``C_t``). The loss is the squared
maximum mean discrepancy with the polynomial kernel ``k(x, y) = (x . y)^2`` (degree 2, ``c = 0``),
averaged over the batch:
``MMD^2 = mean_{j,j'} k(b_j, b_j') + mean_{i,i'} k(a_i, a_i') - 2 mean_{i,j} k(a_i, b_j)``
summed over the paired stages, times ``feat_weight``. Where the two maps differ in size, the larger is
average-pooled (adaptively) to the smaller's, as in AT. Defaults: mdistiller's CIFAR-100 (every stage
after the stem, weights 1 and 50).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from deepkd.features import FeatureInfo, Features
from deepkd.losses.base import LossTerm, Method
from deepkd.losses.feature.at import common_size, stage_pairs
from deepkd.losses.registry import register_method


def polynomial_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean_{n,i,j} (a_ni . b_nj)^2`` for ``a`` ``[B, C_a, D]`` and ``b`` ``[B, C_b, D]`` (one batched
    matmul: mdistiller broadcasts to ``[B, C_b, C_a, D]`` first, the same sums in another order)."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def selectivity_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """One stage's ``MMD^2`` of the channels' normalized spatial distributions (after :func:`common_size`);
    the teacher-teacher term is a constant (no gradient).
    NOTE(paper): the paper weights the MMD by ``lambda / 2``; mdistiller uses ``feat_weight`` (50) alone."""
    f_s, f_t = common_size(f_s, f_t)
    a = F.normalize(f_s.flatten(2), dim=2)
    b = F.normalize(f_t.flatten(2), dim=2)
    return polynomial_kernel_mean(b, b).detach() + polynomial_kernel_mean(a, a) - 2 * polynomial_kernel_mean(a, b)


@register_method("nst", paper="Huang & Wang, Like What You Like: Knowledge Distill via Neuron Selectivity "
                              "Transfer, arXiv 2017")
class NST(Method):
    """``ce_weight CE + feat_weight sum_stages MMD^2`` (polynomial kernel of degree 2) between the student's
    and the teacher's channel distributions; terms ``ce`` (task) and ``nst`` (target). ``stages``: which
    stages to pair (``None``: all after the stem, mdistiller's ``feats[1:]``). No trainable parameters."""

    features = True

    def __init__(self, *, student_info: FeatureInfo, teacher_info: FeatureInfo, stages: Optional[List[int]] = None,
                 ce_weight: float = 1.0, feat_weight: float = 50.0):
        super().__init__()
        self.ce_weight, self.feat_weight = ce_weight, feat_weight
        self.pairs = stage_pairs(student_info, teacher_info, stages, "nst")

    def forward(self, student: Features, teacher: Optional[Features], target: torch.Tensor, *,
                epoch: int) -> Dict[str, LossTerm]:
        ce = F.cross_entropy(student.logits, target)
        loss = sum(selectivity_loss(student.stages[i], teacher.stages[j].detach()) for i, j in self.pairs)
        return {"ce": LossTerm(self.ce_weight * ce, "task"), "nst": LossTerm(self.feat_weight * loss, "target")}
