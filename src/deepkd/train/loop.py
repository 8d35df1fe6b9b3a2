"""The training loop. The step is on one screen in :func:`train_step`: forward, the method's named
loss terms, then either ``backward`` + ``step`` (plain optimizer) or per-stream gradients +
``step(grads)`` (``DecoupledMomentumSGD``)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from deepkd.errors import TrainingError
from deepkd.losses import Method
from deepkd.models import save_weights
from deepkd.optim import DecoupledMomentumSGD
from deepkd.provenance import provenance
from deepkd.train import build
from deepkd.train.card import write_card
from deepkd.train.checkpoint import (
    FORMAT,
    atomic_save,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from deepkd.train.config import RunConfig, config_to_dict, save_config
from deepkd.train.distributed import (
    Dist,
    all_reduce_sum,
    average_batchnorm_statistics,
    broadcast_module,
    init_distributed,
    shutdown_distributed,
)
from deepkd.train.forward import autocast, forward_pair
from deepkd.train.gsnr_probe import adapt_momentum, momentum_record
from deepkd.train.logs import MetricsWriter, Progress
from deepkd.train.meters import Meters
from deepkd.train.optimizers import build_auto_momentum
from deepkd.train.run_folder import claim_run_folder
from deepkd.train.signals import StopSignals as _Interrupt
from deepkd.train.step import optimize


class NonFiniteLossError(TrainingError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


@dataclass
class Run:
    cfg: RunConfig
    run_dir: Path
    device: torch.device
    ctx: Dist
    student: nn.Module
    forward: nn.Module  # the student, possibly compiled
    teacher: Optional[nn.Module]
    method: Method
    optimizer: torch.optim.Optimizer
    lr_at: Any
    data: Any
    params: list
    writer: Optional[MetricsWriter]
    progress: Progress
    cache: Any = None  # TeacherLogitCache serving the teacher's logits per augmented view
    auto_momentum: Any = None  # GSNRMomentum of ``stream_momentum: auto`` (its state is checkpointed)
    extractors: Any = None  # a feature method's (student, teacher) FeatureExtractors

    @property
    def decoupled(self) -> bool:
        return isinstance(self.optimizer, DecoupledMomentumSGD)


def train_step(run: Run, images: torch.Tensor, targets: torch.Tensor, epoch: int,
               teacher_logits: Optional[torch.Tensor] = None, index: Optional[torch.Tensor] = None):
    """One optimisation step; returns the detached loss terms and the student logits (of the weak
    view for a two-view batch). ``teacher_logits`` (the teacher-logit cache) replace the teacher forward;
    ``index`` (the samples' positions in the training set) goes to a method that ``needs_index``."""
    with autocast(run.device, run.cfg.train.precision):
        student, teacher, logits = forward_pair(*(run.extractors or (run.forward, run.teacher)), images,
                                                teacher_logits=teacher_logits,
                                                concat=run.cfg.train.student_views == "concat")
    extra = {"index": index} if run.method.needs_index else {}
    terms = run.method(student, teacher, targets, epoch=epoch, **extra)  # logits, or a feature method's Features
    optimize(terms, run.optimizer, run.params, run.ctx)  # backward (one pass per momentum) + step
    weak = logits[0] if images.dim() == 5 else logits  # training accuracy: the weak view's, as the reference logs
    return {name: term.value.detach() for name, term in terms.items()}, weak.detach()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, precision: str = "fp32",
             channels_last: bool = False, ctx: Optional[Dist] = None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole test set (all ranks of ``ctx``)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for images, targets in loader.iter_epoch(0):
        images, targets = _to_device(images, targets, device, channels_last)
        with autocast(device, precision):
            logits = model(images).float()
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        sums[0] += (top5[:, 0] == targets).sum()
        sums[1] += (top5 == targets[:, None]).any(-1).sum()
        sums[2] += nn.functional.cross_entropy(logits, targets, reduction="sum")
        sums[3] += targets.numel()
    model.train(was_training)
    top1, top5, loss, count = all_reduce_sum(sums, ctx or Dist()).tolist()
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "loss": loss / count}


