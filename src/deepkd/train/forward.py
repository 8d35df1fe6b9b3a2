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


@contextlib.contextmanager
def in_mode(model: Union[nn.Module, FeatureExtractor, None], mode: str):
    """``model`` (a module, or a FeatureExtractor's) in ``mode`` (``"eval"`` or ``"train"``) inside the
    block, back in the mode it had after it: a training-mode teacher moves its BatchNorm running
    statistics in the training forward only, never in an evaluation or a probe."""
    module = model.model if isinstance(model, FeatureExtractor) else model
    if module is None:
        yield
        return
    was = module.training
    module.train(mode == "train")
    try:
        yield
    finally:
        module.train(was)


def forward_pair(student: Union[nn.Module, FeatureExtractor], teacher: Union[nn.Module, FeatureExtractor, None],
                 images: torch.Tensor, *, concat: bool = False, teacher_logits: Optional[torch.Tensor] = None,
                 teacher_mode: str = "eval") -> Tuple[Outputs, Optional[Outputs], torch.Tensor]:
    """``(student outputs, teacher outputs, student logits)`` for the method: Features when ``student``
    is a FeatureExtractor, else logits (``teacher_logits``, from the teacher-logit cache, replace the
    teacher's forward). The teacher runs without gradient, in ``teacher_mode`` (the method's
    ``teacher_mode``: ``"train"`` uses BatchNorm batch statistics); the student's logits keep theirs."""
    if isinstance(student, FeatureExtractor):
        out = student(images)
        with torch.no_grad(), in_mode(teacher, teacher_mode):
            teacher_out = as_float(teacher(images)) if teacher is not None else None
        return as_float(out), teacher_out, out.logits
    logits = forward_views(student, images, concat)
    if teacher_logits is None and teacher is not None:
        # eval mode: both views in one forward give each view's own logits; train mode: as the student's views
        with torch.no_grad(), in_mode(teacher, teacher_mode):
            teacher_logits = forward_views(teacher, images, concat=concat or teacher_mode == "eval").float()
    return logits.float(), teacher_logits, logits
