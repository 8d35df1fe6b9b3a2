"""A self-contained detection training loop: epochs of :func:`detection_train_step`, COCO AP after
each (or every ``eval_every``) epoch, ``metrics.jsonl``, ``last.pt``/``best.pt`` with every state
needed to resume bit for bit (weights, optimizer, RNG, position: epoch, batch, step).

Flat, typed arguments, no config objects: ``deepkd train`` (or a user's script) builds the models,
method, optimizer, schedule and loaders and hands them over.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from deepkd.detection.coco import DetectionLoader
from deepkd.detection.evaluate import coco_evaluate
from deepkd.detection.roi import check_pair, prepare_teacher
from deepkd.detection.step import detection_train_step, optimizer_params
from deepkd.errors import ConfigError, RunExistsError, TrainingError
from deepkd.losses import Method
from deepkd.train.checkpoint import FORMAT, atomic_save, load_checkpoint, rng_state, set_rng_state
from deepkd.train.distributed import Dist, all_reduce_sum, average_batchnorm_statistics, broadcast_module
from deepkd.train.logs import METRICS_JSONL, MetricsWriter, Progress, read_jsonl
from deepkd.train.signals import StopSignals


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


@dataclass
class Position:
    """Where a detection run stands (what ``last.pt`` stores besides weights, optimizer and RNG)."""

    epoch: int = 1  # the epoch in progress, 1-based
    batch: int = 0  # batches of that epoch already trained
    step: int = 0  # optimizer steps over the whole run (the schedule's iteration)
    best: float = -1.0  # best AP so far
    meters: Dict[str, torch.Tensor] = field(default_factory=dict)  # the epoch's partial sums

    def as_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class _Run:
    """What the loop runs: the objects handed to :func:`train_detector` and its options."""

    student: nn.Module
    teacher: Optional[nn.Module]
    method: Method
    optimizer: torch.optim.Optimizer
    lr_at: Callable[[int], float]
    train_loader: DetectionLoader
    val_loader: DetectionLoader
    coco_gt: Any
    epochs: int
    device: torch.device
    run_dir: Path
    ctx: Dist
    precision: str
    eval_every: int
    checkpoint_every: int
    stop_after_steps: Optional[int]
    max_steps: Optional[int]
    log: Callable[[str], None]
    params: list = field(default_factory=list)
    writer: Optional[MetricsWriter] = None
    progress: Progress = field(default_factory=lambda: Progress("none"))

    def done(self, position: Position) -> bool:
        return position.epoch > self.epochs or (self.max_steps is not None and position.step >= self.max_steps)


def _check_optimizer(optimizer: torch.optim.Optimizer, teacher: Optional[nn.Module]) -> None:
    params = optimizer_params(optimizer)
    ids = {id(p) for p in teacher.parameters()} if teacher is not None else set()
    if any(id(p) in ids for p in params):
        raise ConfigError("the optimizer holds teacher parameters; build it from the student's parameters only")
    if any(not p.requires_grad for p in params):
        raise ConfigError("the optimizer holds frozen parameters (requires_grad=False, e.g. a detector's frozen "
                          "backbone stages); build it from [p for p in student.parameters() if p.requires_grad]")


def _check_models(student: nn.Module, teacher: Optional[nn.Module], optimizer: torch.optim.Optimizer) -> None:
    """The optimizer holds the student's trainable parameters; a teacher fits the student and is frozen."""
    _check_optimizer(optimizer, teacher)
    if teacher is not None:
        check_pair(student, teacher)
        prepare_teacher(teacher)


def _save(run: _Run, name: str, position: Position) -> None:
    if run.ctx.is_main:
        atomic_save({"format": FORMAT, "task": "detection", "model": run.student.state_dict(),
                     "optimizer": run.optimizer.state_dict(), **position.as_dict(),
                     "topk": run.method.topk(position.epoch), "rng": rng_state()}, run.run_dir / name)


def _restore(run: _Run, path: Path) -> Position:
    ckpt = load_checkpoint(path)
    run.student.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return Position(**{f.name: ckpt[f.name] for f in fields(Position)})