def _to_device(images: torch.Tensor, targets: torch.Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:  # a two-view batch [2, b, 3, H, W] as 4-D images, then its views again
        images = images.flatten(0, images.dim() - 4).contiguous(memory_format=torch.channels_last).view(images.shape)
    return images, targets.to(device, non_blocking=True)


def _evaluate(run: Run, model: nn.Module) -> Dict[str, float]:
    return evaluate(model, run.data.test, run.device, precision=run.cfg.train.precision,
                    channels_last=run.cfg.train.channels_last, ctx=run.ctx)


def _set_lr(run: Run, epoch: int, progress: float) -> float:
    lr = run.lr_at(epoch, progress)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass
class Position:
    """Where a run stands: what a checkpoint stores besides the weights, optimizer and RNG states."""

    epoch: int = 1  # the epoch in progress, 1-based
    batch: int = 0  # batches of that epoch already trained
    step: int = 0  # optimizer steps over the whole run
    best: float = -1.0  # best test top-1 (%) so far
    meters: Dict[str, torch.Tensor] = field(default_factory=dict)  # the epoch's partial sums at the last save

    @classmethod
    def from_checkpoint(cls, ckpt: Dict[str, Any]) -> "Position":
        return cls(**{f.name: ckpt[f.name] for f in fields(cls)})

    def as_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.meters = self.epoch + 1, 0, {}


def save_state(run: Run, path: Path, position: Position) -> None:
    """Write a checkpoint atomically (rank 0 only); nothing already on disk is lost on failure."""
    if not run.ctx.is_main:
        return
    state = {"format": FORMAT, "model": run.student.state_dict(), "optimizer": run.optimizer.state_dict(),
             "method": run.method.state_dict(),  # a feature method's connectors and memory (else empty)
             **position.as_dict(), "topk": run.method.topk(position.epoch), "rng": rng_state(),
             "config": config_to_dict(run.cfg), "provenance": provenance()}
    if run.auto_momentum is not None:
        state["auto_momentum"] = run.auto_momentum.state_dict()
    atomic_save(state, path)


def setup_run(cfg: RunConfig, run_dir: Path, *, resume: bool = False) -> Run:
    """Build every object of a run, in a fixed order so that a seed fixes the initial weights.
    A resumed run keeps the folder's ``config.yaml`` (that of the code and config that started it)."""
    torch.manual_seed(cfg.seed)
    device = build.build_device(cfg.train.device)
    ctx = init_distributed(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    data = build.build_dataset(cfg, device=device, rank=ctx.rank, world_size=ctx.world_size)
    student = build.build_student(cfg.student, data.num_classes).to(device)
    teacher = build.build_teacher(cfg.teacher, cfg.method.name, data.num_classes, cfg.data.dataset)
    teacher = teacher.to(device) if teacher is not None else None
    method = build.build_method(cfg.method, student=student, teacher=teacher, data=data).to(device)
    if cfg.train.channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last) if teacher is not None else None
    if cfg.train.sync_batchnorm:
        student = build.build_sync_batchnorm(student, device, ctx)
    broadcast_module(student, ctx)
    broadcast_module(method, ctx)
    optimizer = build.build_optimizer(cfg.optimizer, student, method)
    # "reduce-overhead" adds CUDA graphs: the small-batch CIFAR recipe is launch-bound on a GPU
    forward = torch.compile(student, mode=cfg.train.compile_mode) if cfg.train.compile else student
    run = Run(cfg, run_dir, device, ctx, student, forward, teacher, method, optimizer,
              build.build_schedule(cfg.schedule, cfg.optimizer.lr), data,
              build.trainable(student, method), _writer(cfg, run_dir, data, ctx, resume),
              Progress(cfg.train.progress, cfg.train.log_every, enabled=ctx.is_main),
              auto_momentum=build_auto_momentum(cfg.optimizer),
              extractors=build.build_extractors(method, student, teacher))
    if cfg.train.teacher_cache and teacher is not None:
        run.cache = build.build_teacher_cache(cfg, teacher, data.train, ctx)
    return run


def _writer(cfg: RunConfig, run_dir: Path, data, ctx: Dist, resume: bool) -> Optional[MetricsWriter]:
    """Rank 0: the folder's ``config.yaml`` (a new run's), ``data.json`` and the metrics writer."""
    if not ctx.is_main:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        save_config(cfg, run_dir / "config.yaml")
    (run_dir / "data.json").write_text(json.dumps(data.facts(), indent=1))
    return MetricsWriter(run_dir, tensorboard=cfg.train.tensorboard, wandb=cfg.train.wandb,
                         wandb_project=cfg.train.wandb_project, config=config_to_dict(cfg))


def restore(run: Run, path: Path) -> Position:
    """Load ``last.pt`` into the run; returns where it stopped."""
    ckpt = load_checkpoint(path)
    run.student.load_state_dict(ckpt["model"])
    run.method.load_state_dict(ckpt.get("method", {}))
    run.optimizer.load_state_dict(ckpt["optimizer"])  # with the coefficients (param_groups' stream_momentum)
    if run.auto_momentum is not None:
        run.auto_momentum.load_state_dict(ckpt["auto_momentum"])
    set_rng_state(ckpt["rng"])
    return Position.from_checkpoint(ckpt)


def train(cfg: RunConfig, *, resume: bool = False, run_dir: Optional[str | Path] = None) -> Dict[str, Any]:
    """Train (or resume) one run; returns its summary (also written to ``summary.json``).

    The folder is claimed first (:func:`deepkd.train.run_folder.claim_run_folder`: lock, existing run,
    resume check), so a second run into a live run's folder is refused before anything is written.
    """
    if cfg.detection:  # data.dataset coco | synthetic_coco: the detection loop, same lock and files
        from deepkd.detection.run import train_detection

        return train_detection(cfg, resume=resume, run_dir=run_dir)
    with claim_run_folder(cfg, run_dir, resume=resume) as (run_dir, resuming):
        run = setup_run(cfg, run_dir, resume=resuming)
        try:
            return _train_epochs(run, restore(run, run_dir / "last.pt") if resuming else Position())
        finally:
            if run.writer is not None:
                run.writer.close()
            shutdown_distributed(run.ctx)


def _run_epoch(run: Run, position: Position, stop: _Interrupt) -> Optional[Dict[str, float]]:
    """Train ``position.epoch`` on from ``position.batch``, advancing ``position``; returns the epoch's
    train metrics, or None when stopped (``last.pt`` then holds this step)."""
    loader, cfg, epoch = run.data.train, run.cfg, position.epoch
    meters = Meters(run.device, position.meters)
    total, start, started = len(loader), position.batch, time.time()
    bad_step = torch.full((), -1, dtype=torch.long, device=run.device)
    desc = f"epoch {epoch}/{cfg.schedule.epochs}"
    batches = run.progress.wrap(loader.iter_epoch(epoch, start_batch=start), total=total, start=start, desc=desc)
    for index, (images, targets) in enumerate(batches, start=start):
        _set_lr(run, epoch, index / total)
        images, targets = _to_device(images, targets, run.device, cfg.train.channels_last)
        terms, logits = train_step(run, images, targets, epoch, *_batch_extras(run, loader, epoch, index))
        meters.update(terms, logits, targets)
        loss = torch.stack(list(terms.values())).sum()
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), position.step, bad_step)
        position.batch, position.step = index + 1, position.step + 1
        logged = position.step % cfg.train.log_every == 0 or index + 1 == total
        if logged:
            _check_finite(run, bad_step)
            run.progress.step(desc, index + 1, total, {"loss": float(loss)}, started)
        if cfg.train.gsnr_every and position.step % cfg.train.gsnr_every == 0:
            _record_gsnr(run, images, targets, epoch, position.step)
        adapt_momentum(run, images, targets, epoch, position.step)  # stream_momentum: auto, when due
        due = cfg.train.checkpoint_every > 0 and position.step % cfg.train.checkpoint_every == 0
        stopping = stop.agreed(run, logged or due) or position.step == cfg.train.stop_after_steps
        if stopping or due:
            _save_position(run, position, meters, bad_step)
        if stopping:
            run.progress.line(f"stopped at step {position.step} ({stop.reason or 'train.stop_after_steps'}); "
                              f"resume with --resume ({run.run_dir})")
            return None
    _check_finite(run, bad_step)
    _check_parameters(run, position.step)
    return meters.averages(run.ctx)


