"""``at``: Attention Transfer (Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017),
mdistiller's ``AT``.

For each paired stage the spatial attention map of a feature ``f`` ``[B, C, H, W]`` is
``Q(f) = normalize(mean_c f_c^p)`` (flattened to ``[B, HW]``, unit L2 norm per sample) and the loss is
``feat_weight * sum_stages mean_{b,x} (Q(f_s) - Q(f_t))^2``. Where the two maps differ in size, the
larger is average-pooled (adaptively) to the smaller's. Defaults: mdistiller's CIFAR-100 (every stage
after the stem, ``p = 2``, weights 1 and 1000).

Also home of the stage pairing (:func:`stage_pairs`) and size reconciliation (:func:`common_size`)
that NST, SP and KDSVD share.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from deepkd.errors import ConfigError
from deepkd.features import FeatureInfo, Features
from deepkd.losses.base import LossTerm, Method
from deepkd.losses.registry import register_method


def _stage_index(info: FeatureInfo, stage: int, who: str, method: str) -> int:
    count = len(info.channels)
    if not -count <= stage < count:
        raise ConfigError(f"{method}: stage {stage} does not exist in the {who}, which has {count} feature stages "
                          "(0 is the stem)")
    return stage % count


def stage_pairs(student_info: FeatureInfo, teacher_info: FeatureInfo, stages: Optional[Sequence[int]],
                method: str) -> List[Tuple[int, int]]:
    """``(student stage, teacher stage)`` for each of ``stages`` (negative ones count from each model's
    end); ``None``: every stage after the stem (mdistiller's ``feats[1:]``), which needs the two models to
    have as many stages (mdistiller would silently drop the deeper model's extra stages)."""
    n_student, n_teacher = len(student_info.channels), len(teacher_info.channels)
    if stages is None:
        if n_student != n_teacher:
            raise ConfigError(f"{method}: the student has {n_student} feature stages and the teacher {n_teacher}, "
                              "so name the stages to pair in method.stages (0 is the stem)")
        stages = range(1, n_student)
    pairs = [(_stage_index(student_info, s, "student", method), _stage_index(teacher_info, s, "teacher", method))
             for s in stages]
    if not pairs:
        raise ConfigError(f"{method}: method.stages is empty, so there is nothing to distil")
    return pairs


def common_size(f_s: torch.Tensor, f_t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Average-pool (adaptively) whichever map is larger onto the other's spatial size, as mdistiller's
    AT and NST do. NOTE: mdistiller compares heights only and pools to a square ``(H, H)``; for square
    maps this is the same, for non-square ones deepkd pools to ``(min H, min W)``."""
    size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
    if tuple(f_s.shape[2:]) != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if tuple(f_t.shape[2:]) != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return f_s, f_t


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """``[B, HW]``: the channel mean of ``feature ** p``, unit L2 norm per sample.
    NOTE(paper): the paper sums ``|f_c|^p``; the mean differs by the factor C, which the normalization
    removes, and ``pow`` without ``abs`` equals it on ReLU outputs and for even ``p`` (mdistiller's form)."""
    return F.normalize(feature.pow(p).mean(1).flatten(1), dim=1)


def attention_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float) -> torch.Tensor:
    """One stage's ``mean (Q(f_s) - Q(f_t))^2`` after :func:`common_size`.
    NOTE(paper): the paper's term is ``beta/2 * ||Q_s - Q_t||_2`` (a norm, per sample); mdistiller (and the
    authors' code) takes the mean of the squared difference over the batch and the positions."""
    f_s, f_t = common_size(f_s, f_t)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@register_method("at", paper="Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017")
class AT(Method):
    """``ce_weight CE + feat_weight sum_stages mean (Q(f_s) - Q(f_t))^2`` with ``Q`` the normalized
    channel mean of ``f^p``; terms ``ce`` (task) and ``at`` (target). ``stages``: which stages to pair
    (``None``: all after the stem, mdistiller's ``feats[1:]``). No trainable parameters."""

    features = True

    def __init__(self, *, student_info: FeatureInfo, teacher_info: FeatureInfo, p: float = 2.0,
                 stages: Optional[List[int]] = None, ce_weight: float = 1.0, feat_weight: float = 1000.0):
        super().__init__()
        if not p > 0:
            raise ConfigError(f"at: p must be positive (the attention map is the mean of f ** p), got {p}")
        self.p, self.ce_weight, self.feat_weight = p, ce_weight, feat_weight
        self.pairs = stage_pairs(student_info, teacher_info, stages, "at")

    def forward(self, student: Features, teacher: Optional[Features], target: torch.Tensor, *,
                epoch: int) -> Dict[str, LossTerm]:
        ce = F.cross_entropy(student.logits, target)
        loss = sum(attention_loss(student.stages[i], teacher.stages[j].detach(), self.p) for i, j in self.pairs)
        return {"ce": LossTerm(self.ce_weight * ce, "task"), "at": LossTerm(self.feat_weight * loss, "target")}
