"""``ctkd``: Curriculum Temperature for Knowledge Distillation (Li et al., AAAI 2023) on a KD, DKD or
DTKD base.

A learnable temperature replaces the base method's fixed one at every step. It is trained with the
student, by the same optimizer, but through a gradient-reversal layer (GRL): the forward pass is the
identity, the backward pass multiplies the gradient by ``-lambda``, so the temperature ascends the
distillation loss while the student descends it. ``lambda`` follows an easy-to-hard cosine curriculum
over the epochs ``e`` (counted from 1)::

    lambda(e) = lambda_min + (lambda_max - lambda_min) (1 - cos(pi min(e, E) / E)) / 2,   E = cos_epochs
    T         = t_start + t_end * sigmoid(GRL_lambda(e)(r))

``r`` is the temperature module's output: ``temperature_module="global"`` one learnable scalar,
initialised to 1 (so T starts at 1 + 20 sigmoid(1) = 15.62 and stays in (t_start, t_start + t_end)
= (1, 21)); ``"instance"`` one value per sample from a two-layer MLP on the concatenated teacher and
student logits ``[zt, zs]`` (``Linear(2C, hidden_size) - ReLU - Linear(hidden_size, 1)``).

What the temperature replaces: ``kd``'s T (softmax and T^2 scale); ``dkd``'s T (TCKD and NCKD);
``dtkd``'s tau, i.e. the fixed-temperature term's T and the centre of the per-sample temperatures
``T_s = 2s/(x+s) tau``, ``T_t = 2x/(x+s) tau`` (so ``T_s + T_t = 2T`` with the learned T). The terms,
streams, weights, warm-up and options (``logit_stand``, ``topk*``, ``guard``) are the base method's.

Defaults, the reference's CIFAR-100 command line (``scripts/run_cifar_distill.sh``): global module,
t_start 1, t_end 20, lambda 0 -> 1 over 10 epochs (ImageNet: ``cos_epochs: 5``, ce_weight 1 and
kd_weight 1), the base's own defaults otherwise, and no warm-up (``warmup_epochs: 0``, as the
reference KD and DKD losses have none). NOTE(paper): the reference passes ``lambda`` with its sign
(from 0 down to -1) to a layer that multiplies the gradient by it; the paper's lambda rises from 0 to
1 into a layer that negates: the same gradient. The instance-wise code is not in the reference
repository (only on a cloud drive): the MLP's shape, ``hidden_size`` 256 and the detached inputs
(the temperature must not feed gradient back into the student) are deepkd's choices.

The temperature module is a submodule: the trainer optimizes it after the student with the same
learning rate and weight decay (as the reference's single SGD over student and module) and
checkpoints it. With logit standardisation (the base's ``logit_stand: true``), the
logit-standardisation code's CTKD rows keep this module and set kd_weight 9 (ce_weight 0.1). The
base is chosen by ``base_method``, not ``base``: a builder taking ``base`` is a DeepKD method to the
trainer, which then refuses plain SGD.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as torch_functional
from torch import nn

from deepkd.errors import ConfigError
from deepkd.losses import _core
from deepkd.losses import functional as F
from deepkd.losses.base import LossTerm, Method, warmup_factor
from deepkd.losses.common import cross_entropy_and_mask, decoupled_terms, distillation_logits
from deepkd.losses.registry import METHODS, register_method
from deepkd.registry import closest

BASES = ("kd", "dkd", "dtkd")
MODULES = ("global", "instance")
# The global temperature parameter's initial value (reference: torch.ones(1)).
GLOBAL_INIT = 1.0


def curriculum_lambda(epoch: int, *, lambda_min: float = 0.0, lambda_max: float = 1.0, cos_epochs: int = 10) -> float:
    """The GRL strength at ``epoch`` (from 1): ``lambda_min`` at epoch 0 rising on a half cosine to
    ``lambda_max`` at ``cos_epochs``, constant after (epochs below 0 count as 0)."""
    progress = min(max(epoch, 0), cos_epochs) / cos_epochs
    return lambda_min + (lambda_max - lambda_min) * (1.0 - math.cos(math.pi * progress)) / 2.0


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * -ctx.strength, None


def reverse_gradient(x: torch.Tensor, strength: float) -> torch.Tensor:
    """The gradient-reversal layer (Ganin & Lempitsky, 2015): ``x`` forward, ``-strength * grad`` backward."""
    return _ReverseGradient.apply(x, float(strength))


class GlobalTemperature(nn.Module):
    """One learnable value for every sample: ``[1]``, the logits unused."""

    def __init__(self):
        super().__init__()
        self.raw = nn.Parameter(torch.full((1,), GLOBAL_INIT))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, strength: float) -> torch.Tensor:
        return reverse_gradient(self.raw, strength)


class InstanceTemperature(nn.Module):
    """One value per position from an MLP on ``[zt, zs]`` (detached): ``[..., C]`` logits -> ``[N, 1]``."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 1))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, strength: float) -> torch.Tensor:
        if student.shape[-1] != self.num_classes:
            raise ConfigError(f"ctkd: the instance temperature was built for num_classes={self.num_classes}, "
                              f"the logits have {student.shape[-1]} classes")
        dtype = self.mlp[0].weight.dtype
        with _core.full_precision(student.device):
            inputs = torch.cat([teacher.detach(), student.detach()], dim=-1).reshape(-1, 2 * self.num_classes)
            return reverse_gradient(self.mlp(inputs.to(dtype)), strength)


