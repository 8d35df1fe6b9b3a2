"""A finished run folder as a model to ship: its student rebuilt, its preprocessing, its test images.

A classification run folder holds ``config.yaml`` (the resolved recipe), ``data.json`` (class names,
input size, the normalisation used) and, once finished, ``student.safetensors``. The student is
rebuilt as ``deepkd eval`` does: the config's architecture at the run's class count, weights loaded
strictly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn

from deepkd import __version__
from deepkd.data import FolderOptions
from deepkd.errors import DataError, ExportError, MissingFileError
from deepkd.models import create_model, load_weights
from deepkd.train import build
from deepkd.train.config import RunConfig, load_config

FOLDER_DATASETS = ("imagenet", "imagefolder")


@dataclass
class RunModel:
    """A run's student (eval mode, CPU), its config and its :func:`run_metadata`."""

    run_dir: Path
    cfg: RunConfig
    model: nn.Module
    metadata: Dict[str, Any]


def read_run_config(run_dir: Path) -> RunConfig:
    """A run folder's ``config.yaml``, or one sentence saying the folder is not a run."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise MissingFileError(f"{str(config)!r} does not exist: {str(run_dir)!r} is not a deepkd run folder")
    return load_config(config)


def load_run(run_dir: str | Path) -> RunModel:
    """Rebuild the student of a finished classification run folder."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if cfg.detection:
        raise ExportError(f"{str(run_dir)!r} is a detection run ({cfg.data.dataset}): deepkd export --format onnx "
                          "writes its detector; predict, quantize and profile take classification runs")
    weights = run_dir / "student.safetensors"
    if not weights.is_file():
        raise MissingFileError(f"{str(weights)!r} does not exist: the run has not finished (train it to the end, "
                               "or resume it with deepkd train --resume)")
    facts = read_facts(run_dir / "data.json")
    model = create_model(cfg.student.name, num_classes=facts["num_classes"])
    load_weights(model, weights)
    return RunModel(run_dir, cfg, model.eval(), run_metadata(cfg, facts))


def read_facts(path: Path) -> Dict[str, Any]:
    """``data.json``: ``num_classes``, ``classes``, ``input_size``, ``mean``, ``std``."""
    if not path.is_file():
        raise MissingFileError(f"{str(path)!r} does not exist: the run folder is incomplete")
    try:
        facts = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{str(path)!r} is not valid JSON ({err})") from None
    missing = [k for k in ("num_classes", "classes", "input_size", "mean", "std") if k not in facts]
    if missing:
        raise DataError(f"{str(path)!r} lacks {', '.join(missing)}: the run folder is damaged")
    return facts


def preprocessing(cfg: RunConfig, facts: Dict[str, Any]) -> Dict[str, Any]:
    """How one image becomes the student's input, as the run's evaluation does it: the shorter side
    resized to ``resize`` (``pad_crop``: to ``input_size``), a centre crop of ``input_size``, pixels
    scaled to [0, 1] and normalised by ``mean``/``std`` (:func:`deepkd.data.imagefolder.build_transform`).
    Sets of small images (CIFAR, synthetic) evaluate at ``input_size`` as stored; Fashion-MNIST
    (``crop: "pad"``) zero-pads its 28x28 images, centred, to ``input_size``, as its reader does."""
    size = facts["input_size"]
    crop, resize, interpolation = "pad_crop", size, FolderOptions.interpolation
    if cfg.data.dataset in FOLDER_DATASETS:
        options = build.folder_options(cfg)
        crop, interpolation = options.crop, options.interpolation
        if crop == "random_resized":  # the evaluation resize deepkd.data uses for image folders (its default)
            resize = options.resize or round(options.image_size / 0.875)
    if cfg.data.dataset == "fashion_mnist":
        crop = "pad"
    channels = cfg.data.channels if cfg.data.dataset == "fashion_mnist" else 3
    return {"input_size": size, "resize": resize, "crop": crop, "interpolation": interpolation,
            "channels": channels, "mean": facts["mean"], "std": facts["std"]}


def run_metadata(cfg: RunConfig, facts: Dict[str, Any]) -> Dict[str, Any]:
    """What an exported file says about itself (:mod:`deepkd.deploy.metadata`), less ``check``."""
    return {"deepkd_version": __version__, "experiment": cfg.experiment, "seed": cfg.seed,
            "method": cfg.method.name, "student": cfg.student.name,
            "teacher": cfg.teacher.name if cfg.teacher else None, "dataset": cfg.data.dataset,
            "num_classes": facts["num_classes"], "classes": list(facts["classes"]), **preprocessing(cfg, facts)}


def validation_images(cfg: RunConfig, count: int) -> torch.Tensor:
    """The first ``count`` images of the run's test split (or all of a smaller one), preprocessed as
    the run evaluates them: float32 ``[n, C, H, W]`` on the CPU."""
    data = build.build_dataset(cfg, device=torch.device("cpu"), rank=0, world_size=1)
    batches, have = [], 0
    for images, _ in data.test.iter_epoch(0):
        batches.append(images.float())
        have += len(images)
        if have >= count:
            break
    if not batches:
        raise DataError(f"the test split of dataset {cfg.data.dataset!r} is empty: no images to check the export on")
    return torch.cat(batches)[:count]
