"""Learning-rate schedules as pure functions of the epoch (or, for detection, the iteration), so that
resuming needs no state."""
from __future__ import annotations

import math
from typing import Sequence


def step_lr(epoch: int, base_lr: float, milestones: Sequence[int], gamma: float = 0.1) -> float:
    """Reference step rule: ``base_lr * gamma ** #{m in milestones : m < epoch}``.

    Epochs count from 1 and the value is set at the start of each epoch, so with milestones
    (150, 180, 210) epoch 150 still runs at ``base_lr`` and epoch 151 at ``0.1 * base_lr``.
    """
    return base_lr * gamma ** sum(1 for m in milestones if m < epoch)


def cosine_lr(position: float, base_lr: float, epochs: int, warmup_epochs: int = 0,
              warmup_start_factor: float = 0.1, min_lr: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start_factor * base_lr`` to ``base_lr``, then cosine to ``min_lr``.

    ``position`` is the number of epochs completed (fractional within an epoch: ``epoch - 1 +
    progress``). DeepKD's ImageNet recipe: 20 warm-up epochs from 0.1 * lr, floor 5e-5.
    """
    if warmup_epochs > 0 and position < warmup_epochs:
        fraction = position / warmup_epochs
        return base_lr * (warmup_start_factor + (1.0 - warmup_start_factor) * fraction)
    span = max(epochs - warmup_epochs, 1)
    progress = min(max((position - warmup_epochs) / span, 0.0), 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_multistep_lr(iteration: int, *, base_lr: float, milestones: Sequence[int] = (), gamma: float = 0.1,
                        warmup_iterations: int = 1000, warmup_factor: float = 0.001) -> float:
    """Detection's iteration schedule (torchvision reference, Detectron2): a linear warm-up from
    ``warmup_factor * base_lr`` over ``warmup_iterations``, times ``gamma`` at each milestone
    iteration reached (``iteration`` counts optimizer steps from 0)."""
    factor = 1.0
    if iteration < warmup_iterations:
        alpha = iteration / warmup_iterations
        factor = warmup_factor * (1 - alpha) + alpha
    return base_lr * factor * gamma ** sum(1 for m in milestones if m <= iteration)