class CTKD(Method):
    """The base method ``base`` (a built ``kd``, ``dkd`` or ``dtkd``) at the learned temperature; its
    terms (see the module docstring). ``learned_temperature`` is the trained (and checkpointed) module."""

    def __init__(self, base: Method, base_method: str, learned_temperature: nn.Module, *, t_start: float,
                 t_end: float, lambda_min: float, lambda_max: float, cos_epochs: int):
        super().__init__()
        self.base, self.base_method, self.learned_temperature = base, base_method, learned_temperature
        self.t_start, self.t_end = t_start, t_end
        self.lambda_min, self.lambda_max, self.cos_epochs = lambda_min, lambda_max, cos_epochs

    def strength(self, epoch: int) -> float:
        """The GRL strength lambda at ``epoch`` (:func:`curriculum_lambda`)."""
        return curriculum_lambda(epoch, lambda_min=self.lambda_min, lambda_max=self.lambda_max,
                                 cos_epochs=self.cos_epochs)

    def temperature(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, epoch: int) -> torch.Tensor:
        """``T = t_start + t_end sigmoid(GRL(r))``: ``[1]`` (global) or ``[N, 1]`` (instance)."""
        raw = self.learned_temperature(student_logits, teacher_logits, self.strength(epoch))
        return self.t_start + self.t_end * torch.sigmoid(raw)

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                target: torch.Tensor, *, epoch: int) -> Dict[str, LossTerm]:
        """Logits ``[..., C]``, target ``[...]`` -> the base method's scalar terms at the learned T."""
        temperature = self.temperature(student_logits, teacher_logits, epoch)
        return self.terms_at(student_logits, teacher_logits, target, temperature, epoch=epoch)

    def terms_at(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                 temperature: torch.Tensor, *, epoch: int) -> Dict[str, LossTerm]:
        """The base method's terms at ``temperature`` (one value, or one per position)."""
        return _TERMS[self.base_method](self.base, student_logits, teacher_logits, target,
                                        temperature.reshape(-1, 1), epoch)

    def topk(self, epoch: int) -> Optional[int]:
        return self.base.topk(epoch)


def _kl_mean(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, ignore_index: int,
             student_temperature: torch.Tensor, teacher_temperature: torch.Tensor) -> torch.Tensor:
    """``mean over kept positions of T_s T_t KL(softmax(zt / T_t) || softmax(zs / T_s))``; the
    temperatures ``[1, 1]`` or ``[N, 1]`` (per position)."""
    with _core.full_precision(student.device):
        zs, zt = _core.flatten_pair(student, teacher)
        rows_count = zs.shape[0]
        t_s = _core.as_rows(student_temperature, rows_count, zs.dtype)
        t_t = _core.as_rows(teacher_temperature, rows_count, zs.dtype)
        rows = _core.kl_rows(torch_functional.log_softmax(zt / t_t, dim=-1),
                             torch_functional.log_softmax(zs / t_s, dim=-1))
        return _core.masked_mean(_core.scale_rows(rows, t_s * t_t), target.reshape(-1) != ignore_index)


def _kd_terms(base, student_logits, teacher_logits, target, temperature, epoch) -> Dict[str, LossTerm]:
    ce = F.cross_entropy(student_logits, target, ignore_index=base.ignore_index, validate=False)
    student, teacher = distillation_logits(base, student_logits, teacher_logits)
    distill = _kl_mean(student, teacher, target, base.ignore_index, temperature, temperature)
    weight = warmup_factor(epoch, base.warmup_epochs) * base.kd_weight
    return {"ce": LossTerm(base.ce_weight * ce, "task"), "kd": LossTerm(weight * distill, "target")}


def _dkd_terms(base, student_logits, teacher_logits, target, temperature, epoch) -> Dict[str, LossTerm]:
    student, teacher = distillation_logits(base, student_logits, teacher_logits)
    ce, keep = cross_entropy_and_mask(base, student_logits, teacher, target, epoch)
    terms = F.decoupled(student, teacher, target, temperature=temperature, keep=keep,
                        ignore_index=base.ignore_index, validate=False)
    weight = warmup_factor(epoch, base.warmup_epochs)
    return decoupled_terms(ce, terms.tckd, terms.nckd, ce_weight=base.ce_weight, tckd_weight=weight * base.alpha,
                           nckd_weight=weight * base.beta)


