"""``ce``: plain cross-entropy, no teacher (teachers and the student-alone baseline)."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from deepkd.losses import functional as F
from deepkd.losses.base import LossTerm, Method
from deepkd.losses.registry import register_method


@register_method("ce", needs_teacher=False, paper="the student alone: cross-entropy on the labels")
class CrossEntropy(Method):
    """``{"ce": CE(zs, y)}`` on the task stream; ``teacher_logits`` is ignored (may be None)."""

    needs_teacher = False

    def __init__(self, *, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                target: torch.Tensor, *, epoch: int) -> Dict[str, LossTerm]:
        """Logits ``[..., C]``, target ``[...]`` -> ``{"ce": LossTerm(scalar, "task")}``."""
        loss = F.cross_entropy(student_logits, target, ignore_index=self.ignore_index, validate=False)
        return {"ce": LossTerm(loss, "task")}
