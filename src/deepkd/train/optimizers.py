"""The optimizer and schedule registries: ``optimizer.name`` and ``schedule.name`` of a recipe.

An optimizer builder is ``builder(cfg, params) -> torch.optim.Optimizer`` (``cfg``: the recipe's
optimizer section, ``params``: the trainable parameters); a schedule builder is ``builder(cfg,
base_lr) -> lr(epoch, progress)`` (epoch counted from 1, progress in [0, 1) within the epoch).
:func:`deepkd.train.build.build_optimizer` and :func:`~deepkd.train.build.build_schedule` look them
up. A recipe accepts a name once :mod:`deepkd.train.optim_config` has a section model for it.
Detection's ``multistep_iter`` is an iteration schedule, built by
:func:`deepkd.train.detection_task.build_detection_lr`.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch

from deepkd.optim import DecoupledMomentumSGD, GSNRMomentum, cosine_lr, step_lr
from deepkd.registry import Registry
from deepkd.train.optim_config import (
    CosineScheduleConfig,
    DecoupledConfig,
    OptimizerConfig,
    SGDConfig,
    StepScheduleConfig,
)

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_auto_momentum", "register_optimizer", "register_schedule"]

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")


def register_optimizer(name: Optional[str] = None, **info: Any):
    """Decorator registering ``builder(cfg, params) -> torch.optim.Optimizer`` under ``name``."""
    return OPTIMIZERS.register(name, **info)


def register_schedule(name: Optional[str] = None, **info: Any):
    """Decorator registering ``builder(cfg, base_lr) -> lr(epoch, progress)`` under ``name``."""
    return SCHEDULES.register(name, **info)


def build_auto_momentum(cfg: OptimizerConfig) -> Optional[GSNRMomentum]:
    """The GSNR-driven momentum rule of ``stream_momentum: auto``, else None."""
    if getattr(cfg, "stream_momentum", None) != "auto":
        return None
    return GSNRMomentum(**cfg.auto_momentum.model_dump())


@register_optimizer("sgd")
def build_sgd(cfg: SGDConfig, params: List[torch.nn.Parameter]) -> torch.optim.SGD:
    """torch.optim.SGD on the summed loss."""
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


@register_optimizer("decoupled")
def build_decoupled(cfg: DecoupledConfig, params: List[torch.nn.Parameter]) -> DecoupledMomentumSGD:
    """One momentum per gradient stream; ``stream_momentum: auto`` starts from the rule's initial
    coefficients (its config sets ``merge_equal: false``)."""
    auto = build_auto_momentum(cfg)
    momentum = auto.initial() if auto is not None else dict(cfg.stream_momentum)
    return DecoupledMomentumSGD(params, lr=cfg.lr, momentum=momentum, weight_decay=cfg.weight_decay,
                                weight_decay_stream=cfg.weight_decay_stream, merge_equal=cfg.merge_equal)


@register_schedule("step")
def build_step_schedule(cfg: StepScheduleConfig, base_lr: float) -> Callable[[int, float], float]:
    """:func:`deepkd.optim.step_lr`, constant within an epoch."""
    return lambda epoch, progress: step_lr(epoch, base_lr, cfg.milestones, cfg.gamma)


@register_schedule("cosine")
def build_cosine_schedule(cfg: CosineScheduleConfig, base_lr: float) -> Callable[[int, float], float]:
    """:func:`deepkd.optim.cosine_lr` at the fractional position ``epoch - 1 + progress``."""
    return lambda epoch, progress: cosine_lr(epoch - 1 + progress, base_lr, cfg.epochs, cfg.warmup_epochs,
                                             cfg.warmup_start_factor, cfg.min_lr)
