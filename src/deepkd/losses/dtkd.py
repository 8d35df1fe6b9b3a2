"""``dtkd``: dynamic temperature KD (Wei & Bai, 2024)."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from deepkd.losses import functional as F
from deepkd.losses.base import LossTerm, Method, warmup_factor
from deepkd.losses.common import check_non_negative, check_positive, distillation_logits
from deepkd.losses.registry import register_method


@register_method("dtkd", paper="Wei & Bai, Dynamic Temperature Knowledge Distillation, 2024")
class DTKD(Method):
    """DTKD (METHODS.md 3): ``CE + w(e) (alpha l_dyn + beta kd(tau))``. Terms: ``ce``, ``dtkd``.

    The undecomposed distillation term rides the ``target`` stream. ``guard=True`` clamps the
    per-sample temperatures to ``[tau/4, 4 tau]`` instead of raising on non-positive ones (deepkd's
    option; the reference has no guard). Defaults: alpha = 3, beta = 1, tau = 4, ce_weight = 1,
    warmup_epochs = 20.

    ``logit_stand=True`` (Sun et al., CVPR 2024; ``deepkd.losses.common``): the dynamic temperatures
    and both KL terms see the logits z-scored per sample (whose maxima are positive, so the dynamic
    temperatures are too), the CE the raw ones. No published recipe combines the two: the paper's
    base temperature 2 and distillation weight 9 are a starting point, not a reference value.
    """

    def __init__(self, *, alpha: float = 3.0, beta: float = 1.0, temperature: float = 4.0,
                 ce_weight: float = 1.0, warmup_epochs: int = 20, guard: bool = False,
                 ignore_index: int = -100, logit_stand: bool = False):
        super().__init__()
        check_positive("temperature", temperature)
        check_non_negative("warmup_epochs", warmup_epochs)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.ce_weight, self.warmup_epochs = ce_weight, warmup_epochs
        self.guard, self.ignore_index, self.logit_stand = guard, ignore_index, logit_stand

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                target: torch.Tensor, *, epoch: int) -> Dict[str, LossTerm]:
        """Logits ``[..., C]``, target ``[...]`` -> ``{"ce", "dtkd"}`` scalar terms."""
        ce = F.cross_entropy(student_logits, target, ignore_index=self.ignore_index, validate=False)
        student, teacher = distillation_logits(self, student_logits, teacher_logits)
        distill = F.dtkd(student, teacher, temperature=self.temperature,
                         alpha=self.alpha, beta=self.beta, guard=self.guard, target=target,
                         ignore_index=self.ignore_index, validate=not self.guard)
        weight = warmup_factor(epoch, self.warmup_epochs)
        return {"ce": LossTerm(self.ce_weight * ce, "task"),
                "dtkd": LossTerm(weight * distill, "target")}
