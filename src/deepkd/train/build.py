"""``build_*``: turn config sections into objects (the only place that reads config objects)."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from deepkd.data import build_data
from deepkd.losses import Method
from deepkd.losses.registry import METHODS, build_method as _build_method
from deepkd.models import create_model, load_weights
from deepkd.optim import DecoupledMomentumSGD, cosine_lr, step_lr
from deepkd.train.config import DataConfig, MethodConfig, ModelConfig, OptimizerConfig, RunConfig, ScheduleConfig


def build_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine")
    return device


def build_dataset(cfg: DataConfig, *, seed: int, device: torch.device, rank: int, world_size: int):
    """The train/test loaders and dataset facts (``num_classes``, ``input_size``)."""
    synthetic = cfg.synthetic
    return build_data(
        cfg.dataset, root=cfg.root, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
        device=device, seed=seed, download=cfg.download, num_workers=cfg.num_workers, rank=rank,
        world_size=world_size, drop_last=cfg.drop_last, synthetic_train=synthetic.num_train,
        synthetic_test=synthetic.num_test, synthetic_seed=synthetic.seed, synthetic_noise=synthetic.noise)


def build_student(cfg: ModelConfig, num_classes: int) -> nn.Module:
    model = create_model(cfg.name, num_classes=num_classes)
    if cfg.weights:
        load_weights(model, _existing(cfg.weights, "student.weights"))
    return model


def build_teacher(cfg: Optional[ModelConfig], method: Method, num_classes: int) -> Optional[nn.Module]:
    """The frozen teacher in eval mode, or None for a method that needs no teacher."""
    if not method.needs_teacher:
        return None
    if cfg is None or not cfg.weights:
        raise ValueError("this method distils from a teacher: set teacher.name and teacher.weights "
                         "(a checkpoint of a trained teacher, e.g. runs/<teacher>/seed0/best.pt)")
    teacher = create_model(cfg.name, num_classes=num_classes)
    load_weights(teacher, _existing(cfg.weights, "teacher.weights"))
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def _existing(path: str, key: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}: checkpoint {path!r} does not exist")
    return path


def build_method(cfg: MethodConfig, schedule: ScheduleConfig) -> Method:
    """The loss module; a DTM ramp ends by default at the first LR decay (deepkd's choice)."""
    arguments = cfg.arguments()
    params = inspect.signature(METHODS.get(cfg.name)).parameters
    if "topk_ramp_end" in params and "topk_ramp_end" not in arguments and schedule.milestones:
        arguments["topk_ramp_end"] = min(schedule.milestones)
    return _build_method(cfg.name, **arguments)


def build_optimizer(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Weight decay on every parameter (reference recipe: BN and biases included)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "decoupled":
        return DecoupledMomentumSGD(params, lr=cfg.lr, momentum=dict(cfg.stream_momentum),
                                    weight_decay=cfg.weight_decay,
                                    weight_decay_stream=cfg.weight_decay_stream, merge_equal=cfg.merge_equal)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


def build_schedule(cfg: ScheduleConfig, base_lr: float) -> Callable[[int, float], float]:
    """``lr(epoch, progress)``: epoch counted from 1, progress in [0, 1) within the epoch."""
    if cfg.name == "step":
        return lambda epoch, progress: step_lr(epoch, base_lr, cfg.milestones, cfg.gamma)
    return lambda epoch, progress: cosine_lr(epoch - 1 + progress, base_lr, cfg.epochs, cfg.warmup_epochs,
                                             cfg.warmup_start_factor, cfg.min_lr)


def build_teacher_cache(cfg: RunConfig, teacher: nn.Module, loader, ctx):
    """Teacher logits of every augmented view, shared on disk by every run with the same teacher
    weights and training images (``<output_dir>/.teacher_cache/<key>.pt``); rank 0 computes it."""
    import hashlib
    import json

    import torch.distributed as dist

    from deepkd.data.device_loader import DeviceLoader
    from deepkd.data.teacher_cache import TeacherLogitCache

    if not isinstance(loader, DeviceLoader):
        raise ValueError("train.teacher_cache needs the device-resident loader (cifar100 or synthetic data)")
    digest = hashlib.sha256(Path(cfg.teacher.weights).read_bytes())
    images = [cfg.data.dataset, cfg.data.root, cfg.data.synthetic.model_dump(mode="json"), loader.num_samples]
    digest.update(json.dumps([cfg.teacher.name, images, cfg.train.teacher_cache_dtype]).encode())
    path = Path(cfg.output_dir) / ".teacher_cache" / f"{digest.hexdigest()[:20]}.pt"
    if ctx.is_main and not path.is_file():
        dtype = torch.bfloat16 if cfg.train.teacher_cache_dtype == "bf16" else torch.float32
        cache = TeacherLogitCache.build(teacher, loader, dtype=dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        cache.save(tmp)
        tmp.replace(path)
    if ctx.enabled:
        dist.barrier()
    return TeacherLogitCache.load(path, device=loader.device)


def describe(cfg: RunConfig) -> str:
    teacher = f"{cfg.teacher.name} -> " if cfg.teacher is not None else ""
    return f"{cfg.experiment}: {teacher}{cfg.student.name}, method {cfg.method.name}, seed {cfg.seed}"
