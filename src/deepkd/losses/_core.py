"""Shared internals of ``deepkd.losses.functional``: input checks, precision, per-row KL.

Everything here works on flattened inputs: logits ``[N, C]`` (N = product of the leading
dimensions), targets ``[N]``. Row results ``[N]`` are averaged by :func:`masked_mean`.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple, Union

import torch

Temperature = Union[float, torch.Tensor]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def full_precision(device: torch.device):
    """A context that turns autocast off on ``device`` (loss arithmetic must run in float32)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The common floating dtype of ``tensors``; half and bfloat16 are raised to float32."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    if not dtype.is_floating_point or dtype in _LOW_PRECISION:
        return torch.float32
    return dtype


def check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Student and teacher logits must both be ``[..., C]`` with identical shapes."""
    if student.dim() < 1 or student.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., C] with C >= 1, got {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits "
                         f"{tuple(teacher.shape)} must have the same shape")


def check_target(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, validate: bool) -> None:
    """``target`` must be integer ``[...]`` matching ``logits [..., C]``, values in [0, C) or ignored.

    The range check reads the values (one host sync); ``validate=False`` skips it.
    """
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match the logits' leading "
                         f"dimensions {tuple(logits.shape[:-1])}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    if validate and target.numel() > 0:
        classes = logits.shape[-1]
        bad = ((target < 0) & (target != ignore_index)) | (target >= classes)
        if bool(bad.any()):
            raise ValueError(f"target holds class indices outside [0, {classes - 1}] "
                             f"(other than ignore_index={ignore_index})")


def check_classes(classes: int) -> None:
    """NCKD needs at least two non-target classes."""
    if classes < 3:
        raise ValueError(f"NCKD needs at least 3 classes (one non-target class carries no "
                         f"distribution), got C = {classes}")


def check_temperature(temperature: Temperature, name: str = "temperature", validate: bool = True) -> None:
    """A temperature must be positive and finite (tensors are checked only when ``validate``)."""
    if isinstance(temperature, torch.Tensor):
        if validate and temperature.numel() > 0:
            if bool((~torch.isfinite(temperature) | (temperature <= 0)).any()):
                raise ValueError(f"{name} must be positive and finite everywhere")
        return
    if not (float(temperature) > 0 and float(temperature) < float("inf")):
        raise ValueError(f"{name} must be positive and finite, got {temperature}")


def as_rows(value: Temperature, rows: int, dtype: torch.dtype) -> Temperature:
    """A temperature as a float or a ``[N, 1]`` column (accepts ``[..., 1]``, ``[...]`` or one value)."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    if value.numel() == 1:
        return value.to(dtype).reshape(1, 1)
    if value.numel() != rows:
        raise ValueError(f"a per-sample temperature needs one value per position ({rows}), "
                         f"got shape {tuple(value.shape)}")
    return value.to(dtype).reshape(rows, 1)


def flatten_pair(student: torch.Tensor, teacher: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[..., C]`` -> ``[N, C]`` in the compute dtype; the teacher is detached (never trained)."""
    dtype = compute_dtype(student, teacher)
    classes = student.shape[-1]
    return (student.to(dtype).reshape(-1, classes),
            teacher.detach().to(dtype).reshape(-1, classes))


def flatten_target(target: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[...]`` -> (safe target ``[N]`` with ignored positions set to class 0, valid mask ``[N]``)."""
    target = target.reshape(-1)
    valid = target != ignore_index
    return torch.where(valid, target, torch.zeros_like(target)), valid


def target_mask(target: torch.Tensor, classes: int) -> torch.Tensor:
    """One-hot bool ``[N, C]`` of the (safe) targets ``[N]``."""
    mask = torch.zeros(target.shape[0], classes, dtype=torch.bool, device=target.device)
    return mask.scatter_(1, target.unsqueeze(1), True)


def kl_rows(log_teacher: torch.Tensor, log_student: torch.Tensor,
            present: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row ``KL(a || b) = sum_c a_c (log a_c - log b_c)`` from log-probabilities ``[N, K]``.

    Entries where the teacher probability is 0 (or ``present`` is False) contribute exactly 0, as in
    ``kl_div``'s ``xlogy``. The difference is zeroed BEFORE the product so that no ``0 * inf`` can
    appear in the forward or the backward pass (the teacher side can carry gradient in DTKD).
    """
    teacher_prob = log_teacher.exp()
    keep = teacher_prob > 0 if present is None else present & (teacher_prob > 0)
    difference = torch.where(keep, log_teacher - log_student, torch.zeros_like(log_student))
    return (teacher_prob * difference).sum(-1)


def masked_mean(rows: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``rows [..., N]`` over the valid positions of the last dim (0 when none is valid).

    ``torch.where`` rather than a product, so that a NaN in an ignored position stays out; no sync.
    """
    if valid is None:
        return rows.mean(dim=-1)
    kept = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    return kept.sum(dim=-1) / valid.sum().clamp(min=1)


def scale_rows(rows: torch.Tensor, scale: Temperature) -> torch.Tensor:
    """``rows [N]`` times a float or a ``[N, 1]`` / ``[1, 1]`` column."""
    if isinstance(scale, torch.Tensor):
        return rows * scale.reshape(-1)
    return rows * scale
