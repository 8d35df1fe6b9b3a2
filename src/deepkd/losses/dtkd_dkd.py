"""``dtkd_dkd``: deepkd's DTKD+DKD decomposition (METHODS.md 3 last bullet, 5.4; no reference code)."""
from __future__ import annotations

from typing import Dict, Optional

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
from deepkd.losses.registry import register_method
from deepkd.losses.topk import TOPK_RAMP_END, TOPK_START_FRACTION


@register_method("dtkd_dkd", paper="DTKD (Wei & Bai, 2024) in DKD's decomposition (deepkd's, METHODS.md 5.4)")
class DTKDDKD(Method):
    """``CE + w(e) (alpha TCKD_dyn + beta NCKD_dyn)``: DKD's terms at DTKD's per-sample temperatures.

    Per row the teacher softmax runs at ``T_t`` and the student's at ``T_s`` (see
    ``F.dynamic_temperatures``; tau = ``temperature``), each KL scaled by ``T_t * T_s``; there is no
    fixed-temperature term. Terms: ``ce`` (task), ``tckd`` (target), ``nckd`` (non_target).
    deepkd's own combination: the defaults (DKD's alpha = 1, beta = 8, tau = 4, warm-up 20) are
    deepkd's choice, not published settings. ``guard`` and ``topk*`` as in ``dtkd`` and ``dkd``.
    Also registered as ``deepkd_dtkd`` (DeepKD with a DTKD base has exactly these terms; DeepKD's
    own part is the decoupled-momentum optimizer chosen in the recipe).

    ``logit_stand=True`` (Sun et al., CVPR 2024; ``deepkd.losses.common``): the dynamic temperatures,
    TCKD, NCKD and the top-k mask see the logits z-scored per sample, the CE the raw ones. No
    published recipe combines the two: DKD's (temperature 2, alpha and beta times 9) is a starting
    point, not a reference value.
    """

    def __init__(self, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 ce_weight: float = 1.0, warmup_epochs: int = 20, guard: bool = False,
                 topk: bool = False, topk_start_fraction: float = TOPK_START_FRACTION,
                 topk_ramp_start: Optional[int] = None, topk_ramp_end: int = TOPK_RAMP_END,
                 topk_count_target: bool = False, ignore_index: int = -100, logit_stand: bool = False):
        super().__init__()
        check_positive("temperature", temperature)
        check_non_negative("warmup_epochs", warmup_epochs)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.ce_weight, self.warmup_epochs = ce_weight, warmup_epochs
        self.guard, self.ignore_index, self.logit_stand = guard, ignore_index, logit_stand
        self.init_topk(topk=topk, topk_start_fraction=topk_start_fraction, topk_ramp_start=topk_ramp_start,
                       topk_ramp_end=topk_ramp_end, topk_count_target=topk_count_target,
                       warmup_epochs=warmup_epochs)

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                target: torch.Tensor, *, epoch: int) -> Dict[str, LossTerm]:
        """Logits ``[..., C]``, target ``[...]`` -> ``{"ce", "tckd", "nckd"}`` scalar terms."""
        student, teacher = distillation_logits(self, student_logits, teacher_logits)
        ce, keep = cross_entropy_and_mask(self, student_logits, teacher, target, epoch)
        terms = F.dynamic_decoupled(student, teacher, target,
                                    temperature=self.temperature, guard=self.guard, keep=keep,
                                    ignore_index=self.ignore_index, validate=not self.guard)
        weight = warmup_factor(epoch, self.warmup_epochs)
        return decoupled_terms(ce, terms.tckd, terms.nckd, ce_weight=self.ce_weight, tckd_weight=weight * self.alpha,
                               nckd_weight=weight * self.beta)
