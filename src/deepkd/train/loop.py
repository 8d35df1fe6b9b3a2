"""The classification task: the step is on one screen in :func:`train_step`: forward, the method's
named loss terms, then either ``backward`` + ``step`` (plain optimizer) or per-stream gradients +
``step(grads)`` (``DecoupledMomentumSGD``). :class:`ClassificationTask` hands it to the engine's
loop (:mod:`deepkd.engine.loop`), and :func:`train` runs a config of any registered task."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from deepkd.engine.distributed import Dist, all_reduce_sum, broadcast_module, init_device, shutdown_distributed
from deepkd.engine.logs import MetricsWriter, Progress
from deepkd.engine.loop import run_task
from deepkd.engine.run_folder import claim_run_folder, run_directory
from deepkd.engine.step import optimize
from deepkd.engine.task import TASKS, Task, Watch
from deepkd.losses import Method
from deepkd.models import save_weights
from deepkd.optim import DecoupledMomentumSGD
from deepkd.train import build, detection_task  # noqa: F401  (detection_task registers the "detection" task)
from deepkd.train.card import write_card
from deepkd.train.config import RunConfig, check_resume, config_to_dict, save_config
from deepkd.train.forward import autocast, forward_pair
from deepkd.train.gsnr_probe import adapt_momentum, momentum_record
from deepkd.train.optimizers import build_auto_momentum

__all__ = ["ClassificationTask", "Run", "evaluate", "setup_run", "train", "train_step"]


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
                                                teacher_logits=teacher_logits, teacher_mode=run.method.teacher_mode,
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


def setup_run(cfg: RunConfig, run_dir: Path, *, resume: bool = False) -> Run:
    """Build every object of a run, in a fixed order so that a seed fixes the initial weights (the
    engine hands the run its metrics writer and progress bar when it starts; ``resume``: unused, kept
    for callers)."""
    torch.manual_seed(cfg.seed)
    device, ctx = init_device(build.build_device(cfg.train.device))
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
              build.trainable(student, method), None, Progress("none"),
              auto_momentum=build_auto_momentum(cfg.optimizer),
              extractors=build.build_extractors(method, student, teacher))
    if cfg.train.teacher_cache and teacher is not None:
        run.cache = build.build_teacher_cache(cfg, teacher, data.train, ctx)
    return run


def _batch_extras(run: Run, loader, epoch: int, index: int):
    """``(teacher logits from the cache, sample indices)`` of batch ``index``, each None when not used."""
    cached = run.cache.lookup(*loader.batch_views(epoch, index)) if run.cache is not None else None
    return cached, loader.batch_indices(epoch, index) if run.method.needs_index else None


def _record_gsnr(run: Run, images: torch.Tensor, targets: torch.Tensor, epoch: int, step: int) -> None:
    from deepkd.train.gsnr_probe import measure_gsnr

    record = measure_gsnr(run, images, targets, epoch)
    if run.writer is not None:
        run.writer.log_gsnr({"step": step, "epoch": epoch, **record})


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


def _buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The checkpointed buffers of ``model`` (BatchNorm running statistics and counts), not its parameters."""
    parameters = dict(model.named_parameters())
    return {name: value for name, value in model.state_dict().items() if name not in parameters}


