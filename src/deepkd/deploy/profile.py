"""``deepkd profile``: parameters, MACs and CPU latency of a teacher and a student, side by side.

MACs and latency are measured by :mod:`deepkd.models.cost` (the model card of every finished run
uses the same functions).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from deepkd.deploy.run import FOLDER_DATASETS, load_run
from deepkd.errors import ConfigError, ExportError, UnknownNameError
from deepkd.models import count_parameters, create_model, list_models, model_info
from deepkd.models.cost import activation_bytes, count_macs, latency_ms
from deepkd.registry import closest


@dataclass
class Subject:
    """A model to profile: what the user named, the architecture, the input ``(C, H, W)``, the classes."""

    spec: str
    name: str
    model: nn.Module
    input_shape: Tuple[int, int, int]
    num_classes: int


def resolve(spec: str, role: str, *, num_classes: Optional[int] = None, input_size: Optional[int] = None) -> Subject:
    """A run folder (its trained student), a model name (``num_classes``/``input_size`` override the
    model's defaults), or a recipe (its ``role`` model: ``teacher`` or ``student``, at its dataset's shape)."""
    if Path(spec).is_dir():
        run = load_run(spec)
        meta = run.metadata
        shape = (meta["channels"], meta["input_size"], meta["input_size"])
        return Subject(spec, meta["student"], run.model, shape, meta["num_classes"])
    try:
        info = model_info(spec)
    except UnknownNameError:  # not a model name: a recipe, or a typo
        return _from_recipe(spec, role)
    model = create_model(spec, num_classes).eval()
    size = input_size or info["input_size"]
    return Subject(spec, spec, model, (3, size, size), _classes(model, num_classes, (3, size, size)))


def _from_recipe(spec: str, role: str) -> Subject:
    from deepkd.train.config import load_config
    from deepkd.train.recipes import find_recipe

    try:
        path = find_recipe(spec)
    except ConfigError:
        near = closest(spec, list_models())
        hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise UnknownNameError(f"{spec!r} is neither a model (deepkd list models), a recipe (deepkd list recipes) "
                               f"nor a run folder{hint}") from None
    cfg = load_config(path)
    if cfg.detection:
        raise ExportError(f"recipe {spec!r} trains detectors: profiling detection models is not supported yet")
    chosen = cfg.teacher if role == "teacher" else cfg.student
    if chosen is None:
        raise ConfigError(f"recipe {spec!r} has no {role} section: name a model or another recipe as the {role}")
    classes, shape = recipe_shape(cfg)
    return Subject(spec, chosen.name, create_model(chosen.name, num_classes=classes).eval(), shape, classes)


def recipe_shape(cfg) -> Tuple[int, Tuple[int, int, int]]:
    """Class count and input ``(C, H, W)`` of a recipe's dataset, without loading it (an image folder's
    classes are its training folder's sub-folders)."""
    from deepkd.data import cifar, fashion_mnist, synthetic, tinyimagenet

    dataset = cfg.data.dataset
    if dataset in FOLDER_DATASETS:
        from deepkd.train.build import folder_options

        options = folder_options(cfg)
        folder = Path(cfg.data.root or ".") / options.train_folder
        classes = len([p for p in folder.iterdir() if p.is_dir()]) if folder.is_dir() else 1000
        return classes, (3, options.image_size, options.image_size)
    if dataset == "fashion_mnist":
        return fashion_mnist.NUM_CLASSES, (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    if dataset == "tinyimagenet":
        return tinyimagenet.NUM_CLASSES, (3, tinyimagenet.SIZE, tinyimagenet.SIZE)
    classes = cifar.DATASETS[dataset].num_classes if dataset in cifar.DATASETS else synthetic.NUM_CLASSES
    return classes, (3, synthetic.SIZE, synthetic.SIZE)


def _classes(model: nn.Module, num_classes: Optional[int], input_shape: Sequence[int]) -> int:
    """``num_classes``, or what the model's default head returns (create_model's default)."""
    if num_classes is not None:
        return num_classes
    with torch.no_grad():
        return model(torch.zeros(1, *input_shape)).shape[-1]


def profile(teacher: str, student: str, *, batch_sizes: Sequence[int] = (1, 32), repeats: int = 10,
            warmup: int = 3, num_classes: Optional[int] = None, input_size: Optional[int] = None,
            threads: Optional[int] = None) -> Dict[str, Any]:
    """Both models' ``parameters``, ``macs``, ``activation_bytes`` (one image, float32) and ``latency_ms`` per
    batch size, and how they were measured."""
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    for role, spec in (("teacher", teacher), ("student", student)):
        subject = resolve(spec, role, num_classes=num_classes, input_size=input_size)
        subject.model.eval()
        rows.append({"role": role, "spec": spec, "model": subject.name, "num_classes": subject.num_classes,
                     "input": list(subject.input_shape), "parameters": count_parameters(subject.model),
                     "macs": count_macs(subject.model, subject.input_shape),
                     "activation_bytes": activation_bytes(subject.model, subject.input_shape),
                     "latency_ms": {str(b): latency_ms(subject.model, subject.input_shape, b, repeats=repeats,
                                                       warmup=warmup) for b in batch_sizes}})
    return {"models": rows, "device": "cpu", "threads": torch.get_num_threads(), "repeats": repeats,
            "warmup": warmup}


def _human(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3f}{unit}"
    return f"{value:g}"


def format_profile(report: Dict[str, Any]) -> str:
    """A table: one column per model and their ratio."""
    teacher, student = report["models"]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    lines = [("", "teacher", "student", "teacher/student"), ("model", teacher["model"], student["model"], "")]
    lines.append(("input", *(f"{'x'.join(map(str, m['input']))}, {m['num_classes']} classes"
                             for m in (teacher, student)), ""))
    lines.append(("parameters", _human(teacher["parameters"]), _human(student["parameters"]),
                  ratio(teacher["parameters"], student["parameters"])))
    lines.append(("MACs (1 image)", _human(teacher["macs"]), _human(student["macs"]),
                  ratio(teacher["macs"], student["macs"])))
    lines.append(("activations (1 image)", *(f"{m['activation_bytes'] / 2**20:.2f} MiB" for m in (teacher, student)),
                  ratio(teacher["activation_bytes"], student["activation_bytes"])))
    for batch in teacher["latency_ms"]:
        t, s = teacher["latency_ms"][batch], student["latency_ms"][batch]
        lines.append((f"CPU latency, batch {batch}", f"{t:.2f} ms", f"{s:.2f} ms", ratio(t, s)))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    threads = f"{report['threads']} torch thread{'s' if report['threads'] != 1 else ''}"
    table.append(f"CPU, {threads}; latency: median of {report['repeats']} runs after "
                 f"{report['warmup']} warm-up runs")
    return "\n".join(table)
