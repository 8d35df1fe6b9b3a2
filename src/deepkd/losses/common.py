"""Helpers shared by the method modules: argument checks, the cross-entropy with the top-k mask, the
decoupled terms."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from deepkd.losses import functional as F
from deepkd.losses.base import LossTerm


def check_positive(name: str, value: float) -> None:
    """Raise unless ``value > 0``."""
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def check_non_negative(name: str, value: float) -> None:
    """Raise unless ``value >= 0``."""
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def cross_entropy_and_mask(method, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           target: torch.Tensor, epoch: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """What the DKD-style methods (``dkd``, ``dtkd_dkd``, ``deepkd_kd``) compute first: the task
    cross-entropy and their dynamic top-k keep mask (``method.dtm``; None: plain NCKD)."""
    ce = F.cross_entropy(student_logits, target, ignore_index=method.ignore_index, validate=False)
    return ce, method.dtm.keep(teacher_logits, target, epoch, method.ignore_index)


def decoupled_terms(ce: torch.Tensor, tckd: torch.Tensor, nckd: torch.Tensor, *, ce_weight: float,
                    tckd_weight: float, nckd_weight: float) -> Dict[str, LossTerm]:
    """``{"ce": task, "tckd": target, "nckd": non_target}`` terms of a decoupled method."""
    return {"ce": LossTerm(ce_weight * ce, "task"), "tckd": LossTerm(tckd_weight * tckd, "target"),
            "nckd": LossTerm(nckd_weight * nckd, "non_target")}
