"""What the engine drives: a :class:`Task` (what to compute) and the task registry.

The engine (:func:`deepkd.engine.loop.run_task`) owns how a run runs: the position, checkpoints,
resume, signals, meters, loggers, the epoch loop and the finish. A task owns what it computes:
its batches, its step (forward, named loss terms, ``backward`` + ``step``), its evaluation and
what its checkpoint holds. ``classification`` (:mod:`deepkd.train.loop`) and ``detection``
(:mod:`deepkd.detection.task`) are registered in :data:`TASKS` by their builders,
``builder(cfg, run_dir, *, resume) -> Task``; ``deepkd train`` looks the builder up by the
config's ``task``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from deepkd.engine.distributed import Dist
from deepkd.engine.logs import MetricsWriter, Progress
from deepkd.registry import Registry

TASKS = Registry("task")
Tensors = Dict[str, torch.Tensor]


@dataclass
class Watch:
    """How a run is watched and stopped, not what it computes (``deepkd train``: the train section)."""

    log_every: int = 50  # steps between host syncs: the finite-loss check, a progress line, a signal check
    checkpoint_every: int = 0  # steps between mid-epoch ``last.pt`` saves; 0: epoch ends and stops only
    stop_after_steps: int = 0  # stop (saved, resumable) after this many steps; 0: never
    progress: str = "auto"  # auto | bar | lines | none
    tensorboard: str = "off"  # auto | on | off
    wandb: bool = False
    wandb_project: str = "deepkd"


class Task(ABC):
    """One kind of training (classification, detection, a user's own) as the engine runs it.

    A subclass sets ``model`` (what is trained, checkpointed and checked for finite values),
    ``optimizer``, ``epochs``, ``device``, ``ctx`` and implements :meth:`batches`, :meth:`step` and
    :meth:`evaluate`; the rest has defaults. ``metric`` names the :meth:`evaluate` key that picks
    ``best.pt`` (higher is better). The engine hands the task its ``writer`` (rank 0) and
    ``progress`` before the first step.
    """

    name: str = "task"
    metric: str = "loss"
    max_steps: Optional[int] = None  # an iteration budget: the run ends, evaluated, after this many steps
    eval_every: int = 1  # epochs between evaluations; the run's last epoch is always evaluated
    model: nn.Module
    optimizer: torch.optim.Optimizer
    epochs: int
    device: torch.device = torch.device("cpu")
    ctx: Dist = Dist()
    writer: Optional[MetricsWriter] = None
    progress: Progress = Progress("none")

    @abstractmethod
    def batches(self, epoch: int, start_batch: int) -> Iterable:
        """The batches of ``epoch`` (1-based) from ``start_batch`` on, the same on every call."""

    @abstractmethod
    def num_batches(self) -> int:
        """Batches per epoch."""

    @abstractmethod
    def step(self, batch: Any, epoch: int, position: Any) -> Tuple[Tensors, Tensors]:
        """One optimisation step on ``batch``; ``position.step`` steps are done before it. Returns the
        detached loss terms (summed: the loss checked for finite values and shown) and the sums
        for the meters (``count``: their divisor; ``train_<name>`` = sum / count at the epoch's end)."""

    @abstractmethod
    def evaluate(self, epoch: int) -> Dict[str, float]:
        """The test metrics of the model after ``epoch``; the engine calls it every ``eval_every`` epochs
        and after the run's last."""

    def set_lr(self, epoch: int, progress: float, step: int) -> None:
        """Set the learning rate before a step (``progress`` in [0, 1) within the epoch, ``step``
        done before it); by default the optimizer's own stays."""
        return None

    @property
    def params(self) -> List[nn.Parameter]:
        """The trained parameters (checked for finite values before every checkpoint)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def attach(self, writer: Optional[MetricsWriter], progress: Progress) -> None:
        self.writer, self.progress = writer, progress

    def begin(self) -> Dict[str, Any]:
        """Before the first epoch (also of a resumed run): facts for the summary."""
        return {}

    def facts(self, epoch: int) -> Dict[str, Any]:
        """What the epoch's record holds besides the train and test metrics."""
        return {}

    def line(self, record: Dict[str, Any], best: float) -> str:
        shown = " ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "seconds")
        return f"epoch {record['epoch']}: {shown} best {best:.4g} ({record['seconds']:.1f}s)"

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint holds of the task (``weights_only``-loadable)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def summary(self, records: List[Dict[str, Any]], best: float, begun: Dict[str, Any]) -> Dict[str, Any]:
        """The finished run's summary (the engine adds steps, seconds and the folder)."""
        scored = [r for r in records if self.metric in r]
        top = max(scored, key=lambda r: r[self.metric]) if scored else {}
        return {"status": "finished", f"best_{self.metric}": best, "best_epoch": top.get("epoch"),
                f"last_{self.metric}": scored[-1][self.metric] if scored else math.nan, **begun,
                "epochs": self.epochs}

    def finish(self, run_dir: Any, summary: Dict[str, Any]) -> None:
        """Rank 0, after ``summary.json``: the files a finished run leaves (weights, a model card)."""
        return None
