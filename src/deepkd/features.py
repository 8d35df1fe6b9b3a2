"""What a model computes on its way to the logits, as the feature-distillation methods read it.

Shared by :mod:`deepkd.models.features` (which extracts them from any model) and the methods of
:mod:`deepkd.losses.feature` (which take them): neither imports the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

__all__ = ["FeatureInfo", "Features"]


@dataclass
class Features:
    """One forward pass: ``logits`` ``[B, K]`` (equal to ``model(x)``), ``stages`` (``[B, C_i, H_i, W_i]``
    each, stem first), ``preact`` (the same before each stage's last ReLU, or ``None`` where the
    architecture does not expose them) and ``pooled`` ``[B, C]`` (the classifier's input, or ``None``)."""

    logits: torch.Tensor
    stages: List[torch.Tensor]
    preact: Optional[List[torch.Tensor]] = None
    pooled: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class FeatureInfo:
    """Per stage: ``channels`` and spatial ``sizes`` (``(H, W)``); ``pooled`` channels (or ``None``);
    ``preact``: whether pre-activation features exist."""

    channels: List[int]
    sizes: List[Tuple[int, ...]]
    pooled: Optional[int]
    preact: bool
