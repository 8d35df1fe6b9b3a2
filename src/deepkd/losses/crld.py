"""``crld`` and ``deepkd_crld``: Consistency-Regularisation-based Logit Distillation (Zhang, Liu, Cai
and Ma, ACM MM 2024), plain and with DeepKD's three streams (spec: MLKD_CRLD.md sections 2 and 6).

Logits are ``[2, B, C]`` (0: weak view, 1: strong view), target ``[B]``: the trainer gives every
image two views and runs the student once per view (training accuracy: the weak view, index 0).
With ``kl_b(a, b) = T^2 KL(softmax(zt_b / T) || softmax(zs_a / T))`` per sample::

    ce    = ce_w (CE(zs_w, y) + CE(zs_s, y))                                  task
    kd_wv = WV mean_b[mask_w,b (kl_b(w, w) + kl_b(s, s))]                     target  (crld)
    kd_cv = CV mean_b[mask_s,b (kl_b(s, w) + kl_b(w, s))]                     target  (crld)
    tckd  = alpha w(e) [WV f_w (TC(w,w) + TC(s,s)) + CV f_s (TC(s,w) + TC(w,s))]   target      (deepkd_crld)
    nckd  = beta  w(e) [the same with NCKD]                                       non_target  (deepkd_crld)

``(a, b)`` = student view a against teacher view b; TC and NCKD are batch means (METHODS.md 2);
``w(e) = min(e / warmup_epochs, 1)`` (plain CRLD: no warm-up by default). The masks come from the
teacher at T = 1, without gradient: ``mask_w = max_c softmax(zt_w) >= weak_threshold`` and
``mask_s = max_c softmax(zt_s) >= strong_threshold`` (the max probability, not the target's, so a
confidently wrong teacher passes); ``f = mean(mask)``. The means run over all B samples, the
masked-out ones included (C2).

Reference quirks as options, default = reference (MLKD_CRLD.md 6.2):

- ``mask`` (C1): plain CRLD masks per sample (``"per_sample"``, as above); DeepKD's CRLD multiplies
  the batch-mean losses by the fractions ``f`` (``"fraction"``), which equals the per-sample form
  only when a mask is all True or all False. Either variant offers both.
- ``correlation_group_size`` (D4): None = the whole batch; k = the masks and fractions (and so the
  whole loss) per group of k consecutive samples, the groups' losses averaged, as the reference's
  ``DataParallel`` replicas of k samples compute DeepKD's fractions.

DeepKD's dynamic top-k mask (``topk*``, off by default; the reference passes TOPK, 0 in every
config) masks each NCKD pair by the ranking of the teacher view that pair distils from.

``logit_stand=True`` (Sun et al., CVPR 2024; ``deepkd.losses.common``): every KD pair (or TCKD and
NCKD, and the top-k mask's ranking) sees both logits z-scored per sample; CE and the confidence masks
(thresholds on the teacher's raw softmax) see the raw ones, as the logit-standardisation code's MLKD
keeps its masks (deepkd's choice: that code has no CRLD). No published recipe combines the two.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Tuple

import torch

from deepkd.losses import _core
from deepkd.losses import functional as F
from deepkd.losses import multiview as V
from deepkd.losses.base import LossTerm, Method, warmup_factor
from deepkd.losses.common import check_non_negative, check_positive, distillation_logits
from deepkd.losses.registry import DEEPKD_PAPER, register_method
from deepkd.losses.topk import TOPK_RAMP_END, TOPK_START_FRACTION

MASKS = ("fraction", "per_sample")


def crld_masks(teacher: torch.Tensor, weak_threshold: float,
               strong_threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """CRLD's ``(mask_w, mask_s)`` ``[B]`` from the teacher logits ``[2, B, C]`` (T = 1, no gradient):
    ``max_c softmax(zt_w) >= weak_threshold`` and ``max_c softmax(zt_s) >= strong_threshold``."""
    confidence = V.probabilities(teacher).amax(dim=-1)
    return confidence[V.WEAK] >= weak_threshold, confidence[V.STRONG] >= strong_threshold


def _check_options(temperature, warmup_epochs, mask, correlation_group_size) -> None:
    check_positive("temperature", temperature)
    check_non_negative("warmup_epochs", warmup_epochs)
    V.check_choice("mask", mask, MASKS)
    V.check_group_size(correlation_group_size)


def _pairs(method, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor):
    """``[(weight, student, target)]`` of the within-view and the cross-view pairs, both against
    ``teacher`` ``[2, B, C]``: the functional losses average the two pairs' rows, so ``weight``
    holds a factor 2 (the reference adds the two pairs)."""
    mask_w, mask_s = crld_masks(teacher, method.weak_threshold, method.strong_threshold)
    per_sample, dtype = method.mask == "per_sample", _core.compute_dtype(student)
    f_w, target_w = V.sample_weighting(mask_w, target, per_sample, dtype)
    f_s, target_s = V.sample_weighting(mask_s, target, per_sample, dtype)
    return [(2 * method.within_view_weight * f_w, student, target_w.expand(2, -1)),
            (2 * method.cross_view_weight * f_s, student.flip(0), target_s.expand(2, -1))]


def _ce_term(method, student: torch.Tensor, target: torch.Tensor) -> LossTerm:
    ce = 2 * F.cross_entropy(student, target.expand(2, -1), validate=False)  # mean of the views, x2
    return LossTerm(method.ce_weight * ce, "task")


@register_method("crld", paper="Zhang et al., Consistency-Regularisation-based Logit Distillation (CRLD), ACM MM 2024")
class CRLD(Method):
    """Plain CRLD (MLKD_CRLD.md 2.1). Terms ``ce`` (task), ``kd_wv`` and ``kd_cv`` (target).

    Defaults, the reference's CIFAR-100 values: ce_weight = 1 (ImageNet: 2), within_view_weight
    (WV) = 2, cross_view_weight (CV) = 0.5, temperature = 4 (ImageNet: 1), weak_threshold (tau_w) =
    0.9, strong_threshold (tau_s) = 0.2, warmup_epochs = 0, mask = "per_sample",
    correlation_group_size = None.
    """

    views = 2

    def __init__(self, *, ce_weight: float = 1.0, within_view_weight: float = 2.0,
                 cross_view_weight: float = 0.5, temperature: float = 4.0, weak_threshold: float = 0.9,
                 strong_threshold: float = 0.2, warmup_epochs: int = 0, mask: str = "per_sample",
                 correlation_group_size: Optional[int] = None, logit_stand: bool = False):
        super().__init__()
        _check_options(temperature, warmup_epochs, mask, correlation_group_size)
        self.ce_weight, self.within_view_weight = ce_weight, within_view_weight
        self.cross_view_weight = cross_view_weight
        self.temperature, self.weak_threshold, self.strong_threshold = temperature, weak_threshold, strong_threshold
        self.warmup_epochs, self.mask, self.correlation_group_size = warmup_epochs, mask, correlation_group_size
        self.logit_stand = logit_stand

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                target: torch.Tensor, *, epoch: int) -> Dict[str, LossTerm]:
        """Logits ``[2, B, C]``, target ``[B]`` -> ``{"ce", "kd_wv", "kd_cv"}`` scalar terms."""
        V.check_views("crld", student_logits, teacher_logits, target)
        loss = partial(self._group_loss, epoch=epoch)
        return V.grouped(loss, student_logits, teacher_logits, target, self.correlation_group_size)

    def _group_loss(self, student, teacher, target, *, epoch):
        scale = warmup_factor(epoch, self.warmup_epochs)
        terms = {"ce": _ce_term(self, student, target)}
        distilled, distilled_teacher = distillation_logits(self, student, teacher)
        pairs = _pairs(self, distilled, teacher, target)  # the masks read the raw teacher
        for name, (weight, pair_student, pair_target) in zip(("kd_wv", "kd_cv"), pairs):
            kd = F.kd(pair_student, distilled_teacher, temperature=self.temperature, target=pair_target,
                      validate=False)
            terms[name] = LossTerm(scale * weight * kd, "target")
        return terms


@register_method("deepkd_crld", base="crld", paper=DEEPKD_PAPER + " on CRLD")
class DeepKDCRLD(Method):
    """DeepKD on CRLD (MLKD_CRLD.md 2.2): terms ``ce`` (task), ``tckd`` (target), ``nckd`` (non_target);
    every pair's KD becomes ``alpha w(e) TCKD + beta w(e) NCKD``.

    Defaults, the reference's (``cfg.py``; recipes state their per-pair values): ce_weight = 1,
    within_view_weight = 2, cross_view_weight = 0.5, temperature = 4, weak_threshold = 0.9,
    strong_threshold = 0.2, alpha = 1, beta = 8, warmup_epochs = 20, mask = "fraction",
    correlation_group_size = None, the dynamic top-k mask off.
    """

    views = 2

    def __init__(self, *, ce_weight: float = 1.0, within_view_weight: float = 2.0,
                 cross_view_weight: float = 0.5, temperature: float = 4.0, weak_threshold: float = 0.9,
                 strong_threshold: float = 0.2, alpha: float = 1.0, beta: float = 8.0, warmup_epochs: int = 20,
                 mask: str = "fraction", correlation_group_size: Optional[int] = None, topk: bool = False,
                 topk_start_fraction: float = TOPK_START_FRACTION, topk_ramp_start: Optional[int] = None,
                 topk_ramp_end: Optional[int] = TOPK_RAMP_END, topk_count_target: bool = False,
                 logit_stand: bool = False):
        super().__init__()
        self.logit_stand = logit_stand
        _check_options(temperature, warmup_epochs, mask, correlation_group_size)
        self.ce_weight, self.within_view_weight = ce_weight, within_view_weight
        self.cross_view_weight = cross_view_weight
        self.temperature, self.weak_threshold, self.strong_threshold = temperature, weak_threshold, strong_threshold
        self.alpha, self.beta, self.warmup_epochs = alpha, beta, warmup_epochs
        self.mask, self.correlation_group_size = mask, correlation_group_size
        self.init_topk(topk=topk, topk_start_fraction=topk_start_fraction, topk_ramp_start=topk_ramp_start,
                       topk_ramp_end=topk_ramp_end, topk_count_target=topk_count_target,
                       warmup_epochs=warmup_epochs)

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                target: torch.Tensor, *, epoch: int) -> Dict[str, LossTerm]:
        """Logits ``[2, B, C]``, target ``[B]`` -> ``{"ce", "tckd", "nckd"}`` scalar terms."""
        V.check_views("deepkd_crld", student_logits, teacher_logits, target)
        loss = partial(self._group_loss, epoch=epoch)
        return V.grouped(loss, student_logits, teacher_logits, target, self.correlation_group_size)

    def _group_loss(self, student, teacher, target, *, epoch):
        # Each pair's NCKD is masked by its teacher view's ranking: both pair lists use `teacher`.
        distilled, distilled_teacher = distillation_logits(self, student, teacher)
        keep = self.dtm.keep(distilled_teacher, target.expand(2, -1), epoch, V.DROPPED)
        tckd = nckd = 0.0
        for weight, pair_student, pair_target in _pairs(self, distilled, teacher, target):  # masks: raw teacher
            terms = F.decoupled(pair_student, distilled_teacher, pair_target, temperature=self.temperature,
                                keep=keep, validate=False)
            tckd, nckd = tckd + weight * terms.tckd, nckd + weight * terms.nckd
        scale = warmup_factor(epoch, self.warmup_epochs)
        return {"ce": _ce_term(self, student, target), "tckd": LossTerm(scale * self.alpha * tckd, "target"),
                "nckd": LossTerm(scale * self.beta * nckd, "non_target")}