def _to_device(images, targets, device: torch.device):
    """Only ``boxes`` and ``labels`` go to the model (``image_id`` is for evaluation)."""
    return ([image.to(device, non_blocking=True) for image in images],
            [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets])


def _train_epoch(run: _Run, position: Position, stop: StopSignals) -> Optional[Dict[str, float]]:
    """Train ``position.epoch`` from ``position.batch`` on (to its end or ``max_steps``); the epoch's
    mean terms, or None when stopped (a signal, or ``stop_after_steps``; ``last.pt`` holds the step)."""
    sums = {k: v.clone() for k, v in position.meters.items()}
    total, desc, started = len(run.train_loader), f"epoch {position.epoch}/{run.epochs}", time.time()
    batches = run.progress.wrap(run.train_loader.iter_epoch(position.epoch, position.batch), total=total,
                                start=position.batch, desc=desc)
    for index, (images, targets) in enumerate(batches, start=position.batch):
        for group in run.optimizer.param_groups:
            group["lr"] = run.lr_at(position.step)
        images, targets = _to_device(images, targets, run.device)
        terms = detection_train_step(run.student, run.teacher, run.method, run.optimizer, images, targets,
                                     epoch=position.epoch, ctx=run.ctx, precision=run.precision, params=run.params)
        loss = torch.stack(list(terms.values())).sum()
        # every rank stops at the same step (a rank raising alone would leave the others waiting)
        if float(all_reduce_sum((~torch.isfinite(loss)).float(), run.ctx)) > 0:
            raise TrainingError(f"non-finite loss at step {position.step + 1} "
                                f"({', '.join(f'{k} {float(v):.4g}' for k, v in terms.items())}); stopped, the "
                                f"last good checkpoint in {str(run.run_dir)!r} is kept")
        logged = {"loss": loss, **{f"loss/{k}": v for k, v in terms.items()}, "count": torch.ones(())}
        for name, value in logged.items():
            value = value.detach().double().cpu()
            sums[name] = sums[name] + value if name in sums else value
        position.batch, position.step, position.meters = index + 1, position.step + 1, sums
        run.progress.step(desc, index + 1, total, {"loss": float(loss)}, started)
        # every step already all-reduces its loss, so the ranks can agree on a signal at each one
        stopping = stop.agreed(run, sync_point=True) or position.step == run.stop_after_steps
        if stopping or (run.checkpoint_every and position.step % run.checkpoint_every == 0):
            average_batchnorm_statistics(run.student, run.ctx)  # every rank: the checkpoint is rank 0's
            _save(run, "last.pt", position)
        if stopping:
            return None
        if run.done(position):
            break
    count = max(float(all_reduce_sum(sums.get("count", torch.ones((), dtype=torch.float64)), run.ctx)), 1.0)
    return {f"train_{k}": float(all_reduce_sum(v, run.ctx)) / count for k, v in sums.items() if k != "count"}


def _end_epoch(run: _Run, position: Position, train: Dict[str, float], seconds: float) -> None:
    """Evaluate when due, log the epoch, write ``best.pt`` (on a better AP) and ``last.pt``."""
    epoch = position.epoch
    average_batchnorm_statistics(run.student, run.ctx)  # one set of statistics for the AP and the saves
    due = epoch % max(run.eval_every, 1) == 0 or epoch == run.epochs or run.done(position)
    ap = coco_evaluate(run.student, run.val_loader, run.coco_gt, run.ctx, run.device) if due else None
    record = {"epoch": epoch, "step": position.step, "lr": run.optimizer.param_groups[0]["lr"], **train,
              **(ap or {}), "topk": run.method.topk(epoch), "seconds": seconds}
    improved = ap is not None and ap["AP"] > position.best
    position.best = max(position.best, ap["AP"]) if ap is not None else position.best
    position.epoch, position.batch, position.meters = epoch + 1, 0, {}
    if run.writer is not None:
        run.writer.log_epoch(record, truncate_after=epoch)
    if improved:  # best.pt before last.pt: a kill between the two replays this epoch
        _save(run, "best.pt", position)
    _save(run, "last.pt", position)
    shown = f" AP {ap['AP']:.2f} AP50 {ap['AP50']:.2f} best {position.best:.2f}" if ap is not None else ""
    run.log(f"epoch {epoch}: loss {train.get('train_loss', math.nan):.4f}{shown} lr {record['lr']:.4g} "
            f"({seconds:.1f}s)")