class ClassificationTask(Task):
    """A classification run (:class:`Run`) as the engine drives it: best.pt by test top-1."""

    name, metric = "classification", "test_top1"

    def __init__(self, run: Run):
        self.run = run
        self.model, self.optimizer, self.epochs = run.student, run.optimizer, run.cfg.schedule.epochs
        self.device, self.ctx, self.eval_every = run.device, run.ctx, run.cfg.train.eval_every

    @property
    def params(self) -> List[nn.Parameter]:
        return self.run.params

    def attach(self, writer: Optional[MetricsWriter], progress: Progress) -> None:
        self.writer = self.run.writer = writer
        self.progress = self.run.progress = progress

    def batches(self, epoch: int, start_batch: int):
        return self.run.data.train.iter_epoch(epoch, start_batch=start_batch)

    def num_batches(self) -> int:
        return len(self.run.data.train)

    def set_lr(self, epoch: int, progress: float, step: int) -> None:
        _set_lr(self.run, epoch, progress)

    def step(self, batch, epoch: int, position):
        """:func:`train_step` on the batch; then, when due, the GSNR probe and ``stream_momentum: auto``."""
        run, step = self.run, position.step + 1
        images, targets = _to_device(*batch, run.device, run.cfg.train.channels_last)
        terms, logits = train_step(run, images, targets, epoch, *_batch_extras(run, run.data.train, epoch,
                                                                                position.batch))
        if run.cfg.train.gsnr_every and step % run.cfg.train.gsnr_every == 0:
            _record_gsnr(run, images, targets, epoch, step)
        adapt_momentum(run, images, targets, epoch, step)  # stream_momentum: auto, when due
        count = torch.tensor(float(targets.numel()), device=run.device)
        loss = torch.stack(list(terms.values())).sum()
        sums = {f"loss/{name}": value * count for name, value in terms.items()}
        sums.update({"loss": loss * count, "top1": 100 * (logits.argmax(-1) == targets).sum(), "count": count})
        return terms, sums

    def evaluate(self, epoch: int) -> Dict[str, float]:
        test = _evaluate(self.run, self.run.forward)
        return {"test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"]}

    def facts(self, epoch: int) -> Dict[str, Any]:
        return {"topk": self.run.method.topk(epoch), **momentum_record(self.run)}

    def line(self, record: Dict[str, Any], best: float) -> str:
        tested = (f" test_top1 {record['test_top1']:.2f} test_top5 {record['test_top5']:.2f} best {best:.2f}"
                  if "test_top1" in record else "")
        return (f"epoch {record['epoch']}: train_loss {record['train_loss']:.4f} train_top1 "
                f"{record['train_top1']:.2f}{tested} lr {record['lr']:.4g} ({record['seconds']:.1f}s)")

    def begin(self) -> Dict[str, Any]:
        return {"teacher_top1": _teacher_accuracy(self.run)}

    def state_dict(self) -> Dict[str, Any]:
        run = self.run
        state = {"model": run.student.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "method": run.method.state_dict()}  # a feature method's connectors and memory (else empty)
        if run.auto_momentum is not None:
            state["auto_momentum"] = run.auto_momentum.state_dict()
        if run.teacher is not None and run.method.teacher_mode == "train":  # its BatchNorm running statistics move
            state["teacher_buffers"] = _buffers(run.teacher)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        run = self.run
        run.student.load_state_dict(state["model"])
        run.method.load_state_dict(state.get("method", {}))
        run.optimizer.load_state_dict(state["optimizer"])  # with the coefficients (param_groups' stream_momentum)
        if run.auto_momentum is not None:
            run.auto_momentum.load_state_dict(state["auto_momentum"])
        if "teacher_buffers" in state:
            run.teacher.load_state_dict({**run.teacher.state_dict(), **state["teacher_buffers"]})

    def summary(self, records: List[Dict[str, Any]], best: float, begun: Dict[str, Any]) -> Dict[str, Any]:
        cfg, tested = self.run.cfg, [r for r in records if "test_top1" in r]  # train.eval_every may skip epochs
        return {"status": "finished", "experiment": cfg.experiment, "seed": cfg.seed, "method": cfg.method.name,
                "student": cfg.student.name, "teacher": cfg.teacher.name if cfg.teacher else None, **begun,
                "best_top1": best, "best_epoch": max(tested, key=lambda r: r["test_top1"])["epoch"] if tested else 0,
                "last_top1": tested[-1]["test_top1"] if tested else float("nan"), "epochs": self.epochs}

    def finish(self, run_dir: Path, summary: Dict[str, Any]) -> None:
        save_weights(self.run.student, run_dir / "student.safetensors")
        write_card(run_dir)  # README.md, config.json, model.safetensors: the Hugging Face layout


@TASKS.register("classification")
def build_classification(cfg: RunConfig, run_dir: Path, *, resume: bool = False) -> ClassificationTask:
    """The classification task of a config (:func:`setup_run`); rank 0 writes ``data.json``."""
    run = setup_run(cfg, run_dir, resume=resume)
    if run.ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "data.json").write_text(json.dumps(run.data.facts(), indent=1))
    return ClassificationTask(run)


def watch(cfg: RunConfig) -> Watch:
    """How a run of ``cfg`` is watched: its train section's watch keys."""
    t = cfg.train
    return Watch(log_every=t.log_every, checkpoint_every=t.checkpoint_every, stop_after_steps=t.stop_after_steps,
                 progress=t.progress, tensorboard=t.tensorboard, wandb=t.wandb, wandb_project=t.wandb_project)


def train(cfg: RunConfig, *, resume: bool = False, run_dir: Optional[str | Path] = None) -> Dict[str, Any]:
    """Train (or resume) one run of any task (``cfg.task``, looked up in :data:`deepkd.engine.task.TASKS`);
    returns its summary (also written to ``summary.json``).

    The folder is claimed first (:func:`deepkd.engine.run_folder.claim_run_folder`: lock, existing run,
    the resume check), so a second run into a live run's folder is refused before anything is written.
    A resumed run keeps the folder's ``config.yaml`` (that of the code and config that started it).
    """
    build_task = TASKS.get(cfg.task)
    run_dir = Path(run_dir) if run_dir is not None else run_directory(cfg)
    with claim_run_folder(run_dir, resume=resume,
                          check=lambda stored, source: check_resume(stored, cfg, source)) as resuming:
        task = build_task(cfg, run_dir, resume=resuming)
        try:
            if task.ctx.is_main and not resuming:
                run_dir.mkdir(parents=True, exist_ok=True)
                save_config(cfg, run_dir / "config.yaml")
            return run_task(task, run_dir, resume=resuming, watch=watch(cfg), config=config_to_dict(cfg))
        finally:
            shutdown_distributed(task.ctx)
