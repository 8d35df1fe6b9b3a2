"""``deepkd train`` and ``deepkd eval`` of a detection config (``data.dataset: coco | synthetic_coco``).

The only place that turns a detection :class:`deepkd.train.run_config.RunConfig` into objects: COCO (or
the synthetic set) loaders, the detectors of :func:`deepkd.detection.create_detector`, the method
and optimizer of :mod:`deepkd.train.build`, and the iteration schedule, handed to
:class:`deepkd.detection.task.DetectionTask`; :func:`build_detection` is the ``detection`` entry of
the task registry (:func:`deepkd.train.loop.train` runs it under the run folder's lock).
"""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from deepkd.data.cifar import default_root
from deepkd.detection.coco import CocoDetection, DetectionLoader
from deepkd.detection.download import coco_paths, prepare_coco
from deepkd.detection.evaluate import coco_evaluate
from deepkd.detection.models import create_detector
from deepkd.detection.roi import pyramid_info
from deepkd.detection.synthetic import NUM_CLASSES as SYNTHETIC_NUM_CLASSES
from deepkd.detection.synthetic import write_synthetic_coco
from deepkd.detection.task import DetectionTask, start_fresh
from deepkd.engine.distributed import Dist, init_device
from deepkd.engine.task import TASKS
from deepkd.errors import ConfigError, MissingFileError
from deepkd.losses import Method
from deepkd.losses.registry import build_method as _build_method
from deepkd.losses.registry import method_builder
from deepkd.models import load_weights
from deepkd.optim import warmup_multistep_lr
from deepkd.train import build
from deepkd.train.detection_card import write_detection_card
from deepkd.train.method_config import MethodConfig, method_needs_teacher
from deepkd.train.run_config import ModelConfig, RunConfig

COCO_NUM_CLASSES = 91  # torchvision's layout: category ids as labels, background 0


def _synthetic_folder(cfg: RunConfig, ctx: Dist) -> Tuple[Path, int]:
    """The synthetic set's folder (one per generator setting, written by rank 0 when missing)."""
    s = cfg.data.synthetic
    root = Path(cfg.data.root) if cfg.data.root is not None else default_root()
    folder = root / f"synthetic_coco_{s.num_train}_{s.num_val}_{s.image_size}px_seed{s.seed}"
    if ctx.is_main and not (folder / "annotations" / "instances_val.json").is_file():
        for split, count in (("train", s.num_train), ("val", s.num_val)):  # the JSON last: its presence means done
            write_synthetic_coco(folder, split, count, size=s.image_size, seed=s.seed)
    if ctx.enabled:
        torch.distributed.barrier()
    return folder, SYNTHETIC_NUM_CLASSES


def build_detection_data(cfg: RunConfig, ctx: Dist, *, train: bool = True):
    """``(train loader or None, val loader, val COCO ground truth, num_classes)``."""
    data = cfg.data
    if data.dataset == "coco":
        folder, num_classes = prepare_coco(data.root, download=data.download), COCO_NUM_CLASSES
        splits = ("train2017", "val2017")
        (train_images, train_ann), (val_images, val_ann) = (coco_paths(folder, split) for split in splits)
    else:
        folder, num_classes = _synthetic_folder(cfg, ctx)
        (train_images, train_ann), (val_images, val_ann) = coco_paths(folder, "train"), coco_paths(folder, "val")
    val = CocoDetection(val_images, val_ann, train=False)
    val_loader = DetectionLoader(val, data.eval_batch_size or data.batch_size, train=False, workers=data.num_workers,
                                 rank=ctx.rank, world_size=ctx.world_size)
    train_loader = None
    if train:
        dataset = CocoDetection(train_images, train_ann, train=True, flip=data.flip, seed=cfg.seed)
        train_loader = DetectionLoader(dataset, data.batch_size, train=True, seed=cfg.seed, workers=data.num_workers,
                                       rank=ctx.rank, world_size=ctx.world_size)
    return train_loader, val_loader, val.coco, num_classes