def _dtkd_terms(base, student_logits, teacher_logits, target, temperature, epoch) -> Dict[str, LossTerm]:
    """DTKD with tau = the learned T: its per-sample temperatures are linear in tau (their guard's
    clamp too: ``[tau/4, 4 tau]``), so they are DTKD's at tau = 1 times T."""
    ce = F.cross_entropy(student_logits, target, ignore_index=base.ignore_index, validate=False)
    student, teacher = distillation_logits(base, student_logits, teacher_logits)
    ratio_s, ratio_t = F.dynamic_temperatures(student, teacher, temperature=1.0, guard=base.guard, target=target,
                                              ignore_index=base.ignore_index, validate=not base.guard)
    ignore = base.ignore_index
    dynamic = _kl_mean(student, teacher, target, ignore, ratio_s.reshape(-1, 1) * temperature,
                       ratio_t.reshape(-1, 1) * temperature)
    fixed = _kl_mean(student, teacher, target, ignore, temperature, temperature)
    distill = base.alpha * dynamic + base.beta * fixed
    return {"ce": LossTerm(base.ce_weight * ce, "task"),
            "dtkd": LossTerm(warmup_factor(epoch, base.warmup_epochs) * distill, "target")}


_TERMS: Dict[str, Callable[..., Dict[str, LossTerm]]] = {"kd": _kd_terms, "dkd": _dkd_terms, "dtkd": _dtkd_terms}


def _check(base_method: str, temperature_module: str, t_start: float, t_end: float, lambda_min: float,
           lambda_max: float, cos_epochs: int, num_classes: int, hidden_size: int) -> None:
    if base_method not in BASES:
        raise ConfigError(f"ctkd: base_method must be one of {list(BASES)}, got {base_method!r}")
    if temperature_module not in MODULES:
        raise ConfigError(f"ctkd: temperature_module must be one of {list(MODULES)}, got {temperature_module!r}")
    if not (t_start > 0 and t_end >= 0):
        raise ConfigError(f"ctkd: the temperature range (t_start, t_start + t_end) needs t_start > 0 and "
                          f"t_end >= 0, got t_start={t_start}, t_end={t_end}")
    if not 0 <= lambda_min <= lambda_max:
        raise ConfigError(f"ctkd: the curriculum needs 0 <= lambda_min <= lambda_max, got {lambda_min}, {lambda_max}")
    if isinstance(cos_epochs, bool) or int(cos_epochs) != cos_epochs or cos_epochs < 1:
        raise ConfigError(f"ctkd: cos_epochs must be a positive number of epochs, got {cos_epochs!r}")
    if temperature_module == "instance" and (num_classes < 1 or hidden_size < 1):
        raise ConfigError("ctkd: the instance temperature's MLP takes both models' logits: set method.num_classes "
                          f"to the number of classes (and hidden_size >= 1), got {num_classes} and {hidden_size}")


def _build_base(base_method: str, warmup_epochs: int, arguments: Dict[str, Any]) -> Method:
    if "temperature" in arguments:
        raise ConfigError("ctkd learns the temperature (between t_start and t_start + t_end): remove "
                          "method.temperature")
    accepted = [name for name in inspect.signature(METHODS.get(base_method)).parameters if name != "temperature"]
    for key in arguments:
        if key not in accepted:
            hint = closest(key, accepted)
            near = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"ctkd with base_method {base_method!r} has no argument {key!r}{near}")
    return METHODS.build(base_method, warmup_epochs=warmup_epochs, **arguments)


@register_method("ctkd", paper="Li et al., Curriculum Temperature for Knowledge Distillation, AAAI 2023")
def ctkd(*, base_method: str = "kd", temperature_module: str = "global", t_start: float = 1.0, t_end: float = 20.0,
         lambda_min: float = 0.0, lambda_max: float = 1.0, cos_epochs: int = 10, num_classes: int = 0,
         hidden_size: int = 256, warmup_epochs: int = 0, **arguments: Any) -> CTKD:
    """CTKD on ``base_method`` ("kd", "dkd" or "dtkd"), whose other arguments (but ``temperature``)
    pass through with the base's defaults. ``temperature_module``: "global" (one value) or "instance"
    (needs ``num_classes``). T in (t_start, t_start + t_end); lambda from ``lambda_min`` to
    ``lambda_max`` over ``cos_epochs`` epochs. ``warmup_epochs`` (the base's) defaults to 0 as in the
    reference. The base is not named ``base`` (that marks a DeepKD method, which needs DeepKD's optimizer).
    """
    _check(base_method, temperature_module, t_start, t_end, lambda_min, lambda_max, cos_epochs, num_classes,
           hidden_size)
    base = _build_base(base_method, warmup_epochs, arguments)
    module = GlobalTemperature() if temperature_module == "global" else InstanceTemperature(num_classes, hidden_size)
    return CTKD(base, base_method, module, t_start=t_start, t_end=t_end, lambda_min=lambda_min,
                lambda_max=lambda_max, cos_epochs=int(cos_epochs))