def train_detector(*, student: nn.Module, teacher: Optional[nn.Module], method: Method,
                   optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float], train_loader: DetectionLoader,
                   val_loader: DetectionLoader, coco_gt, epochs: int, device: torch.device, run_dir: str | Path,
                   seed: int = 0, ctx: Optional[Dist] = None, precision: str = "fp32", resume: bool = False,
                   eval_every: int = 1, checkpoint_every: int = 0, stop_after_steps: Optional[int] = None,
                   max_steps: Optional[int] = None, log: Callable[[str], None] = print,
                   progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Train ``student`` for ``epochs`` epochs (or resume ``run_dir/last.pt``); returns the summary.

    ``lr_at(step)`` gives the learning rate of optimizer step ``step`` (0-based; e.g.
    :func:`warmup_multistep_lr`); the method sees ``epoch`` = the 1-based epoch in progress. COCO AP
    (``coco_evaluate`` on ``val_loader`` against ``coco_gt``) every ``eval_every`` epochs and at the
    end; ``best.pt`` follows the best AP. ``max_steps``: an iteration budget (the run ends, evaluated,
    after that many steps even mid-epoch). ``seed`` seeds the global RNG of a fresh run (the RPN and
    RoI samplers draw from it; a resume restores the saved RNG instead). ``checkpoint_every`` steps
    and ``stop_after_steps`` (then returns status "stopped") write ``last.pt`` mid-epoch. ``progress``
    (:class:`deepkd.train.logs.Progress`): a bar or a line every few steps; none by default.
    """
    run_dir, last, ctx = Path(run_dir), Path(run_dir) / "last.pt", ctx or Dist()
    if last.exists() and not resume:
        raise RunExistsError(f"run directory {str(run_dir)!r} already holds a checkpoint; resume it or choose another")
    _check_models(student, teacher, optimizer)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(student.train(), teacher, method, optimizer, lr_at, train_loader, val_loader, coco_gt, epochs, device,
               run_dir, ctx, precision, eval_every, checkpoint_every, stop_after_steps, max_steps, log,
               optimizer_params(optimizer), MetricsWriter(run_dir, tensorboard="off") if ctx.is_main else None,
               progress or Progress("none"))
    if resume and last.exists():
        position = _restore(run, last)
    else:
        torch.manual_seed(seed)
        broadcast_module(student, ctx)
        position = Position()
    try:
        return _epochs(run, position)
    finally:
        if run.writer is not None:
            run.writer.close()


def _epochs(run: _Run, position: Position) -> Dict[str, Any]:
    started = time.time()
    with StopSignals() as stop:  # Ctrl-C, SIGTERM, SIGUSR1: save this step and return "stopped"
        while not run.done(position):
            epoch_started = time.time()
            train = _train_epoch(run, position, stop)
            if train is None:
                reason = stop.reason or "stop_after_steps"
                run.log(f"stopped at step {position.step} ({reason}); resume from {str(run.run_dir / 'last.pt')!r}")
                return {"status": "stopped", "reason": reason, "step": position.step, "run_dir": str(run.run_dir)}
            _end_epoch(run, position, train, time.time() - epoch_started)
    records = [r for r in read_jsonl(run.run_dir / METRICS_JSONL) if "AP" in r] if run.ctx.is_main else []
    best = max(records, key=lambda r: r["AP"]) if records else {}
    summary = {"status": "finished", "best_AP": position.best, "best_epoch": best.get("epoch"),
               "last": records[-1] if records else {}, "epochs": run.epochs, "steps": position.step,
               "train_seconds": time.time() - started, "run_dir": str(run.run_dir)}
    if run.ctx.is_main:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
