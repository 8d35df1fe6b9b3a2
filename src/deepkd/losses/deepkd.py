"""DeepKD (Huang et al., 2025): three gradient streams and the dynamic top-k mask (METHODS.md 4).

DeepKD's loss is a base method's distillation term split into a task (CE), a target (TCKD) and a
non-target (NCKD) stream; its optimizer (``deepkd.optim.DecoupledMomentumSGD``, chosen in the
recipe) gives each stream its own momentum. Registered names:

- ``deepkd_kd``: :class:`DeepKDKD` below (KD base: TCKD + (1 - pbar_t) NCKD).
- ``deepkd_dkd``: the ``dkd`` method itself (a DKD base has exactly DKD's three terms).
- ``deepkd_dtkd``: the ``dtkd_dkd`` method itself (deepkd's DTKD+DKD decomposition).
- ``deepkd``: ``base`` in {"kd", "dkd", "dtkd"} picks one of the three.

All of them take the dynamic top-k mask arguments ``topk*`` (off by default) and ``logit_stand``
(Sun et al., CVPR 2024; off by default; see ``deepkd.losses.common``).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch

from deepkd.losses import functional as F
from deepkd.losses.base import LossTerm, Method, warmup_factor
from deepkd.losses.common import (
    check_non_negative,
    check_positive,
    cross_entropy_and_mask,
    decoupled_terms,
    distillation_logits,
)
from deepkd.losses.dkd import DKD
from deepkd.losses.dtkd_dkd import DTKDDKD
from deepkd.losses.registry import DEEPKD_PAPER, METHODS, register_method
from deepkd.losses.topk import TOPK_RAMP_END, TOPK_START_FRACTION
from deepkd.registry import closest

register_method("deepkd_dkd", base="dkd", paper=DEEPKD_PAPER + " on DKD")(DKD)
register_method("deepkd_dtkd", base="dtkd", paper=DEEPKD_PAPER + " on DTKD")(DTKDDKD)


@register_method("deepkd_kd", base="kd", paper=DEEPKD_PAPER + " on KD")
class DeepKDKD(Method):
    """DeepKD with a KD base: ``ce_weight CE`` (task), ``kd_weight w(e) TCKD`` (target),
    ``kd_weight w(e) (1 - pbar_t) NCKD`` (non_target); terms ``ce``, ``tckd``, ``nckd``.

    ``pbar_t`` is the batch mean of the teacher's target probability at T (no gradient).
    NOTE(paper): the reference code scales the batch-mean NCKD by the batch-mean weight
    ``(1 - pbar_t)``; the paper's exact decomposition of KD is the per-sample
    ``mean_b[(1 - p_t,y) T^2 KL(q_t || q_s)]``, chosen with ``per_sample_weight=True``.
    With ``per_sample_weight=True`` the two distillation terms sum to KD's ``T^2 KL``, so
    ``kd_weight`` is KD's weight and, under momenta ``task = m - delta``, ``target = non_target =
    m + delta`` with the weight decay on ``task``, this is DOT (Zhao et al., ICCV 2023; mdistiller:
    ce 0.1, kd 0.9, delta 0.075). The reference DeepKD ignores KD's weight in this mode, hence the
    default 1. ``warmup_epochs`` defaults to 0 as in KD. Defaults: T = 4, ce_weight = 0.1 (CIFAR-100).

    ``logit_stand=True``: TCKD, NCKD, ``pbar_t`` and the top-k mask see the logits z-scored per
    sample, the CE the raw ones. No published recipe combines the two: KD's (temperature 2, weight
    9) is a starting point, not a reference value.
    """

    def __init__(self, *, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 1.0,
                 warmup_epochs: int = 0, per_sample_weight: bool = False, topk: bool = False,
                 topk_start_fraction: float = TOPK_START_FRACTION,
                 topk_ramp_start: Optional[int] = None, topk_ramp_end: Optional[int] = TOPK_RAMP_END,
                 topk_count_target: bool = False, ignore_index: int = -100, logit_stand: bool = False):
        super().__init__()
        check_positive("temperature", temperature)
        check_non_negative("warmup_epochs", warmup_epochs)
        self.temperature, self.ce_weight, self.warmup_epochs = temperature, ce_weight, warmup_epochs
        self.logit_stand = logit_stand
        self.kd_weight = kd_weight
        self.per_sample_weight, self.ignore_index = per_sample_weight, ignore_index
        self.init_topk(topk=topk, topk_start_fraction=topk_start_fraction, topk_ramp_start=topk_ramp_start,
                       topk_ramp_end=topk_ramp_end, topk_count_target=topk_count_target,
                       warmup_epochs=warmup_epochs)

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                target: torch.Tensor, *, epoch: int) -> Dict[str, LossTerm]:
        """Logits ``[..., C]``, target ``[...]`` -> ``{"ce", "tckd", "nckd"}`` scalar terms."""
        student, teacher = distillation_logits(self, student_logits, teacher_logits)
        ce, keep = cross_entropy_and_mask(self, student_logits, teacher, target, epoch)
        terms = F.decoupled(student, teacher, target, temperature=self.temperature,
                            keep=keep, ignore_index=self.ignore_index, validate=False)
        if self.per_sample_weight:
            non_target = terms.weighted_nckd
        else:
            non_target = (1 - terms.teacher_target_prob) * terms.nckd
        weight = self.kd_weight * warmup_factor(epoch, self.warmup_epochs)
        return decoupled_terms(ce, terms.tckd, non_target, ce_weight=self.ce_weight, tckd_weight=weight,
                               nckd_weight=weight)



_BASES = {"kd": "deepkd_kd", "dkd": "deepkd_dkd", "dtkd": "deepkd_dtkd"}


@register_method("deepkd", paper=DEEPKD_PAPER + " base chosen by method.base")
def deepkd(*, base: str = "dkd", **arguments: Any) -> Method:
    """DeepKD on ``base`` ("kd", "dkd" or "dtkd"): builds ``deepkd_<base>`` with ``arguments``.

    The defaults are those of the chosen base's builder.
    """
    if base not in _BASES:
        raise ValueError(f"deepkd base must be one of {sorted(_BASES)}, got {base!r}")
    name = _BASES[base]
    accepted = inspect.signature(METHODS.get(name)).parameters
    for key in arguments:
        if key not in accepted:
            hint = closest(key, list(accepted))
            near = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"deepkd with base {base!r} has no argument {key!r}{near}")
    return METHODS.build(name, **arguments)
