"""Pure loss functions of KD, DKD, DTKD and DeepKD's dynamic top-k mask (spec: METHODS.md).

Conventions shared by every function:

- logits ``[..., C]`` (student and teacher of identical shape), targets ``[...]`` of class indices;
  all leading positions are flattened to ``N`` rows. Positions whose target equals ``ignore_index``
  are excluded: every loss is the mean over the kept positions (0 when none is kept).
- Arithmetic runs in float32 even under autocast (half / bfloat16 inputs are upcast, autocast is
  turned off inside); float64 inputs stay float64.
- The teacher's logits are detached: no gradient ever reaches them.
- ``validate=True`` checks target ranges and tensor temperatures; these checks read tensor values
  (one host sync each), so a hot loop that has validated its data may pass ``validate=False``.
  Shape and float-temperature checks are free and always run.
- Temperatures are floats or per-sample tensors (``[..., 1]`` or ``[...]``). ``teacher_temperature``
  (default: the student's) lets the teacher softmax run at its own temperature; the KL of a row is
  then scaled by ``temperature * teacher_temperature`` (``T^2`` when they are equal). This is how
  deepkd's DTKD+DKD decomposition (METHODS.md 5.4) uses :func:`tckd` / :func:`nckd`.
- :func:`standardize` is the logit standardisation a method applies first with ``logit_stand=True``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as torch_functional

from deepkd.losses import _core
from deepkd.losses._core import Temperature

__all__ = ["standardize", "cross_entropy", "kd", "tckd", "nckd", "dkd", "decoupled", "DecoupledTerms", "dtkd",
           "dynamic_temperatures", "dynamic_decoupled", "topk_keep_mask", "dtm_k"]


# The reference code's constant added to the standard deviation (logit standardisation).
STANDARDIZE_EPS = 1e-7


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): ``(z - mean_c z) / (std_c z + 1e-7)`` per position.

    ``[..., C]`` -> ``[..., C]``: the z-score of each position's logits over the class axis, with the
    unbiased standard deviation (``torch.std``'s default, as the reference code) and 1e-7 added to it.
    Gradients flow through the mean and the deviation (the student's side); half and bfloat16 inputs
    are computed in float32, float64 stays float64. Needs C >= 2 (one class has no deviation).
    """
    if logits.dim() < 1 or logits.shape[-1] < 2:
        raise ValueError(f"logit standardisation needs logits [..., C] with C >= 2, got {tuple(logits.shape)}")
    with _core.full_precision(logits.device):
        z = logits.to(_core.compute_dtype(logits))
        return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + STANDARDIZE_EPS)


def cross_entropy(student: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                  validate: bool = True) -> torch.Tensor:
    """``mean over kept positions of -log softmax(student)[target]``; ``[..., C]``, ``[...]`` -> scalar."""
    _core.check_target(student, target, ignore_index, validate)
    with _core.full_precision(student.device):
        logits = student.to(_core.compute_dtype(student)).reshape(-1, student.shape[-1])
        safe, valid = _core.flatten_target(target, ignore_index)
        rows = -torch_functional.log_softmax(logits, dim=-1).gather(1, safe.unsqueeze(1)).squeeze(1)
        return _core.masked_mean(rows, valid)


def kd(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 4.0,
       target: Optional[torch.Tensor] = None, ignore_index: int = -100,
       validate: bool = True) -> torch.Tensor:
    """Hinton KD: ``T^2 * mean_b KL(softmax(zt/T) || softmax(zs/T))`` -> scalar.

    Averages over all leading positions; when ``target`` is given, positions whose target equals
    ``ignore_index`` are left out (the target is otherwise unused).
    """
    _core.check_pair(student, teacher)
    _core.check_temperature(temperature)
    with _core.full_precision(student.device):
        zs, zt = _core.flatten_pair(student, teacher)
        valid = _valid_rows(student, target, ignore_index, validate)
        rows = _core.kl_rows(torch_functional.log_softmax(zt / temperature, dim=-1),
                             torch_functional.log_softmax(zs / temperature, dim=-1))
        return _core.masked_mean(rows, valid) * (temperature * temperature)


class DecoupledTerms(NamedTuple):
    """DKD's decomposition averaged over kept positions (all scalars).

    ``tckd``: scale * KL(b_t || b_s); ``nckd``: scale * KL(q_t || q_s); ``weighted_nckd``:
    scale * (1 - p_t,y) * KL(q_t || q_s) (the paper's per-sample DeepKD-KD form);
    ``teacher_target_prob``: mean p_t,y at the teacher's temperature (no gradient).
    """

    tckd: torch.Tensor
    nckd: torch.Tensor
    weighted_nckd: torch.Tensor
    teacher_target_prob: torch.Tensor


