"""The forward passes of one training step: what the method's first two arguments are.

A logit method gets the student's and the teacher's logits (``[B, C]``, or ``[2, B, C]`` for a
two-view batch); a feature method gets their :class:`~deepkd.models.features.Features` (logits,
stages, pre-activations, pooled vector), from a :class:`~deepkd.models.features.FeatureExtractor`
around each model. Losses are computed in float32, so both come back in float32.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple, Union

import torch
from torch import nn

from deepkd.models.features import FeatureExtractor, Features

Outputs = Union[torch.Tensor, Features]


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the forward passes; losses are computed in float32 by the method."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_views(model: Callable, images: torch.Tensor, concat: bool) -> torch.Tensor:
    """Logits of ``[b, 3, H, W]`` images, or ``[2, b, C]`` of a two-view batch ``[2, b, 3, H, W]``:
    one forward per view (per-view BatchNorm batch statistics, as MLKD and CRLD run), or ``concat``."""
    if images.dim() == 4:
        return model(images)
    if concat:
        return model(images.flatten(0, 1)).unflatten(0, images.shape[:2])
    return torch.stack([model(view) for view in images])


def as_float(features: Features) -> Features:
    """Every tensor of ``features`` in float32 (a bf16 forward's features, for the loss)."""
    def cast(tensors):
        return None if tensors is None else [t.float() for t in tensors]

    return Features(features.logits.float(), cast(features.stages), cast(features.preact),
                    None if features.pooled is None else features.pooled.float())


def forward_pair(student: Union[nn.Module, FeatureExtractor], teacher: Union[nn.Module, FeatureExtractor, None],
                 images: torch.Tensor, *, concat: bool = False,
                 teacher_logits: Optional[torch.Tensor] = None) -> Tuple[Outputs, Optional[Outputs], torch.Tensor]:
    """``(student outputs, teacher outputs, student logits)`` for the method: Features when ``student``
    is a FeatureExtractor, else logits (``teacher_logits``, from the teacher-logit cache, replace the
    teacher's forward). The teacher runs without gradient; the student's logits keep theirs."""
    if isinstance(student, FeatureExtractor):
        out = student(images)
        with torch.no_grad():
            teacher_out = as_float(teacher(images)) if teacher is not None else None
        return as_float(out), teacher_out, out.logits
    logits = forward_views(student, images, concat)
    if teacher_logits is None and teacher is not None:
        with torch.no_grad():  # eval mode: both views in one forward give each view's own logits
            teacher_logits = forward_views(teacher, images, concat=True).float()
    return logits.float(), teacher_logits, logits
