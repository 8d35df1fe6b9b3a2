"""``kd``: Hinton et al. (2015), ``ce_weight * CE + kd_weight * T^2 KL(p_t || p_s)``."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from deepkd.losses import functional as F
from deepkd.losses.base import LossTerm, Method, warmup_factor
from deepkd.losses.common import check_non_negative, check_positive
from deepkd.losses.registry import register_method


@register_method("kd")
class KD(Method):
    """Vanilla KD (METHODS.md 1). Terms: ``ce`` (task) and ``kd`` (target).

    KD has no target/non-target split, so the whole undecomposed distillation term rides the
    ``target`` stream (a decoupled optimizer then treats it like DeepKD's target-class gradient).
    ``warmup_epochs`` defaults to 0: the reference KD recipe has no warm-up.
    CIFAR-100 defaults: T = 4, ce_weight = 0.1, kd_weight = 0.9 (ImageNet: T = 1, 0.5 / 0.5).
    """

    def __init__(self, *, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 warmup_epochs: int = 0, ignore_index: int = -100):
        super().__init__()
        check_positive("temperature", temperature)
        check_non_negative("warmup_epochs", warmup_epochs)
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.warmup_epochs = warmup_epochs
        self.ignore_index = ignore_index

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                target: torch.Tensor, *, epoch: int) -> Dict[str, LossTerm]:
        """Logits ``[..., C]``, target ``[...]`` -> ``{"ce", "kd"}`` scalar terms."""
        ce = F.cross_entropy(student_logits, target, ignore_index=self.ignore_index, validate=False)
        distill = F.kd(student_logits, teacher_logits, temperature=self.temperature, target=target,
                       ignore_index=self.ignore_index, validate=False)
        weight = warmup_factor(epoch, self.warmup_epochs) * self.kd_weight
        return {"ce": LossTerm(self.ce_weight * ce, "task"),
                "kd": LossTerm(weight * distill, "target")}