def decoupled(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *,
              temperature: Temperature = 4.0, teacher_temperature: Optional[Temperature] = None,
              keep: Optional[torch.Tensor] = None, ignore_index: int = -100,
              validate: bool = True) -> DecoupledTerms:
    """TCKD and NCKD from one pass over the softmaxes (what the DKD/DeepKD modules call).

    Per row, with ``p = softmax(z / T)``: ``b = [p_y, sum_{c != y} p_c]`` and ``q`` = softmax over
    the non-target classes kept by ``keep`` (bool ``[..., C]``, True = kept; None = all).
    ``KL(p_t||p_s) = KL(b_t||b_s) + (1 - p_t,y) KL(q_t||q_s)`` holds when nothing is masked.
    """
    _core.check_classes(student.shape[-1])
    zs, zt, safe, valid, scale = _decoupled_inputs(
        student, teacher, target, temperature, teacher_temperature, ignore_index, validate)
    with _core.full_precision(student.device):
        tckd_rows, nckd_rows, teacher_target_prob = _decoupled_rows(zs, zt, safe, _flat_keep(keep, student))
        nckd_rows = _core.scale_rows(nckd_rows, scale)
        rows = torch.stack([_core.scale_rows(tckd_rows, scale), nckd_rows,
                            (1 - teacher_target_prob) * nckd_rows, teacher_target_prob.detach()])
        return DecoupledTerms(*_core.masked_mean(rows, valid).unbind(0))  # one reduction for all four


def tckd(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *,
         temperature: Temperature = 4.0, teacher_temperature: Optional[Temperature] = None,
         ignore_index: int = -100, validate: bool = True) -> torch.Tensor:
    """Target-class KD: ``T^2 * mean_b KL(b_t || b_s)``, ``b = [p_y, 1 - p_y]`` -> scalar.

    NOTE(paper): the reference code takes the log of the SUMMED student probabilities (not a
    log-softmax over two logits). deepkd computes that same log as a log-sum-exp over the
    non-target logits minus the full one (see ``_decoupled_rows``): the identical number, without
    the underflow to ``log(0)`` that the sum of probabilities suffers for very confident rows.
    """
    zs, zt, safe, valid, scale = _decoupled_inputs(
        student, teacher, target, temperature, teacher_temperature, ignore_index, validate)
    with _core.full_precision(student.device):
        rows, _, _ = _decoupled_rows(zs, zt, safe, None)
        return _core.masked_mean(_core.scale_rows(rows, scale), valid)


def nckd(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *,
         temperature: Temperature = 4.0, keep: Optional[torch.Tensor] = None,
         teacher_temperature: Optional[Temperature] = None, ignore_index: int = -100,
         validate: bool = True) -> torch.Tensor:
    """Non-target-class KD: ``T^2 * mean_b KL(q_t || q_s)`` -> scalar (needs C >= 3).

    ``q`` is the softmax over the non-target classes; ``keep`` (bool ``[..., C]``, True = kept, see
    :func:`topk_keep_mask`) further restricts it to a subset, applied to teacher and student alike.
    NOTE(paper): the reference code removes classes by subtracting 1000 from their logits after
    dividing by T; deepkd removes them exactly (see ``_decoupled_rows``), which is equal to float
    precision and cannot leak probability for extreme logits. A row keeping no class gives 0.
    """
    _core.check_classes(student.shape[-1])
    zs, zt, safe, valid, scale = _decoupled_inputs(
        student, teacher, target, temperature, teacher_temperature, ignore_index, validate)
    with _core.full_precision(student.device):
        _, rows, _ = _decoupled_rows(zs, zt, safe, _flat_keep(keep, student))
        return _core.masked_mean(_core.scale_rows(rows, scale), valid)


def dkd(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *, alpha: float = 1.0,
        beta: float = 8.0, temperature: float = 4.0, ignore_index: int = -100,
        validate: bool = True) -> torch.Tensor:
    """Decoupled KD: ``alpha * tckd + beta * nckd`` (no CE, no warm-up) -> scalar."""
    terms = decoupled(student, teacher, target, temperature=temperature,
                      ignore_index=ignore_index, validate=validate)
    return alpha * terms.tckd + beta * terms.nckd