def build_detector(model: ModelConfig, cfg: RunConfig, num_classes: int) -> nn.Module:
    """A registered detector with its weights, at the data section's input scale."""
    return create_detector(model.name, num_classes, weights=model.weights, weights_backbone=model.weights_backbone,
                           min_size=tuple(cfg.data.min_size), max_size=cfg.data.max_size)


def build_detection_lr(cfg: RunConfig):
    """``lr_at(step)``: :func:`warmup_multistep_lr` of the schedule section."""
    s = cfg.schedule
    return functools.partial(warmup_multistep_lr, base_lr=cfg.optimizer.lr, milestones=tuple(s.milestones),
                             gamma=s.gamma, warmup_iterations=s.warmup_iterations, warmup_factor=s.warmup_factor)


def build_detection_method(cfg: MethodConfig, student: nn.Module, teacher: Optional[nn.Module]) -> Method:
    """The method section's loss module; a feature method (``reviewkd``, ``dkd+reviewkd``) also gets the
    student's and teacher's backbone levels (:func:`deepkd.detection.roi.pyramid_info`)."""
    wanted = inspect.signature(method_builder(cfg.name)).parameters
    if not {"student_info", "teacher_info"} & set(wanted):
        return _build_method(cfg.name, **cfg.arguments())
    infos = {"student_info": pyramid_info(student), "teacher_info": pyramid_info(teacher)}
    return _build_method(cfg.name, **cfg.arguments(), **{k: v for k, v in infos.items() if k in wanted})


def _objects(cfg: RunConfig, device: torch.device, ctx: Dist) -> Dict[str, Any]:
    """Every object :class:`DetectionTask` takes, built in a fixed order (the seed fixes the init)."""
    torch.manual_seed(cfg.seed)
    train_loader, val_loader, coco_gt, num_classes = build_detection_data(cfg, ctx)
    student = build_detector(cfg.student, cfg, num_classes).to(device)
    teacher = None
    if method_needs_teacher(cfg.method.name):
        if cfg.teacher is None or not cfg.teacher.weights:
            raise ConfigError("this method distils from a detection teacher: set teacher.name and teacher.weights "
                              "(torchvision:COCO_V1 or a trained detector's checkpoint)")
        teacher = build_detector(cfg.teacher, cfg, num_classes).to(device)
    method = build_detection_method(cfg.method, student, teacher).to(device)
    return dict(student=student, teacher=teacher, method=method,
                optimizer=build.build_optimizer(cfg.optimizer, student, method), lr_at=build_detection_lr(cfg),
                train_loader=train_loader, val_loader=val_loader, coco_gt=coco_gt)


@TASKS.register("detection")
def build_detection(cfg: RunConfig, run_dir: Path, *, resume: bool = False) -> DetectionTask:
    """The detection task of a config: best checkpoint by AP; a finished run gets its model card."""
    device, ctx = init_device(build.build_device(cfg.train.device))
    task = DetectionTask(**_objects(cfg, device, ctx), epochs=cfg.schedule.epochs, device=device, ctx=ctx,
                         precision=cfg.train.precision, eval_every=cfg.train.eval_every,
                         max_steps=cfg.schedule.max_iterations,
                         on_finish=lambda folder, summary: write_detection_card(cfg, folder, summary))
    if not resume:
        start_fresh(task, cfg.seed)
    return task


def evaluate_detection(cfg: RunConfig, weights: str | Path) -> Dict[str, float]:
    """Box AP (``AP``, ``AP50``, ... in percent) of the checkpoint ``weights`` of the config's student
    on the validation split (val2017, or the synthetic set's val)."""
    if not Path(weights).is_file():
        raise MissingFileError(f"checkpoint {str(weights)!r} does not exist")
    device = build.build_device(cfg.train.device)
    _, val_loader, coco_gt, num_classes = build_detection_data(cfg, Dist(), train=False)
    model = build_detector(cfg.student.model_copy(update={"weights": None}), cfg, num_classes)
    load_weights(model, weights)
    return coco_evaluate(model.to(device), val_loader, coco_gt, device=device)
