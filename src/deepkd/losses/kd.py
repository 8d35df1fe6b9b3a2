"""``kd``: Hinton et al. (2015), ``ce_weight * CE + kd_weight * T^2 KL(p_t || p_s)``."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from deepkd.losses import functional as F
from deepkd.losses.base import LossTerm, Method, warmup_factor
from deepkd.losses.common import check_non_negative, check_positive, distillation_logits
from deepkd.losses.registry import register_method


@register_method("kd", paper="Hinton et al., Distilling the Knowledge in a Neural Network, 2015")
class KD(Method):
    """Vanilla KD (METHODS.md 1). Terms: ``ce`` (task) and ``kd`` (target).

    KD has no target/non-target split, so the whole undecomposed distillation term rides the
    ``target`` stream (a decoupled optimizer then treats it like DeepKD's target-class gradient).
    ``warmup_epochs`` defaults to 0: the reference KD recipe has no warm-up.
    CIFAR-100 defaults: T = 4, ce_weight = 0.1, kd_weight = 0.9 (ImageNet: T = 1, 0.5 / 0.5).

    ``logit_stand=True`` (Sun et al., CVPR 2024; ``deepkd.losses.common``): the KL sees both logits
    z-scored per sample, the CE the raw ones. The paper's recipe must then set ``temperature: 2`` and
    ``kd_weight: 9`` (ce_weight 0.1 unchanged; the logs of some pairs use T = 3 or 4 and other weights).
    """

    def __init__(self, *, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 warmup_epochs: int = 0, ignore_index: int = -100, logit_stand: bool = False):
        super().__init__()
        check_positive("temperature", temperature)
        check_non_negative("warmup_epochs", warmup_epochs)
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.warmup_epochs = warmup_epochs
        self.ignore_index = ignore_index
        self.logit_stand = logit_stand

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                target: torch.Tensor, *, epoch: int) -> Dict[str, LossTerm]:
        """Logits ``[..., C]``, target ``[...]`` -> ``{"ce", "kd"}`` scalar terms."""
        ce = F.cross_entropy(student_logits, target, ignore_index=self.ignore_index, validate=False)
        student, teacher = distillation_logits(self, student_logits, teacher_logits)
        distill = F.kd(student, teacher, temperature=self.temperature, target=target,
                       ignore_index=self.ignore_index, validate=False)
        weight = warmup_factor(epoch, self.warmup_epochs) * self.kd_weight
        return {"ce": LossTerm(self.ce_weight * ce, "task"),
                "kd": LossTerm(weight * distill, "target")}
