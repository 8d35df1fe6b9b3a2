"""``rkd``: Relational Knowledge Distillation (Park et al., Relational Knowledge Distillation, CVPR 2019),
as mdistiller's ``RKD``: the student's pooled features (the classifier's input, ``[B, D]``) copy the
teacher's pairwise distances and triplet angles.

Distance: ``d_ij = ||f_i - f_j||`` (computed as ``sqrt(max(|f_i|^2 + |f_j|^2 - 2 f_i.f_j, eps))``, or its
square with ``squared``; ``d_ii = 0``), divided by its mean over the positive entries. Angle: with
``e_ij = (f_j - f_i) / ||f_j - f_i||`` (0 for ``j = i``), ``a_ijk = e_ij . e_ik``. With the Huber loss
``h`` (smooth L1, threshold 1) averaged over entries,

    L_rkd = feat_weight * (distance_weight * mean_ij h(d^s_ij - d^t_ij) + angle_weight * mean_ijk h(a^s_ijk - a^t_ijk))

NOTE(paper): the paper sums the Huber loss over distinct pairs and triplets (weights 1 and 2 for
distance and angle); mdistiller (as the authors' code) averages over all ``B^2`` pairs and ``B^3``
triplets, the degenerate ones (``i = j``, ``i = k``) included, which add zero to the sum but count in
the mean, with weights 25 and 50. We follow mdistiller.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from deepkd.errors import ConfigError
from deepkd.features import FeatureInfo, Features
from deepkd.losses.base import LossTerm, Method
from deepkd.losses.feature.pkt import require_pooled
from deepkd.losses.registry import register_method


def pairwise_distance(x: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    """``[B, B]`` Euclidean distances (squared with ``squared``) of the rows of ``x`` ``[B, D]``, by the
    Gram expansion clamped below at ``eps``; the diagonal is 0 (and passes no gradient)."""
    norms = x.pow(2).sum(dim=1)
    dist = (norms[:, None] + norms[None, :] - 2.0 * (x @ x.t())).clamp(min=eps)
    if not squared:
        dist = dist.sqrt()
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    return dist * off_diagonal


def normalised_distance(x: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    """:func:`pairwise_distance` divided by the mean of its positive entries."""
    dist = pairwise_distance(x, squared, eps)
    return dist / dist[dist > 0].mean()


def triplet_angles(x: torch.Tensor) -> torch.Tensor:
    """``[B, B, B]`` cosines ``a_ijk = e_ij . e_ik`` of the unit differences ``e_ij = (x_j - x_i) / ||.||``
    (``F.normalize``: a zero difference stays 0)."""
    unit = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)
    return unit @ unit.transpose(1, 2)


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, *, squared: bool = False, eps: float = 1e-12,
             distance_weight: float = 25.0, angle_weight: float = 50.0) -> torch.Tensor:
    """``distance_weight`` times the Huber loss of the normalised distances plus ``angle_weight`` times
    that of the triplet angles, each averaged over all entries; the teacher's side carries no gradient."""
    s, t = student.flatten(1), teacher.flatten(1).detach()
    with torch.no_grad():
        t_dist, t_angle = normalised_distance(t, squared, eps), triplet_angles(t)
    loss_d = F.smooth_l1_loss(normalised_distance(s, squared, eps), t_dist)
    loss_a = F.smooth_l1_loss(triplet_angles(s), t_angle)
    return distance_weight * loss_d + angle_weight * loss_a


@register_method("rkd", paper="Park et al., Relational Knowledge Distillation, CVPR 2019")
class RKD(Method):
    """``ce_weight CE + feat_weight rkd_loss(pooled_s, pooled_t)``; terms ``ce`` (task) and ``rkd``
    (target). Student and teacher may have different pooled widths. No trainable modules. Defaults:
    mdistiller's CIFAR-100 (distance 25, angle 50, feat 1, ``pdist_eps`` 1e-12, not squared). A batch
    needs two samples or more (one has no pair: the distance mean is NaN, as in mdistiller)."""

    features = True

    def __init__(self, *, student_info: FeatureInfo, teacher_info: FeatureInfo, ce_weight: float = 1.0,
                 feat_weight: float = 1.0, distance_weight: float = 25.0, angle_weight: float = 50.0,
                 pdist_eps: float = 1e-12, pdist_squared: bool = False):
        super().__init__()
        require_pooled(student_info, "student", "rkd")
        require_pooled(teacher_info, "teacher", "rkd")
        if pdist_eps <= 0 and not pdist_squared:
            raise ConfigError(f"rkd pdist_eps must be positive when pdist_squared is false (the square root of a "
                              f"zero distance has an infinite gradient), not {pdist_eps}")
        self.ce_weight, self.feat_weight = ce_weight, feat_weight
        self.distance_weight, self.angle_weight = distance_weight, angle_weight
        self.pdist_eps, self.pdist_squared = pdist_eps, pdist_squared

    def forward(self, student: Features, teacher: Optional[Features], target: torch.Tensor, *,
                epoch: int) -> Dict[str, LossTerm]:
        ce = F.cross_entropy(student.logits, target)
        loss = rkd_loss(student.pooled, teacher.pooled, squared=self.pdist_squared, eps=self.pdist_eps,
                        distance_weight=self.distance_weight, angle_weight=self.angle_weight)
        return {"ce": LossTerm(self.ce_weight * ce, "task"), "rkd": LossTerm(self.feat_weight * loss, "target")}