def _batch_extras(run: Run, loader, epoch: int, index: int):
    """``(teacher logits from the cache, sample indices)`` of batch ``index``, each None when not used."""
    views = loader.batch_views(epoch, index) if run.cache is not None or run.method.needs_index else None
    cached = run.cache.lookup(*views) if run.cache is not None else None
    return cached, views[0] if run.method.needs_index else None


def _save_position(run: Run, position: Position, meters: Meters, bad_step: torch.Tensor) -> None:
    """A mid-epoch ``last.pt``, once the losses and the weights are known to be finite."""
    _check_finite(run, bad_step)
    _check_parameters(run, position.step)
    average_batchnorm_statistics(run.student, run.ctx)  # every rank calls this: the checkpoint is rank 0's
    position.meters = meters.state()
    save_state(run, run.run_dir / "last.pt", position)


def _check_finite(run: Run, bad_step: torch.Tensor) -> None:
    step = int(all_reduce_sum(bad_step.clamp(min=-1) + 1, run.ctx)) - 1 if run.ctx.enabled else int(bad_step)
    if step >= 0:
        raise NonFiniteLossError(f"non-finite loss at step {step + 1}; stopped, the last good checkpoint "
                                 f"in {str(run.run_dir)!r} is kept")


def _check_parameters(run: Run, step: int) -> None:
    """Before a checkpoint: the last update can turn weights non-finite while its loss was finite."""
    tensors = [*run.params, *(b for b in run.student.buffers() if b.is_floating_point())]
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    if not bool(finite):
        raise NonFiniteLossError(f"the student's parameters or BatchNorm statistics became non-finite by step {step}; "
                                 "stopped, the "
                                 f"last good checkpoint in {str(run.run_dir)!r} is kept")


