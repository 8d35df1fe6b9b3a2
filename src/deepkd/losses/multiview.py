"""Helpers shared by the two-view methods MLKD and CRLD (spec: MLKD_CRLD.md).

Their logits are ``[2, B, C]`` (0: weak view, 1: strong view), target ``[B]``. This module holds:

- input and option checks (:func:`check_views`, :func:`check_choice`, :func:`check_group_size`);
- :func:`grouped`: a loss computed per group of consecutive samples and averaged over the groups, as
  the reference's ``DataParallel`` replicas compute it (MLKD_CRLD.md 4.5, option D4);
- the teacher masks' arithmetic (:func:`median_mask`, :func:`sample_weighting`);
- MLKD's correlation terms CC and BC (:func:`class_correlation`, :func:`batch_correlation`);
- sums over several temperatures of ``functional.kd`` and ``functional.decoupled``.

Arithmetic runs in float32 for half inputs, float64 stays float64 (as in ``functional``); the
teacher's logits are detached.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from deepkd.losses import _core
from deepkd.losses import functional as F
from deepkd.losses.base import LossTerm

WEAK, STRONG = 0, 1
# The target value that drops a row from a functional loss's mean (its ignore_index default).
DROPPED = -100


def check_views(name: str, student: torch.Tensor, teacher: Optional[torch.Tensor], target: torch.Tensor) -> None:
    """Raise unless the logits are ``[2, B, C]`` (weak, strong) with ``target [B]``."""
    if student.dim() != 3 or student.shape[0] != 2:
        raise ValueError(f"{name} takes logits of shape [2, B, C] (weak and strong views), "
                         f"got {tuple(student.shape)}")
    if teacher is None or teacher.shape != student.shape:
        shape = None if teacher is None else tuple(teacher.shape)
        raise ValueError(f"{name} needs teacher logits of the student's shape {tuple(student.shape)}, got {shape}")
    if target.shape != student.shape[1:2]:
        raise ValueError(f"{name} needs a target of shape [B] = {tuple(student.shape[1:2])}, "
                         f"got {tuple(target.shape)}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_group_size(size: Optional[int]) -> None:
    """``correlation_group_size`` is None (the whole batch) or a positive integer."""
    if size is not None and (isinstance(size, bool) or int(size) != size or size < 1):
        raise ValueError(f"correlation_group_size must be None or a positive integer, got {size!r}")


def grouped(loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Dict[str, LossTerm]],
            student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
            size: Optional[int]) -> Dict[str, LossTerm]:
    """``loss(student, teacher, target)`` on each group of ``size`` consecutive samples, each term
    averaged over the groups with equal weights (a short last group counts fully, as a short
    ``DataParallel`` replica would); ``size`` None or >= B: the whole batch at once."""
    if size is None or size >= target.shape[0]:
        return loss(student, teacher, target)
    parts = [loss(*group) for group in zip(student.split(size, 1), teacher.split(size, 1), target.split(size))]
    return {name: LossTerm(torch.stack([part[name].value for part in parts]).mean(), term.stream)
            for name, term in parts[0].items()}


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """``softmax(logits)`` at T = 1 in the compute dtype, without gradient (what the masks read)."""
    with _core.full_precision(logits.device):
        return torch.softmax(logits.detach().to(_core.compute_dtype(logits)), dim=-1)


def median_mask(values: torch.Tensor) -> torch.Tensor:
    """``values <= median(values)`` for ``[N]`` values: the median is ``torch.quantile(., 0.5)``,
    i.e. numpy's ``percentile(., 50)`` with linear interpolation, on the device (no host sync)."""
    return values <= torch.quantile(values, 0.5)


