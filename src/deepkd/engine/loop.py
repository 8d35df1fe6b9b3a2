"""The one training loop of every task: epochs of :meth:`Task.step`, the finite-loss check, signals,
mid-epoch and end-of-epoch checkpoints (``last.pt``; ``best.pt`` by the task's metric), metrics
(``metrics.jsonl``, TensorBoard, W&B) and the finish (``summary.json``).

A checkpoint is a plain dict (:mod:`deepkd.engine.checkpoint`): ``format``, ``task``, the task's
state (``model``, ``optimizer``, ...), the :class:`Position`, ``rng``, ``provenance`` and ``config``
(the resolved run config, when the run has one). The host waits for the device once per
``Watch.log_every`` steps (and at checkpoints), not every step.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from deepkd.engine.checkpoint import FORMAT, atomic_save, load_checkpoint, rng_state, set_rng_state
from deepkd.engine.distributed import all_reduce_sum, average_batchnorm_statistics
from deepkd.engine.logs import METRICS_JSONL, MetricsWriter, Progress, read_jsonl
from deepkd.engine.meters import Meters
from deepkd.engine.signals import StopSignals
from deepkd.engine.task import Task, Watch
from deepkd.errors import TrainingError
from deepkd.provenance import provenance


class NonFiniteLossError(TrainingError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


@dataclass
class Position:
    """Where a run stands: what a checkpoint stores besides the task's state and the RNG states."""

    epoch: int = 1  # the epoch in progress, 1-based
    batch: int = 0  # batches of that epoch already trained
    step: int = 0  # optimizer steps over the whole run
    best: float = -1.0  # best value of the task's metric so far
    meters: Dict[str, torch.Tensor] = field(default_factory=dict)  # the epoch's partial sums at the last save

    @classmethod
    def from_checkpoint(cls, ckpt: Dict[str, Any]) -> "Position":
        return cls(**{f.name: ckpt[f.name] for f in fields(cls)})

    def as_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.meters = self.epoch + 1, 0, {}


@dataclass
class _Run:
    task: Task
    run_dir: Path
    watch: Watch
    config: Optional[Dict[str, Any]]
    writer: Optional[MetricsWriter]
    progress: Progress


