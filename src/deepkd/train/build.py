"""``build_*``: turn a classification run's config sections into the objects it needs: data, models,
method, optimizer and schedule (the loop and the model card read a few plain values themselves:
epochs, names, the train section)."""
from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from deepkd.data import FolderOptions, build_data
from deepkd.errors import ConfigError, MissingFileError
from deepkd.losses import Method
from deepkd.losses.registry import build_method as _build_method
from deepkd.losses.registry import method_builder
from deepkd.models import create_model, load_pretrained
from deepkd.models.ecosystem import data_config
from deepkd.models.features import FeatureExtractor, feature_info
from deepkd.models.teachers import find_teacher, missing_teacher_message
from deepkd.train.data_config import FASHION_MNIST_KEYS, FOLDER_KEYS
from deepkd.train.method_config import MethodConfig, method_features, method_needs_teacher, method_views
from deepkd.train.optim_config import OptimizerConfig, ScheduleConfig
from deepkd.train.optimizers import OPTIMIZERS, SCHEDULES
from deepkd.train.run_config import ModelConfig, RunConfig


def build_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    return device


def build_dataset(cfg: RunConfig, *, device: torch.device, rank: int, world_size: int):
    """The train/test loaders and dataset facts (``num_classes``, ``input_size``, ``classes``); a
    two-view method (MLKD, CRLD) gets training batches of two views, weak and strong."""
    data, synthetic = cfg.data, cfg.data.synthetic
    return build_data(
        data.dataset, root=data.root, batch_size=data.batch_size, eval_batch_size=data.eval_batch_size,
        device=device, seed=cfg.seed, download=data.download, num_workers=data.num_workers, rank=rank,
        world_size=world_size, drop_last=data.drop_last, flip=data.flip, strong=method_views(cfg.method.name) == 2,
        folder=folder_options(cfg),
        synthetic_train=synthetic.num_train, synthetic_test=synthetic.num_test, synthetic_seed=synthetic.seed,
        synthetic_noise=synthetic.noise, **fashion_mnist_options(cfg))


def fashion_mnist_options(cfg: RunConfig) -> dict:
    """Fashion-MNIST's keys (``image_size``, ``channels``, ``train_per_class``, ``subset_seed``, ``crop_pad``); none
    for another dataset, whose images they do not change."""
    if cfg.data.dataset != "fashion_mnist":
        return {}
    return {key: getattr(cfg.data, key) for key in FASHION_MNIST_KEYS}


def folder_options(cfg: RunConfig) -> FolderOptions:
    """Image-folder options: the recipe's keys, else the teacher's timm pretrained data config (its
    frozen weights expect that input), else the student's, else :class:`FolderOptions` defaults."""
    models = [m for m in (cfg.teacher, cfg.student) if m is not None]
    pretrained = next((c for c in (data_config(m.name, m.weights) for m in models) if c), {})
    keys = {k: getattr(cfg.data, k) for k in FOLDER_KEYS if getattr(cfg.data, k) is not None}
    chosen = {k: pretrained[k] for k in ("image_size", "interpolation", "mean", "std") if k in pretrained}
    # the pretrained crop_pct sets the evaluation resize of random_resized crops; pad_crop evaluates at image_size
    if "crop_pct" in pretrained and "resize" not in keys and keys.get("crop", FolderOptions.crop) == "random_resized":
        size = keys.get("image_size", pretrained["image_size"])
        chosen["resize"] = math.floor(size / pretrained["crop_pct"])
    if "mean" in keys:
        chosen.pop("std", None)
    return FolderOptions(**{**chosen, **keys})


def build_model(cfg: ModelConfig, num_classes: int, role: str) -> nn.Module:
    """A model with its ``weights`` (a file, ``torchvision:<ENUM>`` or ``timm:<tag>``). A student's
    classifier may be re-initialised for the data's class count; a teacher's must fit."""
    model = create_model(cfg.name, num_classes=num_classes)
    if cfg.weights:
        load_pretrained(model, cfg.weights, reset_head=role == "student", role=role)
    return model


