"""The ``optimizer`` and ``schedule`` sections of a recipe: one model per ``name`` (a key of another
choice is an error naming the choice that uses it).

Defaults are the builders' signatures (:class:`deepkd.optim.DecoupledMomentumSGD`,
:func:`deepkd.optim.step_lr`, :func:`deepkd.optim.cosine_lr`,
:func:`deepkd.optim.warmup_multistep_lr`); stated here is only what no builder offers: ``lr``,
``epochs`` and ``milestones`` (CIFAR's 240-epoch recipe) and plain SGD's settings (torch's own
defaults are not the recipes').
"""
from __future__ import annotations

from typing import Dict, List, Literal, Optional, Union

from pydantic import Field

from deepkd.optim import DecoupledMomentumSGD, cosine_lr, step_lr, warmup_multistep_lr
from deepkd.train.auto_config import AutoMomentumChecks, AutoMomentumConfig
from deepkd.train.schema import _choice, _default, _Strict

__all__ = ["CosineScheduleConfig", "DecoupledConfig", "MultiStepIterScheduleConfig", "OptimizerConfig",
           "SGDConfig", "ScheduleConfig", "StepScheduleConfig"]


LR = 0.05  # the CIFAR recipes' learning rate: neither optimizer's signature has a usable default
EPOCHS = 240  # CIFAR's 240-epoch recipe: the schedules take ``epochs`` without a default
Stream = Literal["task", "target", "non_target"]


class SGDConfig(_Strict):
    """``sgd``: torch.optim.SGD on the summed loss.

    A DeepKD method (``deepkd_*``) under plain SGD sums its three streams under one momentum, which
    is its base method (``deepkd_dkd`` trains DKD). That is an error unless ``allow_base_method:
    true`` says it is on purpose (e.g. the base-method row of an ablation); set on any other method
    it is an error too, since it would do nothing.
    """

    name: Literal["sgd"] = "sgd"
    lr: float = Field(LR, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False
    allow_base_method: bool = False


class DecoupledConfig(AutoMomentumChecks, _Strict):
    """``decoupled``: :class:`deepkd.optim.DecoupledMomentumSGD`, one momentum per gradient stream.
    A stream's steady-state step is ``lr / (1 - m)`` (x20 at m = 0.95, x5.7 at 0.825). ``stream_momentum:
    auto`` (one-view classification): coefficients from the streams' GSNR measured during training, within
    [mu - delta, mu + delta] and monotone in smoothed log-GSNR (:mod:`deepkd.optim.auto_momentum`); its
    settings ``auto_momentum`` are read only then, and it needs ``merge_equal: false`` (its default)."""

    name: Literal["decoupled"] = "decoupled"
    lr: float = Field(LR, gt=0)
    stream_momentum: Union[Literal["auto"], Dict[Stream, float]] = Field(
        default_factory=lambda: dict(_default(DecoupledMomentumSGD, "momentum")))
    auto_momentum: Optional[AutoMomentumConfig] = None
    weight_decay: float = Field(_default(DecoupledMomentumSGD, "weight_decay"), ge=0)
    weight_decay_stream: Stream = _default(DecoupledMomentumSGD, "weight_decay_stream")
    merge_equal: bool = _default(DecoupledMomentumSGD, "merge_equal")


class StepScheduleConfig(_Strict):
    """``step``: ``lr * gamma ** #(milestones < epoch)`` (:func:`deepkd.optim.step_lr`)."""

    name: Literal["step"] = "step"
    epochs: int = Field(EPOCHS, gt=0)
    milestones: List[int] = [150, 180, 210]
    gamma: float = _default(step_lr, "gamma")


class CosineScheduleConfig(_Strict):
    """``cosine``: linear warm-up, then cosine to ``min_lr`` (:func:`deepkd.optim.cosine_lr`)."""

    name: Literal["cosine"] = "cosine"
    epochs: int = Field(EPOCHS, gt=0)
    warmup_epochs: int = Field(_default(cosine_lr, "warmup_epochs"), ge=0)
    warmup_start_factor: float = _default(cosine_lr, "warmup_start_factor")
    min_lr: float = _default(cosine_lr, "min_lr")


class MultiStepIterScheduleConfig(_Strict):
    """``multistep_iter`` (detection): :func:`deepkd.optim.warmup_multistep_lr` over optimizer
    steps: a linear warm-up of ``warmup_iterations`` from ``warmup_factor``, x ``gamma`` at each
    milestone iteration. ``epochs`` passes over the data, cut at ``max_iterations`` when set (the run
    then ends, evaluated, mid-epoch); methods see the 1-based epoch in progress."""

    name: Literal["multistep_iter"] = "multistep_iter"
    epochs: int = Field(gt=0)
    max_iterations: Optional[int] = Field(None, gt=0)
    milestones: List[int] = list(_default(warmup_multistep_lr, "milestones"))
    gamma: float = _default(warmup_multistep_lr, "gamma")
    warmup_iterations: int = Field(_default(warmup_multistep_lr, "warmup_iterations"), ge=0)
    warmup_factor: float = Field(_default(warmup_multistep_lr, "warmup_factor"), gt=0, le=1)


OptimizerConfig = _choice("sgd", SGDConfig, DecoupledConfig)
ScheduleConfig = _choice("step", StepScheduleConfig, CosineScheduleConfig, MultiStepIterScheduleConfig)
