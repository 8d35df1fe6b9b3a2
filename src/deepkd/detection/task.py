"""Detection as a task of the engine (:mod:`deepkd.engine.loop`): epochs of
:func:`detection_train_step`, COCO AP after each (or every ``eval_every``) epoch, ``best.pt`` by AP.

:func:`train_detector` runs it from flat, typed arguments (no config objects): a user's script,
or the offline demo, builds the models, method, optimizer, schedule and loaders and hands them
over. ``deepkd train`` builds the same task from a recipe (:mod:`deepkd.train.detection_task`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from deepkd.detection.coco import DetectionLoader
from deepkd.detection.evaluate import coco_evaluate
from deepkd.detection.roi import check_pair, prepare_teacher
from deepkd.detection.step import detection_train_step, optimizer_params
from deepkd.engine.distributed import Dist, broadcast_module
from deepkd.engine.logs import Progress
from deepkd.engine.loop import run_task
from deepkd.engine.run_folder import claim_run_folder
from deepkd.engine.task import Task, Watch
from deepkd.errors import ConfigError
from deepkd.losses import Method


def _check_optimizer(optimizer: torch.optim.Optimizer, teacher: Optional[nn.Module], method: Method) -> None:
    params = optimizer_params(optimizer)
    ids = {id(p) for p in teacher.parameters()} if teacher is not None else set()
    held = {id(p) for p in params}
    if any(id(p) not in held for p in method.parameters() if p.requires_grad):
        raise ConfigError(f"the optimizer lacks method {type(method).__name__}'s parameters (its connectors): build "
                          "it from the student's trainable parameters, then the method's")
    if any(id(p) in ids for p in params):
        raise ConfigError("the optimizer holds teacher parameters; build it from the student's parameters only")
    if any(not p.requires_grad for p in params):
        raise ConfigError("the optimizer holds frozen parameters (requires_grad=False, e.g. a detector's frozen "
                          "backbone stages); build it from [p for p in student.parameters() if p.requires_grad]")


def _to_device(images, targets, device: torch.device):
    """Only ``boxes`` and ``labels`` go to the model (``image_id`` is for evaluation)."""
    return ([image.to(device, non_blocking=True) for image in images],
            [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets])


class DetectionTask(Task):
    """A detector distilled on its RoI classifier (a feature method: also on its FPN, its connectors
    trained by ``optimizer`` and saved with the student). ``lr_at(step)``: the learning rate of optimizer step
    ``step`` (0-based; e.g. :func:`deepkd.optim.warmup_multistep_lr`); the method sees the 1-based
    epoch in progress. ``max_steps``: an iteration budget. ``on_finish(run_dir, summary)``: what a
    finished run leaves besides ``summary.json`` (``deepkd train``: the model card)."""

    name, metric = "detection", "AP"

    def __init__(self, *, student: nn.Module, teacher: Optional[nn.Module], method: Method,
                 optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float], train_loader: DetectionLoader,
                 val_loader: DetectionLoader, coco_gt, epochs: int, device: torch.device, ctx: Optional[Dist] = None,
                 precision: str = "fp32", eval_every: int = 1, max_steps: Optional[int] = None,
                 on_finish: Optional[Callable[[Path, Dict[str, Any]], None]] = None):
        _check_optimizer(optimizer, teacher, method)  # the student's and method's trainable parameters only
        if teacher is not None:
            check_pair(student, teacher)
            prepare_teacher(teacher)
        self.model, self.teacher, self.method, self.optimizer = student.train(), teacher, method, optimizer
        self.lr_at, self.train_loader, self.val_loader, self.coco_gt = lr_at, train_loader, val_loader, coco_gt
        self.epochs, self.device, self.ctx, self.precision = epochs, device, ctx or Dist(), precision
        self.eval_every, self.max_steps, self.on_finish = eval_every, max_steps, on_finish

    def batches(self, epoch: int, start_batch: int):
        return self.train_loader.iter_epoch(epoch, start_batch)

    def num_batches(self) -> int:
        return len(self.train_loader)

    def set_lr(self, epoch: int, progress: float, step: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)

    def step(self, batch, epoch: int, position):
        images, targets = _to_device(*batch, self.device)
        terms = detection_train_step(self.model, self.teacher, self.method, self.optimizer, images, targets,
                                     epoch=epoch, ctx=self.ctx, precision=self.precision, params=self.params)
        loss = torch.stack(list(terms.values())).sum()  # the meters: per-step means of each term
        return terms, {"loss": loss, **{f"loss/{k}": v for k, v in terms.items()}, "count": torch.ones(())}

    def evaluate(self, epoch: int) -> Dict[str, float]:
        return coco_evaluate(self.model, self.val_loader, self.coco_gt, self.ctx, self.device)

    def facts(self, epoch: int) -> Dict[str, Any]:
        return {"topk": self.method.topk(epoch)}

    def line(self, record: Dict[str, Any], best: float) -> str:
        shown = f" AP {record['AP']:.2f} AP50 {record['AP50']:.2f} best {best:.2f}" if "AP" in record else ""
        return (f"epoch {record['epoch']}: loss {record.get('train_loss', math.nan):.4f}{shown} "
                f"lr {record['lr']:.4g} ({record['seconds']:.1f}s)")

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "method": self.method.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state.get("method", {}))
        self.optimizer.load_state_dict(state["optimizer"])

    def summary(self, records: List[Dict[str, Any]], best: float, begun: Dict[str, Any]) -> Dict[str, Any]:
        scored = [r for r in records if "AP" in r]
        top = max(scored, key=lambda r: r["AP"]) if scored else {}
        return {"status": "finished", "best_AP": best, "best_epoch": top.get("epoch"),
                "last": scored[-1] if scored else {}, "epochs": self.epochs}

    def finish(self, run_dir: Path, summary: Dict[str, Any]) -> None:
        if self.on_finish is not None:
            self.on_finish(run_dir, summary)


def start_fresh(task: DetectionTask, seed: int) -> None:
    """A new run: seed the global RNG (the RPN and RoI samplers draw from it); every rank starts from
    rank 0's student and method (a feature method's connectors). A resume restores the saved RNG instead."""
    torch.manual_seed(seed)
    broadcast_module(task.model, task.ctx)
    broadcast_module(task.method, task.ctx)


def train_detector(*, student: nn.Module, teacher: Optional[nn.Module], method: Method,
                   optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float], train_loader: DetectionLoader,
                   val_loader: DetectionLoader, coco_gt, epochs: int, device: torch.device, run_dir: str | Path,
                   seed: int = 0, ctx: Optional[Dist] = None, precision: str = "fp32", resume: bool = False,
                   eval_every: int = 1, checkpoint_every: int = 0, stop_after_steps: Optional[int] = None,
                   max_steps: Optional[int] = None, log: Callable[[str], None] = print,
                   progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Train ``student`` for ``epochs`` epochs (or resume ``run_dir/last.pt``); returns the summary.

    ``method``: a logit method, or a feature method (``reviewkd`` with ``fpn: true``, ``dkd+reviewkd``)
    built from both models' :func:`~deepkd.detection.roi.pyramid_info`, on the student's device, its
    parameters (the connectors) in ``optimizer`` after the student's; they are saved with the student.
    COCO AP (``coco_evaluate`` on ``val_loader`` against ``coco_gt``) every ``eval_every`` epochs and
    at the end; ``best.pt`` follows the best AP. ``max_steps``: an iteration budget (the run ends,
    evaluated, after that many steps even mid-epoch). ``seed`` seeds the global RNG of a fresh run.
    ``checkpoint_every`` steps and ``stop_after_steps`` (then returns status "stopped") write
    ``last.pt`` mid-epoch. ``log``: where the epoch lines go; ``progress``
    (:class:`deepkd.engine.logs.Progress`): a bar or a line every few steps; none by default.
    """
    task = DetectionTask(student=student, teacher=teacher, method=method, optimizer=optimizer, lr_at=lr_at,
                         train_loader=train_loader, val_loader=val_loader, coco_gt=coco_gt, epochs=epochs,
                         device=device, ctx=ctx, precision=precision, eval_every=eval_every, max_steps=max_steps)
    with claim_run_folder(run_dir, resume=resume) as resuming:
        if not resuming:
            start_fresh(task, seed)
        watch = Watch(checkpoint_every=checkpoint_every, stop_after_steps=stop_after_steps or 0)
        return run_task(task, run_dir, resume=resuming, watch=watch, progress=progress or Progress("none", write=log))