def build_student(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return build_model(cfg, num_classes, "student")


def build_teacher(cfg: Optional[ModelConfig], method: str, num_classes: int,
                  dataset: str = "cifar100") -> Optional[nn.Module]:
    """The frozen teacher in eval mode, or None for a ``method`` (its name) that needs no teacher.
    Without ``teacher.weights``, a CIFAR-100 teacher comes from the community teacher cache by name."""
    if not method_needs_teacher(method):
        return None
    if cfg is None:
        raise ConfigError("this method distils from a teacher: add a teacher section (name and weights)")
    if not cfg.weights:
        if dataset != "cifar100":
            raise ConfigError("teacher.weights is not set: point it at a trained teacher checkpoint, e.g. "
                             "runs/<teacher experiment>/seed0/best.pt")
        found = find_teacher(cfg.name)
        if found is None:
            raise MissingFileError(missing_teacher_message(cfg.name))
        cfg = cfg.model_copy(update={"weights": str(found)})
    teacher = build_model(cfg, num_classes, "teacher")
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def build_method(cfg: MethodConfig, *, student: Optional[nn.Module] = None, teacher: Optional[nn.Module] = None,
                 data=None) -> Method:
    """The loss module from the method section (a DTM ramp end is the recipe's ``topk_ramp_end``). A
    feature method's builder also gets what it declares of ``PROVIDED``: the student's and teacher's
    feature shapes (a dry run on one test image's shape), the training set's size and labels, the models."""
    if not method_features(cfg.name):
        return _build_method(cfg.name, **cfg.arguments())
    wanted = inspect.signature(method_builder(cfg.name)).parameters
    if getattr(method_builder(cfg.name), "needs_index", False) and not hasattr(data.train, "batch_indices"):
        raise ConfigError(f"method {cfg.name!r} needs each training sample's index, which this dataset's training "
                          f"loader ({type(data.train).__name__}) does not give (it has no batch_indices)")
    provided = {}
    if {"student_info", "teacher_info"} & set(wanted):
        shape = tuple(next(iter(data.test.iter_epoch(0)))[0].shape[1:])
        provided["student_info"] = feature_info(student, shape)
        provided["teacher_info"] = feature_info(teacher, shape) if teacher is not None else None
    if "num_samples" in wanted:
        provided["num_samples"] = data.train.num_samples
    if "train_labels" in wanted:
        provided["train_labels"] = data.train.labels.cpu()
    provided.update(student_model=student, teacher_model=teacher)
    return _build_method(cfg.name, **cfg.arguments(), **{k: v for k, v in provided.items() if k in wanted})


def build_extractors(method: Method, student: nn.Module, teacher: Optional[nn.Module]):
    """A feature method's ``(student, teacher)`` :class:`FeatureExtractor` pair (the architectures'
    built-in feature points), else None: a logit method reads ``model(x)``."""
    if not method.features:
        return None
    return FeatureExtractor(student), FeatureExtractor(teacher) if teacher is not None else None


def build_sync_batchnorm(model: nn.Module, device: torch.device, ctx) -> nn.Module:
    """``train.sync_batchnorm``: BatchNorm over the global batch (torch's SyncBatchNorm, CUDA only)."""
    if device.type != "cuda":
        raise ConfigError("train.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); "
                          "on the CPU the BatchNorm statistics are averaged across ranks before each test and save")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if ctx.enabled else model


def trainable(*modules: nn.Module) -> list:
    """The trainable parameters of ``modules``, in order: the student's, then a feature method's own
    (its connectors; mdistiller's ``get_learnable_parameters``)."""
    return [p for module in modules for p in module.parameters() if p.requires_grad]


def build_optimizer(cfg: OptimizerConfig, *modules: nn.Module) -> torch.optim.Optimizer:
    """The registered optimizer ``cfg.name`` (:data:`deepkd.train.optimizers.OPTIMIZERS`) over the
    trainable parameters of ``modules`` (:func:`trainable`). Weight decay on every parameter (reference
    recipe: BN, biases and connectors included)."""
    return OPTIMIZERS.get(cfg.name)(cfg, trainable(*modules))


def build_schedule(cfg: ScheduleConfig, base_lr: float) -> Callable[[int, float], float]:
    """``lr(epoch, progress)`` of the registered schedule ``cfg.name``
    (:data:`deepkd.train.optimizers.SCHEDULES`): epoch counted from 1, progress in [0, 1) within the epoch."""
    return SCHEDULES.get(cfg.name)(cfg, base_lr)


def build_teacher_cache(cfg: RunConfig, teacher: nn.Module, loader, ctx):
    """Teacher logits of every augmented view, shared on disk by every run with the same teacher
    weights and training images (``<output_dir>/.teacher_cache/<key>.pt``); rank 0 computes it."""
    import hashlib
    import json

    import torch.distributed as dist

    from deepkd.data.device_loader import DeviceLoader
    from deepkd.data.teacher_cache import TeacherLogitCache

    if not isinstance(loader, DeviceLoader) or loader.rotation:
        raise ConfigError("train.teacher_cache needs the device-resident loader with crop/flip views only (cifar10, "
                         "cifar100, fashion_mnist, synthetic, or an in-memory image folder); "
                         "set train.teacher_cache: false")
    weights = Path(cfg.teacher.weights or find_teacher(cfg.teacher.name) or "")
    digest = hashlib.sha256(weights.read_bytes() if weights.is_file() else str(weights).encode())
    images = [cfg.data.dataset, cfg.data.root, cfg.data.synthetic.model_dump(mode="json"), loader.num_samples]
    if fashion_mnist_options(cfg):  # padding, channels, subset and crop padding change the views (not other sets)
        images.append(fashion_mnist_options(cfg))
    digest.update(json.dumps([cfg.teacher.name, images, cfg.train.teacher_cache_dtype]).encode())
    path = Path(cfg.output_dir) / ".teacher_cache" / f"{digest.hexdigest()[:20]}.pt"
    if ctx.is_main:
        dtype = torch.bfloat16 if cfg.train.teacher_cache_dtype == "bf16" else torch.float32
        TeacherLogitCache.ensure(path, lambda: TeacherLogitCache.build(teacher, loader, dtype=dtype))
    if ctx.enabled:
        dist.barrier()
    return TeacherLogitCache.load(path, device=loader.device)


def describe(cfg: RunConfig) -> str:
    teacher = f"{cfg.teacher.name} -> " if cfg.teacher is not None else ""
    return f"{cfg.experiment}: {teacher}{cfg.student.name}, method {cfg.method.name}, seed {cfg.seed}"
