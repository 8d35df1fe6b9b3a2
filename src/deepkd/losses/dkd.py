"""``dkd``: decoupled KD (Zhao et al., CVPR 2022), optionally with DeepKD's dynamic top-k mask."""
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


@register_method("dkd", paper="Zhao et al., Decoupled Knowledge Distillation, CVPR 2022")
class DKD(Method):
    """DKD (METHODS.md 2): ``CE + w(e) (alpha TCKD + beta NCKD)``, ``w(e) = min(e / warmup, 1)``.

    Terms: ``ce`` (task), ``tckd`` (target), ``nckd`` (non_target). With ``topk=True`` the NCKD term
    uses DeepKD's dynamic top-k mask (METHODS.md 5.3; deepkd's combination, see ``DynamicTopK``).
    Defaults: alpha = 1, beta = 8, T = 4, ce_weight = 1, warmup_epochs = 20 (CIFAR-100).

    ``logit_stand=True`` (Sun et al., CVPR 2024; ``deepkd.losses.common``): TCKD and NCKD (and the
    top-k mask's ranking) see both logits z-scored per sample, the CE the raw ones. The paper's recipe
    must then set ``temperature: 2`` and multiply alpha and beta by its kd weight 9 (resnet32x4 ->
    resnet8x4: alpha 9, beta 72; its logs use other weights, e.g. 12 to 18, and beta 2 for some pairs).
    """

    def __init__(self, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 ce_weight: float = 1.0, warmup_epochs: int = 20, topk: bool = False,
                 topk_start_fraction: float = TOPK_START_FRACTION,
                 topk_ramp_start: Optional[int] = None, topk_ramp_end: int = TOPK_RAMP_END,
                 topk_count_target: bool = False, ignore_index: int = -100, logit_stand: bool = False):
        super().__init__()
        check_positive("temperature", temperature)
        check_non_negative("warmup_epochs", warmup_epochs)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.ce_weight, self.warmup_epochs, self.ignore_index = ce_weight, warmup_epochs, ignore_index
        self.logit_stand = logit_stand
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
        weight = warmup_factor(epoch, self.warmup_epochs)
        return decoupled_terms(ce, terms.tckd, terms.nckd, ce_weight=self.ce_weight, tckd_weight=weight * self.alpha,
                               nckd_weight=weight * self.beta)