def run_task(task: Task, run_dir: str | Path, *, resume: bool = False, watch: Optional[Watch] = None,
             config: Optional[Dict[str, Any]] = None, progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Train ``task`` in ``run_dir`` (claimed by the caller: :func:`deepkd.engine.run_folder.claim_run_folder`),
    from ``run_dir/last.pt`` when ``resume``; returns the summary (also ``summary.json``), or
    ``{"status": "stopped", ...}`` after a signal or ``watch.stop_after_steps``. ``config`` (plain
    data) goes into every checkpoint; ``progress`` replaces the one ``watch`` describes."""
    watch, run_dir, main = watch or Watch(), Path(run_dir), task.ctx.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    writer = MetricsWriter(run_dir, tensorboard=watch.tensorboard, wandb=watch.wandb,
                           wandb_project=watch.wandb_project, config=config) if main else None
    run = _Run(task, run_dir, watch, config, writer,
               progress or Progress(watch.progress, watch.log_every, enabled=main))
    task.attach(writer, run.progress)
    try:
        return _train_epochs(run, restore(task, run_dir / "last.pt") if resume else Position())
    finally:
        if writer is not None:
            writer.close()


def save_checkpoint(run: _Run, path: Path, position: Position) -> None:
    """Write a checkpoint atomically (rank 0 only); nothing already on disk is lost on failure."""
    if not run.task.ctx.is_main:
        return
    state = {"format": FORMAT, "task": run.task.name, **run.task.state_dict(), **position.as_dict(),
             "rng": rng_state(), "provenance": provenance()}
    if run.config is not None:
        state["config"] = run.config
    atomic_save(state, path)


def restore(task: Task, path: Path) -> Position:
    """Load a checkpoint into the task and the RNGs; returns where it stopped."""
    ckpt = load_checkpoint(path)
    task.load_state_dict(ckpt)
    set_rng_state(ckpt["rng"])
    return Position.from_checkpoint(ckpt)


def _done(task: Task, position: Position) -> bool:
    return position.epoch > task.epochs or (task.max_steps is not None and position.step >= task.max_steps)


def _train_epochs(run: _Run, position: Position) -> Dict[str, Any]:
    with StopSignals() as stop:  # a signal during the task's first test or the last files is a no-op
        begun = run.task.begin()
        started = time.time()
        while not _done(run.task, position):
            epoch_started = time.time()
            train_metrics = _run_epoch(run, position, stop)
            if train_metrics is None:
                return {"status": "stopped", "reason": stop.reason or "train.stop_after_steps",
                        "run_dir": str(run.run_dir), "step": position.step}
            _end_epoch(run, position, train_metrics, time.time() - epoch_started)
        return _finish(run, position, begun, time.time() - started)


def _run_epoch(run: _Run, position: Position, stop: StopSignals) -> Optional[Dict[str, float]]:
    """Train ``position.epoch`` on from ``position.batch``, advancing ``position``; returns the epoch's
    train metrics, or None when stopped (``last.pt`` then holds this step)."""
    task, watch, epoch = run.task, run.watch, position.epoch
    meters = Meters(task.device, position.meters)
    total, start, started = task.num_batches(), position.batch, time.time()
    bad_step = torch.full((), -1, dtype=torch.long, device=task.device)
    desc = f"epoch {epoch}/{task.epochs}"
    batches = run.progress.wrap(task.batches(epoch, start), total=total, start=start, desc=desc)
    for index, batch in enumerate(batches, start=start):
        task.set_lr(epoch, index / total, position.step)
        terms, sums = task.step(batch, epoch, position)
        meters.update(sums)
        loss = torch.stack(list(terms.values())).sum()
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), position.step, bad_step)
        position.batch, position.step = index + 1, position.step + 1
        logged = position.step % watch.log_every == 0 or index + 1 == total
        if logged:
            _check_finite(run, bad_step)
            run.progress.step(desc, index + 1, total, {"loss": float(loss)}, started)
        due = watch.checkpoint_every > 0 and position.step % watch.checkpoint_every == 0
        stopping = stop.agreed(task, logged or due) or position.step == watch.stop_after_steps
        if stopping or due:
            _save_position(run, position, meters, bad_step)
        if stopping:
            run.progress.line(f"stopped at step {position.step} ({stop.reason or 'train.stop_after_steps'}); "
                              f"resume with --resume ({run.run_dir})")
            return None
        if _done(task, position):  # the step budget is spent mid-epoch
            break
    _check_finite(run, bad_step)
    _check_parameters(run, position.step)
    return meters.averages(task.ctx)


def _save_position(run: _Run, position: Position, meters: Meters, bad_step: torch.Tensor) -> None:
    """A mid-epoch ``last.pt``, once the losses and the weights are known to be finite."""
    _check_finite(run, bad_step)
    _check_parameters(run, position.step)
    average_batchnorm_statistics(run.task.model, run.task.ctx)  # every rank calls this: the checkpoint is rank 0's
    position.meters = meters.state()
    save_checkpoint(run, run.run_dir / "last.pt", position)


def _check_finite(run: _Run, bad_step: torch.Tensor) -> None:
    ctx = run.task.ctx
    step = int(all_reduce_sum(bad_step.clamp(min=-1) + 1, ctx)) - 1 if ctx.enabled else int(bad_step)
    if step >= 0:
        raise NonFiniteLossError(f"non-finite loss at step {step + 1}; stopped, the last good checkpoint "
                                 f"in {str(run.run_dir)!r} is kept")


def _check_parameters(run: _Run, step: int) -> None:
    """Before a checkpoint: the last update can turn weights non-finite while its loss was finite."""
    tensors = [*run.task.params, *(b for b in run.task.model.buffers() if b.is_floating_point())]
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    if not bool(finite):
        raise NonFiniteLossError(f"the model's parameters or BatchNorm statistics became non-finite by step {step}; "
                                 f"stopped, the last good checkpoint in {str(run.run_dir)!r} is kept")


def _end_epoch(run: _Run, position: Position, train_metrics: Dict[str, float], seconds: float) -> Dict[str, Any]:
    """Test, log the epoch, write ``best.pt`` (on a better metric) and ``last.pt``."""
    task, epoch = run.task, position.epoch
    average_batchnorm_statistics(task.model, task.ctx)  # one set of statistics for the test and the saves
    final = epoch == task.epochs or (task.max_steps is not None and position.step >= task.max_steps)
    test = task.evaluate(epoch) if final or epoch % max(task.eval_every, 1) == 0 else {}
    record = {"epoch": epoch, "step": position.step, "lr": task.optimizer.param_groups[0]["lr"],
              **train_metrics, **test, **task.facts(epoch), "seconds": seconds}
    improved = task.metric in test and test[task.metric] > position.best
    position.best = max(position.best, test[task.metric]) if task.metric in test else position.best
    position.next_epoch()
    if run.writer is not None:
        run.writer.log_epoch(record, truncate_after=epoch)
        # best.pt before last.pt: a kill between the two then replays this epoch and rewrites best.pt
        if improved:
            save_checkpoint(run, run.run_dir / "best.pt", position)
        save_checkpoint(run, run.run_dir / "last.pt", position)
    run.progress.line(task.line(record, position.best))
    return record


def _finish(run: _Run, position: Position, begun: Dict[str, Any], seconds: float) -> Dict[str, Any]:
    records = read_jsonl(run.run_dir / METRICS_JSONL)
    # the thread count changes the float sums, so a run re-run with another one differs (STUDY.md)
    summary = {**run.task.summary(records, position.best, begun), "steps": position.step,
               "train_seconds": seconds, "torch_threads": torch.get_num_threads(), "run_dir": str(run.run_dir)}
    if run.task.ctx.is_main:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        run.task.finish(run.run_dir, summary)
    return summary
