"""The detection training step: student RoIs, teacher logits on them, named terms, optimisation.

The step is on one screen in :func:`detection_train_step`; the optimisation tail
(``deepkd.engine.step.optimize``: backward + step, or per-stream gradients + ``step(grads)``) is the
one the classification loop uses.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from deepkd.detection.roi import RoIOutputs, Target, roi_forward, teacher_forward
from deepkd.engine.distributed import Dist
from deepkd.engine.step import optimize
from deepkd.errors import ConfigError
from deepkd.features import Features
from deepkd.losses import LossTerm, Method

CLASSIFIER_LOSS = "loss_classifier"


def pyramid_features(class_logits: torch.Tensor, levels: Sequence[torch.Tensor]) -> Features:
    """What a feature method reads of a detector (float32): ``logits`` = the RoI class logits ``[N, C]``,
    ``stages`` = the backbone's levels (an FPN's, finest first), no pre-activations, no pooled vector."""
    return Features(class_logits.float(), [level.float() for level in levels])


def detection_terms(outputs: RoIOutputs, teacher_logits: Optional[torch.Tensor], method: Method,
                    epoch: int, teacher_features: Optional[Sequence[torch.Tensor]] = None) -> Dict[str, LossTerm]:
    """A method on the RoI class logits (a feature method: also on the backbone levels) plus the
    detector's other losses, as named terms.

    ``method(class_logits [N, C], teacher_logits [N, C], labels [N], epoch=epoch)`` (any registered
    method; float32). Its ``ce`` (stream ``task``) replaces ``loss_classifier``: with ``ce_weight=1``
    the two are equal, and keeping both would count the classification loss twice. A method without
    a ``ce`` term leaves ``loss_classifier`` in. ``loss_box_reg``, ``loss_objectness`` and
    ``loss_rpn_box_reg`` join the ``task`` stream unchanged. Streams: ``task`` = CE + the three
    detector losses, ``target``/``non_target`` = the method's distillation terms. A feature method
    (``method.features``; ``dkd+reviewkd``: DKD on the logits, ReviewKD on the FPN) gets
    :func:`pyramid_features` of the student (``outputs.features``) and of the teacher
    (``teacher_logits`` and ``teacher_features``, :func:`deepkd.detection.roi.teacher_forward`'s).
    """
    if method.needs_teacher and (teacher_logits is None or (method.features and teacher_features is None)):
        raise ConfigError(f"method {type(method).__name__} needs teacher logits"
                          f"{' and features' if method.features else ''}; pass a teacher")
    student = outputs.class_logits.float()
    teacher = None if teacher_logits is None else teacher_logits.float()
    if method.features:
        student = pyramid_features(student, outputs.features)
        teacher = None if teacher is None else pyramid_features(teacher, teacher_features)
    method_terms = method(student, teacher, outputs.labels, epoch=epoch)
    terms = {name: LossTerm(value, "task") for name, value in outputs.losses.items()
             if name != CLASSIFIER_LOSS or "ce" not in method_terms}
    clash = set(terms) & set(method_terms)
    if clash:
        raise ConfigError(f"method {type(method).__name__} returns terms named like detector losses: {sorted(clash)}")
    return {**method_terms, **terms}


def optimizer_params(optimizer: torch.optim.Optimizer) -> List[nn.Parameter]:
    """The optimizer's parameters in ``param_groups`` order (the order its gradient lists follow)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def detection_train_step(student: nn.Module, teacher: Optional[nn.Module], method: Method,
                         optimizer: torch.optim.Optimizer, images: Sequence[torch.Tensor],
                         targets: Sequence[Target], *, epoch: int, ctx: Optional[Dist] = None, precision: str = "fp32",
                         params: Optional[Sequence[nn.Parameter]] = None) -> Dict[str, torch.Tensor]:
    """One optimisation step on a batch; returns the detached value of every term.

    ``images``/``targets`` as for :func:`roi_forward` (on the student's device). ``teacher``: frozen
    (:func:`prepare_teacher`), or None for a method without one (``ce``). ``precision="bf16"`` runs
    both forwards under bf16 autocast; the method computes in float32. ``params``: the optimizer's
    parameters in order (default: read from ``optimizer``).
    """
    with _autocast(images[0].device, precision):
        outputs = roi_forward(student, images, targets)
        taught = None
        if teacher is not None and method.needs_teacher:
            taught = teacher_forward(teacher, outputs.images.tensors, outputs.proposals, outputs.images.image_sizes)
    teacher_logits, teacher_levels = taught if taught is not None else (None, None)
    terms = detection_terms(outputs, teacher_logits, method, epoch, teacher_features=teacher_levels)
    optimize(terms, optimizer, params if params is not None else optimizer_params(optimizer), ctx or Dist())
    return {name: term.value.detach() for name, term in terms.items()}


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ConfigError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return contextlib.nullcontext()
