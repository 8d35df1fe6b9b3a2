"""Helpers shared by the method modules: argument checks and the dynamic top-k mask schedule."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from deepkd.losses import functional as F
from deepkd.losses.base import LossTerm

# Defaults of the DTM arguments, shared by every method that offers the mask (METHODS.md 4.2).
TOPK_START_FRACTION = 0.05
# No ramp end fits every schedule (deepkd's choice is the first LR decay: 150 of CIFAR-100's 240
# epochs): a method with the mask on needs it stated, so the default is None.
TOPK_RAMP_END = None


def check_positive(name: str, value: float) -> None:
    """Raise unless ``value > 0``."""
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def check_non_negative(name: str, value: float) -> None:
    """Raise unless ``value >= 0``."""
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


class DynamicTopK:
    """DeepKD's dynamic top-k mask (DTM) for a method's NCKD term; a plain helper, not a module.

    Built in one place, :meth:`deepkd.losses.base.Method.init_topk`, as the method's ``dtm``.

    ``k(epoch, C)`` follows :func:`deepkd.losses.functional.dtm_k`; ``keep(...)`` returns the bool
    ``[..., C]`` mask of kept non-target classes, or None when the mask is off or K covers all.
    ``ramp_start`` None means ``warmup_epochs`` (deepkd's choice, the paper publishes none);
    ``ramp_end`` must be given when the mask is on (the paper publishes none either).
    """

    def __init__(self, *, enabled: bool, start_fraction: float, ramp_start: Optional[int],
                 ramp_end: Optional[int], count_target: bool, warmup_epochs: float):
        if enabled and not 0 < start_fraction <= 1:
            raise ValueError(f"topk_start_fraction must be in (0, 1], got {start_fraction}")
        if enabled and ramp_end is None:
            raise ValueError("topk_ramp_end must be set when topk is on: the epoch from which NCKD keeps every "
                             "class (deepkd's choice: the first LR decay)")
        self.enabled = enabled
        self.start_fraction = start_fraction
        self.ramp_start = int(warmup_epochs) if ramp_start is None else ramp_start
        self.ramp_end = ramp_end
        self.count_target = count_target
        self.num_classes: Optional[int] = None  # known from the first batch the mask sees
        if enabled and self.ramp_end < self.ramp_start:
            raise ValueError(f"topk_ramp_end ({ramp_end}) must not precede topk_ramp_start "
                             f"({self.ramp_start})")

    def k(self, epoch: int, num_classes: Optional[int] = None) -> Optional[int]:
        """The current K (None when the mask is off or the class count is not known yet);
        ``num_classes`` defaults to that of the last batch passed to :meth:`keep`."""
        num_classes = self.num_classes if num_classes is None else num_classes
        if not self.enabled or num_classes is None:
            return None
        return F.dtm_k(epoch, num_classes, start_fraction=self.start_fraction,
                       ramp_start=self.ramp_start, ramp_end=self.ramp_end)

    def keep(self, teacher: torch.Tensor, target: torch.Tensor, epoch: int,
             ignore_index: int) -> Optional[torch.Tensor]:
        """The keep mask for this batch, or None (plain NCKD) when K keeps every class."""
        classes = self.num_classes = teacher.shape[-1]
        k = self.k(epoch, classes)
        if k is None or k >= classes - 1:
            return None
        return F.topk_keep_mask(teacher, target, k, count_target=self.count_target,
                                ignore_index=ignore_index)


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