def _record_gsnr(run: Run, images: torch.Tensor, targets: torch.Tensor, epoch: int, step: int) -> None:
    from deepkd.train.gsnr_probe import measure_gsnr

    record = measure_gsnr(run, images, targets, epoch)
    if run.writer is not None:
        run.writer.log_gsnr({"step": step, "epoch": epoch, **record})


def _end_epoch(run: Run, position: Position, train_metrics: Dict[str, float], seconds: float) -> Dict[str, Any]:
    epoch = position.epoch
    average_batchnorm_statistics(run.student, run.ctx)  # one set of statistics for the test and the saves
    test = _evaluate(run, run.forward)
    record = {"epoch": epoch, "step": position.step, "lr": run.optimizer.param_groups[0]["lr"],
              **train_metrics, "test_top1": test["top1"], "test_top5": test["top5"],
              "test_loss": test["loss"], "topk": run.method.topk(epoch), **momentum_record(run), "seconds": seconds}
    improved = test["top1"] > position.best
    position.best = max(position.best, test["top1"])
    position.next_epoch()
    if run.writer is not None:
        run.writer.log_epoch(record, truncate_after=epoch)
        # best.pt before last.pt: a kill between the two then replays this epoch and rewrites best.pt
        if improved:
            save_state(run, run.run_dir / "best.pt", position)
        save_state(run, run.run_dir / "last.pt", position)
    run.progress.line(f"epoch {epoch}: train_loss {record['train_loss']:.4f} train_top1 "
                      f"{record['train_top1']:.2f} test_top1 {test['top1']:.2f} test_top5 {test['top5']:.2f} "
                      f"best {position.best:.2f} lr {record['lr']:.4g} ({record['seconds']:.1f}s)")
    return record


def _train_epochs(run: Run, position: Position) -> Dict[str, Any]:
    with _Interrupt() as stop:  # a signal during the teacher's test or the last files is a no-op
        teacher_top1 = _teacher_accuracy(run)
        started = time.time()
        while position.epoch <= run.cfg.schedule.epochs:
            epoch_started = time.time()
            train_metrics = _run_epoch(run, position, stop)
            if train_metrics is None:
                return {"status": "stopped", "reason": stop.reason or "train.stop_after_steps",
                        "run_dir": str(run.run_dir), "step": position.step}
            _end_epoch(run, position, train_metrics, time.time() - epoch_started)
        return _finish(run, position, teacher_top1, time.time() - started)


def _teacher_accuracy(run: Run) -> Optional[float]:
    """The teacher's test top-1, measured once per run directory (a sanity check worth logging)."""
    if run.teacher is None:
        return None
    cached = run.run_dir / "teacher.json"
    if cached.is_file():
        return json.loads(cached.read_text())["top1"]
    top1 = _evaluate(run, run.teacher)["top1"]
    if run.ctx.is_main:
        tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")  # a kill mid-write must not break a resume
        tmp.write_text(json.dumps({"top1": top1}))
        os.replace(tmp, cached)
    run.progress.line(f"teacher {run.cfg.teacher.name}: test top-1 {top1:.2f}")
    return top1


def _finish(run: Run, position: Position, teacher_top1: Optional[float], seconds: float) -> Dict[str, Any]:
    from deepkd.train.logs import METRICS_JSONL, read_jsonl

    records = read_jsonl(run.run_dir / METRICS_JSONL)
    last = records[-1]["test_top1"] if records else float("nan")
    best_epoch = max(records, key=lambda r: r["test_top1"])["epoch"] if records else 0
    summary = {"status": "finished", "experiment": run.cfg.experiment, "seed": run.cfg.seed,
               "method": run.cfg.method.name, "student": run.cfg.student.name,
               "teacher": run.cfg.teacher.name if run.cfg.teacher else None, "teacher_top1": teacher_top1,
               "best_top1": position.best, "best_epoch": best_epoch, "last_top1": last,
               "epochs": run.cfg.schedule.epochs, "steps": position.step, "train_seconds": seconds,
               "run_dir": str(run.run_dir)}
    if run.ctx.is_main:
        save_weights(run.student, run.run_dir / "student.safetensors")
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        write_card(run.run_dir)  # README.md, config.json, model.safetensors: the Hugging Face layout
    return summary