def sample_weighting(mask: torch.Tensor, target: torch.Tensor, per_sample: bool,
                     dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(f, target')`` such that ``f * L(target')`` is the masked loss, ``L`` a functional loss.

    ``f = mean(mask)`` (no gradient). Fraction mode (the reference's ``(scalar * mask).mean()``):
    ``target' = target``, so ``f * L`` is ``f`` times the batch mean. Per-sample mode: the masked-out
    rows get ``DROPPED``, so ``L`` averages the kept rows only and ``f * L = mean_b(mask_b loss_b)``
    over all B (0 when nothing is kept).
    """
    fraction = mask.to(dtype).mean()
    return fraction, (target.masked_fill(~mask, DROPPED) if per_sample else target)


def _temperature_column(like: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """``[nT, 1, 1]`` temperatures on ``like``'s device, built there (no host-to-device copy)."""
    dtype = _core.compute_dtype(like)
    return torch.cat([torch.full((1, 1, 1), float(t), dtype=dtype, device=like.device) for t in temperatures])


def _correlation_probabilities(student, teacher, temperatures):
    """``softmax(z / T)`` ``[nT, B, C]`` for every temperature (teacher detached, compute dtype)."""
    column = _temperature_column(student, temperatures)
    zs, zt = _core.flatten_pair(student, teacher)
    return torch.softmax(zs / column, dim=-1), torch.softmax(zt / column, dim=-1)


def _correlation(gram_difference: torch.Tensor, divisor: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``sum_T sum_ij D_ij^2 / divisor`` or, with ``mask``, ``sum_T mean_ij(D_ij^2 / divisor * mask_j)``."""
    squared = gram_difference.square() / divisor
    if mask is None:
        return squared.sum()
    return (squared * mask.to(squared.dtype)).mean(dim=(1, 2)).sum()


def class_correlation(student: torch.Tensor, teacher: torch.Tensor, temperatures: Sequence[float],
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MLKD's class-level loss ``sum_T CC``, ``CC = sum_ij (G_t - G_s)^2_ij / C``, ``G = P^T P`` [C, C],
    ``P = softmax(z / T)`` of ``[B, C]`` logits.

    ``mask`` (bool ``[C]``) gives the per-sample reading of the reference (``reduce=False``, our
    reading, MLKD_CRLD.md 6.2 M1): the mask scales the matrix's columns (or rows: the matrix is
    symmetric), then the mean over all C^2 entries is taken (a C^2 times smaller scale than the
    reduced form).
    """
    with _core.full_precision(student.device):
        ps, pt = _correlation_probabilities(student, teacher, temperatures)
        difference = pt.transpose(1, 2) @ pt - ps.transpose(1, 2) @ ps
        return _correlation(difference, student.shape[-1], mask)


def batch_correlation(student: torch.Tensor, teacher: torch.Tensor, temperatures: Sequence[float],
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MLKD's batch-level loss ``sum_T BC``, ``BC = sum_ab (H_t - H_s)^2_ab / B``, ``H = P P^T`` [B, B].

    ``mask`` (bool ``[B]``): the per-sample reading, as in :func:`class_correlation` (columns, mean
    over the B^2 entries).
    """
    with _core.full_precision(student.device):
        ps, pt = _correlation_probabilities(student, teacher, temperatures)
        difference = pt @ pt.transpose(1, 2) - ps @ ps.transpose(1, 2)
        return _correlation(difference, student.shape[-2], mask)


def kd_sum(student: torch.Tensor, teacher: torch.Tensor, temperatures: Sequence[float],
           target: torch.Tensor) -> torch.Tensor:
    """``sum_T F.kd(student, teacher, T)`` over the rows whose target is not ``DROPPED``."""
    return torch.stack([F.kd(student, teacher, temperature=t, target=target, validate=False)
                        for t in temperatures]).sum()


def decoupled_sum(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
                  temperatures: Sequence[float], keep: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sum_T TCKD_T, sum_T NCKD_T)`` for ``[B, C]`` logits, each a mean over the rows whose target
    is not ``DROPPED``; ``keep``: the dynamic top-k mask ``[B, C]`` or None.

    One call to ``F.decoupled``: the temperatures ride a leading axis as per-sample temperatures,
    so its mean over the ``nT * B`` rows times ``nT`` is the sum over T of the batch means.
    """
    count, batch = len(temperatures), target.shape[0]

    def stacked(x):
        return x.unsqueeze(0).expand(count, *x.shape)

    column = _temperature_column(student, temperatures).expand(count, batch, 1)
    terms = F.decoupled(stacked(student), stacked(teacher), stacked(target), temperature=column,
                        keep=None if keep is None else stacked(keep), validate=False)
    return terms.tckd * count, terms.nckd * count