def dynamic_temperatures(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 4.0,
                         guard: bool = False, target: Optional[torch.Tensor] = None,
                         ignore_index: int = -100,
                         validate: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """DTKD's per-sample temperatures ``(T_s, T_t)``, each ``[..., 1]``.

    With ``x = max_c zt`` and ``s = max_c zs`` (signed): ``T_t = 2x/(x+s) tau``,
    ``T_s = 2s/(x+s) tau`` (``T_s + T_t = 2 tau``). ``s`` is NOT detached (reference code): the
    gradient flows through both temperatures. Positions whose ``target`` is ``ignore_index`` get
    ``tau``. Without ``guard`` a non-finite or non-positive temperature raises (checked when
    ``validate``). ``guard=True`` is deepkd's option: NaN -> tau, then both temperatures are
    clamped to ``[tau/4, 4 tau]`` (the gradient through a clamped temperature is 0).
    """
    _core.check_pair(student, teacher)
    _core.check_temperature(temperature)
    with _core.full_precision(student.device):
        dtype = _core.compute_dtype(student, teacher)
        student_max = student.to(dtype).amax(dim=-1, keepdim=True)
        teacher_max = teacher.detach().to(dtype).amax(dim=-1, keepdim=True)
        total = teacher_max + student_max
        student_temperature = 2 * student_max / total * temperature
        teacher_temperature = 2 * teacher_max / total * temperature
        if target is not None:
            # Ignored positions (padding) get tau: their logits may be anything, and a NaN there
            # would still poison the backward pass through the masked mean.
            _core.check_target(student, target, ignore_index, validate=False)
            ignored = (target == ignore_index).unsqueeze(-1)
            student_temperature = student_temperature.masked_fill(ignored, temperature)
            teacher_temperature = teacher_temperature.masked_fill(ignored, temperature)
        if guard:
            low, high = temperature / 4, temperature * 4
            student_temperature, teacher_temperature = (
                torch.nan_to_num(t, nan=temperature, posinf=high, neginf=low).clamp(low, high)
                for t in (student_temperature, teacher_temperature))
        elif validate:
            _check_dynamic(student_temperature, teacher_temperature)
        return student_temperature, teacher_temperature


def dtkd(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 4.0,
         alpha: float = 3.0, beta: float = 1.0, guard: bool = False,
         target: Optional[torch.Tensor] = None, ignore_index: int = -100,
         validate: bool = True) -> torch.Tensor:
    """DTKD: ``alpha * mean_b[T_t T_s KL(softmax(zt/T_t) || softmax(zs/T_s))] + beta * kd(tau)``.

    Temperatures from :func:`dynamic_temperatures` (``temperature`` is tau). No CE, no warm-up.
    ``target`` is only used to leave out ``ignore_index`` positions.
    """
    student_temperature, teacher_temperature = dynamic_temperatures(
        student, teacher, temperature=temperature, guard=guard, target=target,
        ignore_index=ignore_index, validate=validate)
    with _core.full_precision(student.device):
        zs, zt = _core.flatten_pair(student, teacher)
        student_temperature = _core.as_rows(student_temperature, zs.shape[0], zs.dtype)
        teacher_temperature = _core.as_rows(teacher_temperature, zs.shape[0], zs.dtype)
        valid = _valid_rows(student, target, ignore_index, validate)
        rows = _core.kl_rows(torch_functional.log_softmax(zt / teacher_temperature, dim=-1),
                             torch_functional.log_softmax(zs / student_temperature, dim=-1))
        scale = teacher_temperature * student_temperature
        dynamic = _core.masked_mean(_core.scale_rows(rows, scale), valid)
        fixed = _core.kl_rows(torch_functional.log_softmax(zt / temperature, dim=-1),
                              torch_functional.log_softmax(zs / temperature, dim=-1))
        fixed = _core.masked_mean(fixed, valid) * (temperature * temperature)
        return alpha * dynamic + beta * fixed


def dynamic_decoupled(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *,
                      temperature: float = 4.0, guard: bool = False,
                      keep: Optional[torch.Tensor] = None, ignore_index: int = -100,
                      validate: bool = True) -> DecoupledTerms:
    """deepkd's DTKD+DKD (METHODS.md 5.4): :func:`decoupled` at DTKD's per-sample temperatures.

    Per row: teacher softmax at ``T_t``, student at ``T_s`` (:func:`dynamic_temperatures`, tau =
    ``temperature``), each KL scaled by ``T_t * T_s``. Not in any reference code (deepkd's own).
    """
    student_temperature, teacher_temperature = dynamic_temperatures(
        student, teacher, temperature=temperature, guard=guard, target=target,
        ignore_index=ignore_index, validate=validate)
    return decoupled(student, teacher, target, temperature=student_temperature,
                     teacher_temperature=teacher_temperature, keep=keep, ignore_index=ignore_index,
                     validate=validate)


def topk_keep_mask(teacher: torch.Tensor, target: torch.Tensor, k: int, *, count_target: bool = False,
                   ignore_index: int = -100) -> torch.Tensor:
    """DeepKD's dynamic top-k mask: bool ``[..., C]``, True = non-target class kept (target False).

    Classes are ranked by the teacher logits. ``count_target=False`` (deepkd's default) keeps the
    K highest non-target classes. ``count_target=True`` is the reference code: keep the top K of all
    classes, then drop the target (K-1 non-target classes when the teacher ranks the target in its
    top K). ``k == 0`` or ``k >= C - 1`` keeps every non-target class (no masking). Rows whose
    target is ``ignore_index`` rank all classes.
    """
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    _core.check_target(teacher, target, ignore_index, validate=False)
    classes = teacher.shape[-1]
    safe, valid = _core.flatten_target(target, ignore_index)
    is_target = _core.target_mask(safe, classes) & valid.unsqueeze(1)
    if k == 0 or k >= classes - 1:
        return (~is_target).reshape(teacher.shape)
    scores = teacher.detach().reshape(-1, classes)
    if not count_target:
        scores = scores.masked_fill(is_target, float("-inf"))
    chosen = scores.topk(int(k), dim=-1).indices
    keep = torch.zeros_like(is_target).scatter_(1, chosen, True)
    return (keep & ~is_target).reshape(teacher.shape)


def dtm_k(epoch: int, num_classes: int, *, start_fraction: float = 0.05, ramp_start: int,
          ramp_end: int) -> int:
    """DeepKD's K schedule (METHODS.md 4.2): ``K0`` until ``ramp_start``, linear to C, C after ``ramp_end``.

    ``K0 = ceil(start_fraction * C)`` (at least 1), the product rounded to 9 decimals first so that
    0.05 * 100 gives 5, not 6 (CIFAR-100: 5, ImageNet: 50). For ``ramp_start < e < ramp_end``:
    ``K = K0 + (C - K0)(e - ramp_start)/(ramp_end - ramp_start)`` rounded half up; ``K = C`` from
    ``ramp_end`` on. The phase boundaries are deepkd's choice (the paper publishes none): a method's
    ramp_start defaults to its warm-up epochs (``DynamicTopK``); ramp_end has no default, each
    recipe states it (deepkd's choice, e.g. the first LR decay).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0 < start_fraction <= 1:
        raise ValueError(f"start_fraction must be in (0, 1], got {start_fraction}")
    first = max(1, math.ceil(round(start_fraction * num_classes, 9)))
    if epoch <= ramp_start:
        return first
    if epoch >= ramp_end:
        return num_classes
    progress = (epoch - ramp_start) / (ramp_end - ramp_start)
    return min(num_classes, int(math.floor(first + (num_classes - first) * progress + 0.5)))


def _valid_rows(logits: torch.Tensor, target: Optional[torch.Tensor], ignore_index: int,
                validate: bool) -> Optional[torch.Tensor]:
    if target is None:
        return None
    _core.check_target(logits, target, ignore_index, validate)
    return target.reshape(-1) != ignore_index


def _decoupled_inputs(student, teacher, target, temperature, teacher_temperature, ignore_index,
                      validate):
    """Checks and flattens; returns ``zs / T_s``, ``zt / T_t`` ``[N, C]``, safe target, valid, scale."""
    _core.check_pair(student, teacher)
    _core.check_target(student, target, ignore_index, validate)
    teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    _core.check_temperature(temperature, "temperature", validate)
    _core.check_temperature(teacher_temperature, "teacher_temperature", validate)
    zs, zt = _core.flatten_pair(student, teacher)
    safe, valid = _core.flatten_target(target, ignore_index)
    student_temperature = _core.as_rows(temperature, zs.shape[0], zs.dtype)
    teacher_temperature = _core.as_rows(teacher_temperature, zs.shape[0], zs.dtype)
    scale = student_temperature * teacher_temperature
    return zs / student_temperature, zt / teacher_temperature, safe, valid, scale


def _decoupled_rows(zs: torch.Tensor, zt: torch.Tensor, target: torch.Tensor,
                    keep: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row KL(b_t || b_s), KL(q_t || q_s) and p_t,y, each ``[N]``, from ``z / T`` ``[N, C]``.

    One exponential per distribution: ``L = log sum_{c kept} exp(z_c)`` over the non-target
    classes, ``q_c = exp(z_c - L)``; the binary pair is ``log p_y = z_y - logaddexp(L, z_y)`` and
    ``log sum_{c != y} p_c = L - logaddexp(L, z_y)`` (the reference's log of summed probabilities,
    computed without underflow). NOTE(paper): the reference code removes classes by subtracting
    1000 from their logits; here they are removed exactly (-inf, zero teacher weight). With
    ``count_target=True`` and K = 1 a row can keep no class; the reference then subtracts 1000 from
    every logit (removing nothing, so it distils the full distribution); deepkd makes such a row
    contribute 0 to NCKD, as there is no non-target distribution to match.
    """
    index = target.unsqueeze(1)
    target_s, target_t = zs.gather(1, index).squeeze(1), zt.gather(1, index).squeeze(1)
    rest_exp_s, rest_s = _shifted_exp(zs.scatter(1, index, float("-inf")))
    rest_exp_t, rest_t = _shifted_exp(zt.scatter(1, index, float("-inf")))
    all_s, all_t = torch.logaddexp(rest_s, target_s), torch.logaddexp(rest_t, target_t)
    log_binary_s = torch.stack([target_s - all_s, rest_s - all_s], dim=-1)
    log_binary_t = torch.stack([target_t - all_t, rest_t - all_t], dim=-1)
    tckd_rows = _core.kl_rows(log_binary_t, log_binary_s)
    kept_exp_t, kept_s, kept_t, kept_any = rest_exp_t, rest_s, rest_t, None
    if keep is not None:
        kept = keep.scatter(1, index, False)
        kept_any = kept.any(dim=-1, keepdim=True)
        removed = ~kept & kept_any  # an empty row is left unmasked, then zeroed below
        _, kept_s = _shifted_exp(zs.masked_fill(removed, float("-inf")))
        kept_exp_t, kept_t = _shifted_exp(zt.masked_fill(removed, float("-inf")))
    teacher_q = kept_exp_t / kept_exp_t.sum(dim=-1, keepdim=True)
    # log q_t - log q_s from the unmasked logits: finite at removed classes, where q_t is 0.
    difference = (zt - zs) - (kept_t - kept_s).unsqueeze(1)
    difference = difference.masked_fill(teacher_q == 0, 0.0)  # +-inf logits: no 0 * inf
    nckd_rows = (teacher_q * difference).sum(dim=-1)
    if kept_any is not None:
        nckd_rows = nckd_rows.masked_fill(~kept_any.squeeze(1), 0.0)
    return tckd_rows, nckd_rows, log_binary_t[:, 0].exp()


def _shifted_exp(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(exp(z - m), log sum_c exp(z_c))`` for ``[N, C]`` logits, ``m`` the (detached) row max.

    The shift cancels in value and gradient; it keeps the largest term at exp(0) = 1, so the sum
    never underflows. A row of only -inf gives zeros and -inf.
    """
    shift = logits.detach().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(logits.dtype).min)
    shifted = (logits - shift).exp()
    return shifted, shifted.sum(dim=-1).log() + shift.squeeze(-1)


def _flat_keep(keep: Optional[torch.Tensor], logits: torch.Tensor) -> Optional[torch.Tensor]:
    if keep is None:
        return None
    if keep.shape != logits.shape or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool mask of the logits' shape {tuple(logits.shape)}, got "
                         f"{keep.dtype} {tuple(keep.shape)}")
    return keep.reshape(-1, logits.shape[-1])


def _check_dynamic(student_temperature: torch.Tensor, teacher_temperature: torch.Tensor) -> None:
    bad = (~torch.isfinite(student_temperature) | ~torch.isfinite(teacher_temperature)
           | (student_temperature <= 0) | (teacher_temperature <= 0))
    count = int(bad.sum())
    if count:
        raise ValueError(f"DTKD's dynamic temperatures are non-finite or non-positive at {count} "
                         f"position(s) (teacher and student max logits of opposite signs or summing "
                         f"to <= 0); pass guard=True to clamp them to [tau/4, 4 tau]")
