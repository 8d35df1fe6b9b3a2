"""DeepKD's dynamic top-k mask (DTM) over the non-target classes, and its defaults (METHODS.md 4.2).

Apart from :mod:`deepkd.losses.common` so that :class:`deepkd.losses.base.Method`, which builds the
mask (:meth:`~deepkd.losses.base.Method.init_topk`), imports it without a circle.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from deepkd.losses import functional as F

# Defaults of the DTM arguments, shared by every method that offers the mask (METHODS.md 4.2).
TOPK_START_FRACTION = 0.05
# No ramp end fits every schedule (deepkd's choice is the first LR decay: 150 of CIFAR-100's 240
# epochs): a method with the mask on needs it stated, so the default is None.
TOPK_RAMP_END = None


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
        if self.enabled and self.num_classes is None:
            self._warn_if_nckd_vanishes(teacher.shape[-1])
        classes = self.num_classes = teacher.shape[-1]
        k = self.k(epoch, classes)
        if k is None or k >= classes - 1:
            return None
        return F.topk_keep_mask(teacher, target, k, count_target=self.count_target,
                                ignore_index=ignore_index)

    def _warn_if_nckd_vanishes(self, classes: int) -> None:
        """Warn once when the mask starts with fewer than two non-target classes: NCKD, a KL divergence
        between two distributions over the kept classes, is then exactly zero (Fashion-MNIST: 5% of 10
        classes is K = 1)."""
        spare = 1 if self.count_target else 0  # the reference ranking may spend one of K on the target
        epochs = range(self.ramp_start, self.ramp_end + 1)
        alive = next(e for e in epochs if self.k(e, classes) - spare >= 2 or self.k(e, classes) >= classes - 1)
        if alive > self.ramp_start:
            warnings.warn(f"method.topk: K starts at {self.k(self.ramp_start, classes)} of {classes} classes, so "
                          f"NCKD over the kept non-target classes is zero until epoch {alive}; raise "
                          f"method.topk_start_fraction to keep at least two", stacklevel=2)
