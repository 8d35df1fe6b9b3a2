"""``mlkd`` and ``deepkd_mlkd``: Multi-Level Logit Distillation (Jin, Wang and Lin, CVPR 2023), plain
and with DeepKD's three streams (spec: MLKD_CRLD.md sections 1, 4.5 and 6).

Logits are ``[2, B, C]`` (0: weak view, 1: strong view), target ``[B]``: the trainer gives every
image two views and runs the student once per view. Training accuracy should be read from the
weak view (index 0), as the reference logs it. Five temperatures ``Ts = (T0, 3, 5, 2, 6)``: T0 is
``temperature``; the other four are hard-coded in the reference (on ImageNet too) and fixed here.
``KD``, ``CC`` and ``BC`` below are batch means / sums over the weak view (w) or strong view (s)::

    ce   = ce_w (CE(zs_w, y) + CE(zs_s, y))                                    task
    kd   = kd_w [f_s sum_Ts KD(w) + sum_{T0,3,5} KD(s) + sum_{2,6} KD(w)]      target  (mlkd)
    cc   = kd_w f_c sum_Ts CC(w)                                              task
    bc   = kd_w f_s sum_Ts BC(w)                                              task
    tckd = kd_w alpha w(e) sum_Ts [f_s TCKD(w) + TCKD(s)]                      target      (deepkd_mlkd)
    nckd = kd_w beta  w(e) sum_Ts [f_s NCKD(w) + NCKD(s)]                      non_target  (deepkd_mlkd)

with ``w(e) = min(e / warmup_epochs, 1)`` (plain MLKD: no warm-up by default). The masks come from
the teacher's weak-view softmax ``p`` at T = 1, without gradient: ``mask_s = max_c p <= median``
over the batch and ``mask_c = sum_b p <= median`` over the classes (the *less* confident half);
``f = mean(mask)``. The strong-view CC and BC the reference computes and discards are skipped (exact).

Reference quirks, each an option whose default is the reference (MLKD_CRLD.md 6.2):

- ``mask`` (M1): ``"fraction"``, the reference's ``(scalar * mask).mean()``, which scales each
  masked term by ``f`` (0.5 for distinct values and even B); ``"per_sample"``: ``mean_b(mask_b l_b)``
  for the instance terms, and for CC and BC our reading of the reference's ``reduce=False`` code:
  the mask scales the matrix's columns and the mean runs over all its entries.
- ``strong_t26`` (M2): the strong-view T = 2, 6 instance terms use the WEAK logits in plain MLKD
  (``"weak"``, its default) and the strong ones in DeepKD's MLKD (``"strong"``, its default).
- ``correlation_group_size`` (D4): None = the whole batch; k = the masks, f, CC and BC (and so the
  whole loss) per group of k consecutive samples, the groups' losses averaged, as the reference's
  ``DataParallel`` replicas of k samples compute them.

The median is ``torch.quantile`` on the device (M4, the reference: numpy on the CPU, same value).
DeepKD's dynamic top-k mask (``topk*``, off by default, deepkd's extension: the reference never
passes it to MLKD) masks every NCKD part by its own teacher view's ranking.

``logit_stand=True`` (Sun et al., CVPR 2024; ``deepkd.losses.common``): the instance-level terms (KD,
or TCKD and NCKD, and the top-k mask's ranking) see both logits z-scored per sample; CE, CC, BC and
the confidence masks see the raw ones. NOTE(paper): that is the reference code's choice (its MLKD
passes ``logit_stand`` to the instance KD only), not "every distillation term". Its recipe must
set ``temperature: 2`` (T0; the fixed 3, 5, 2, 6 stay) and ``kd_weight: 9`` (ce_weight 0.1; some
pairs' logs use weight 6). DeepKD's MLKD has no published recipe with it.
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

# MLKD's hard-coded temperatures after T0: the strong view's instance terms use T0, 3, 5 and T = 2, 6
# (the latter from the view chosen by ``strong_t26``).
FIXED_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)
MASKS = ("fraction", "per_sample")
T26_VIEWS = ("weak", "strong")


def mlkd_masks(teacher_weak: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """MLKD's ``(sample mask [B], class mask [C])`` from the weak-view teacher logits ``[B, C]``.

    ``p = softmax(zt_w)`` (T = 1, no gradient); ``sample = max_c p <= median_b``,
    ``class = sum_b p <= median_c``: True marks the less confident half (ties at the median kept).
    """
    p = V.probabilities(teacher_weak)
    return V.median_mask(p.amax(dim=-1)), V.median_mask(p.sum(dim=0))


def _check_options(temperature, warmup_epochs, mask, strong_t26, correlation_group_size) -> None:
    check_positive("temperature", temperature)
    check_non_negative("warmup_epochs", warmup_epochs)
    V.check_choice("mask", mask, MASKS)
    V.check_choice("strong_t26", strong_t26, T26_VIEWS)
    V.check_group_size(correlation_group_size)


def _task_terms(method, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
                masks: Tuple[torch.Tensor, torch.Tensor]) -> Dict[str, LossTerm]:
    """``ce``, ``cc`` and ``bc``, all on the task stream (weak-view CC and BC only)."""
    ce = 2 * F.cross_entropy(student, target.expand(2, -1), validate=False)  # mean of the views, x2
    weak_s, weak_t = student[V.WEAK], teacher[V.WEAK]
    sample, classes = masks
    if method.mask == "per_sample":
        cc = V.class_correlation(weak_s, weak_t, method.temperatures, classes)
        bc = V.batch_correlation(weak_s, weak_t, method.temperatures, sample)
    else:
        dtype = _core.compute_dtype(student)
        cc = classes.to(dtype).mean() * V.class_correlation(weak_s, weak_t, method.temperatures)
        bc = sample.to(dtype).mean() * V.batch_correlation(weak_s, weak_t, method.temperatures)
    return {"ce": LossTerm(method.ce_weight * ce, "task"), "cc": LossTerm(method.kd_weight * cc, "task"),
            "bc": LossTerm(method.kd_weight * bc, "task")}


def _instance_parts(method, target: torch.Tensor, sample_mask: torch.Tensor, dtype: torch.dtype):
    """``[(weight, view, temperatures, target)]``: the instance-level terms to add up (section 1.1)."""
    fraction, weak_target = V.sample_weighting(sample_mask, target, method.mask == "per_sample", dtype)
    weak = (fraction, V.WEAK, method.temperatures, weak_target)
    if method.strong_t26 == "strong":
        return [weak, (1.0, V.STRONG, method.temperatures, target)]
    main, t26 = method.temperatures[:3], method.temperatures[3:]
    return [weak, (1.0, V.STRONG, main, target), (1.0, V.WEAK, t26, target)]


@register_method("mlkd", paper="Jin et al., Multi-Level Logit Distillation, CVPR 2023")
class MLKD(Method):
    """Plain MLKD (MLKD_CRLD.md 1.1). Terms ``ce`` (task), ``kd`` (target), ``cc`` and ``bc`` (task).

    Defaults, the reference's CIFAR-100 values: T0 = 4 (``temperature``; ImageNet: 1), ce_weight =
    0.1, kd_weight = 0.9 (ImageNet: 0.5 / 0.5), warmup_epochs = 0, mask = "fraction",
    strong_t26 = "weak", correlation_group_size = None. Fixed temperatures 3, 5, 2, 6.
    """

    views = 2

    def __init__(self, *, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 warmup_epochs: int = 0, mask: str = "fraction", strong_t26: str = "weak",
                 correlation_group_size: Optional[int] = None, logit_stand: bool = False):
        super().__init__()
        _check_options(temperature, warmup_epochs, mask, strong_t26, correlation_group_size)
        self.temperature, self.ce_weight, self.kd_weight = temperature, ce_weight, kd_weight
        self.warmup_epochs, self.mask, self.strong_t26 = warmup_epochs, mask, strong_t26
        self.correlation_group_size, self.logit_stand = correlation_group_size, logit_stand
        self.temperatures = (float(temperature),) + FIXED_TEMPERATURES

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                target: torch.Tensor, *, epoch: int) -> Dict[str, LossTerm]:
        """Logits ``[2, B, C]``, target ``[B]`` -> ``{"ce", "kd", "cc", "bc"}`` scalar terms."""
        V.check_views("mlkd", student_logits, teacher_logits, target)
        loss = partial(self._group_loss, epoch=epoch)
        return V.grouped(loss, student_logits, teacher_logits, target, self.correlation_group_size)

    def _group_loss(self, student, teacher, target, *, epoch):
        masks = mlkd_masks(teacher[V.WEAK])
        terms = _task_terms(self, student, teacher, target, masks)
        parts = _instance_parts(self, target, masks[0], _core.compute_dtype(student))
        student, teacher = distillation_logits(self, student, teacher)  # the instance terms' logits
        kd = sum(weight * V.kd_sum(student[view], teacher[view], temperatures, part_target)
                 for weight, view, temperatures, part_target in parts)
        terms["kd"] = LossTerm(warmup_factor(epoch, self.warmup_epochs) * self.kd_weight * kd, "target")
        return {name: terms[name] for name in ("ce", "kd", "cc", "bc")}


@register_method("deepkd_mlkd", base="mlkd", paper=DEEPKD_PAPER + " on MLKD")
class DeepKDMLKD(Method):
    """DeepKD on MLKD (MLKD_CRLD.md 1.2): terms ``ce``, ``cc``, ``bc`` (task), ``tckd`` (target) and
    ``nckd`` (non_target); every instance-level KD term becomes ``alpha w(e) TCKD + beta w(e) NCKD``.

    Defaults, the reference's (``cfg.py``; recipes state their per-pair values): T0 = 4, ce_weight
    = 0.1, kd_weight = 0.9, alpha = 1, beta = 8, warmup_epochs = 20, mask = "fraction",
    strong_t26 = "strong", correlation_group_size = None, the dynamic top-k mask off. Fixed
    temperatures 3, 5, 2, 6.
    """

    views = 2

    def __init__(self, *, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 alpha: float = 1.0, beta: float = 8.0, warmup_epochs: int = 20, mask: str = "fraction",
                 strong_t26: str = "strong", correlation_group_size: Optional[int] = None,
                 topk: bool = False, topk_start_fraction: float = TOPK_START_FRACTION,
                 topk_ramp_start: Optional[int] = None, topk_ramp_end: Optional[int] = TOPK_RAMP_END,
                 topk_count_target: bool = False, logit_stand: bool = False):
        super().__init__()
        _check_options(temperature, warmup_epochs, mask, strong_t26, correlation_group_size)
        self.logit_stand = logit_stand
        self.temperature, self.ce_weight, self.kd_weight = temperature, ce_weight, kd_weight
        self.alpha, self.beta, self.warmup_epochs = alpha, beta, warmup_epochs
        self.mask, self.strong_t26, self.correlation_group_size = mask, strong_t26, correlation_group_size
        self.temperatures = (float(temperature),) + FIXED_TEMPERATURES
        self.init_topk(topk=topk, topk_start_fraction=topk_start_fraction, topk_ramp_start=topk_ramp_start,
                       topk_ramp_end=topk_ramp_end, topk_count_target=topk_count_target,
                       warmup_epochs=warmup_epochs)

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                target: torch.Tensor, *, epoch: int) -> Dict[str, LossTerm]:
        """Logits ``[2, B, C]``, target ``[B]`` -> ``{"ce", "cc", "bc", "tckd", "nckd"}`` scalar terms."""
        V.check_views("deepkd_mlkd", student_logits, teacher_logits, target)
        loss = partial(self._group_loss, epoch=epoch)
        return V.grouped(loss, student_logits, teacher_logits, target, self.correlation_group_size)

    def _group_loss(self, student, teacher, target, *, epoch):
        masks = mlkd_masks(teacher[V.WEAK])
        terms = _task_terms(self, student, teacher, target, masks)
        parts = _instance_parts(self, target, masks[0], _core.compute_dtype(student))
        student, teacher = distillation_logits(self, student, teacher)  # the instance terms' logits
        keeps = [self.dtm.keep(teacher[view], target, epoch, V.DROPPED) for view in (V.WEAK, V.STRONG)]
        tckd = nckd = 0.0
        for weight, view, temperatures, part_target in parts:
            tc, nc = V.decoupled_sum(student[view], teacher[view], part_target, temperatures, keeps[view])
            tckd, nckd = tckd + weight * tc, nckd + weight * nc
        scale = warmup_factor(epoch, self.warmup_epochs) * self.kd_weight
        terms["tckd"] = LossTerm(scale * self.alpha * tckd, "target")
        terms["nckd"] = LossTerm(scale * self.beta * nckd, "non_target")
        return terms
