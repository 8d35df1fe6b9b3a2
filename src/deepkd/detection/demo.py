"""The offline detection demo: a tiny Faster R-CNN teacher, then plain / DKD / DeepKD students.

Synthetic COCO-format shapes (96 train / 48 val images of 128 px), batch 4, SGD LR 0.02 with a
50-step warm-up and x0.1 at 75% of the epochs, weight decay 1e-4, momentum 0.9. Teacher width 16
for 30 epochs, students width 4 for 15 epochs from the same initialisation. DKD: alpha 1, beta 0.25,
T 1, no warm-up (the DKD detection setting). DeepKD+DKD: task momentum = the base 0.9 with the
weight decay on the task stream (a lower task momentum lowers the effective learning rate of every
detector loss), target 0.825, non-target 0.95. A plumbing benchmark: seed noise (about +-2 AP)
is as large as the differences between methods on this set.

``features=True`` adds two rows (``deepkd demo detection --features``): ReviewKD on the FPN levels
(weight 1, no warm-up: the reference's detection setting; its connectors trained by the student's SGD)
and DKD + ReviewKD (DKD's best COCO row: DKD on the RoI logits, ReviewKD on the FPN).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict

import torch

from deepkd.detection.coco import CocoDetection, DetectionLoader
from deepkd.detection.models import tiny_fasterrcnn
from deepkd.detection.roi import prepare_teacher, pyramid_info
from deepkd.detection.synthetic import NUM_CLASSES, write_synthetic_coco
from deepkd.detection.task import train_detector
from deepkd.losses import Method, build_method
from deepkd.losses.registry import method_builder
from deepkd.optim import DecoupledMomentumSGD, warmup_multistep_lr

FULL = {"train": 96, "val": 48, "teacher_epochs": 30, "student_epochs": 15, "warmup": 50}
QUICK = {"train": 16, "val": 8, "teacher_epochs": 3, "student_epochs": 1, "warmup": 4}
LR, BATCH, WEIGHT_DECAY = 0.02, 4, 1e-4
DKD = dict(alpha=1.0, beta=0.25, temperature=1.0, warmup_epochs=0)
DEEPKD_MOMENTUM = {"task": 0.9, "target": 0.825, "non_target": 0.95}
REVIEWKD = dict(reviewkd_weight=1.0, warmup_epochs=0, fpn=True)


def _sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY)


def _deepkd_sgd(params):
    return DecoupledMomentumSGD(params, lr=LR, momentum=DEEPKD_MOMENTUM, weight_decay=WEIGHT_DECAY,
                                weight_decay_stream="task")


STUDENTS = {"plain": ("ce", {}, _sgd), "dkd": ("dkd", DKD, _sgd), "deepkd_dkd": ("deepkd_dkd", DKD, _deepkd_sgd)}
FEATURE_STUDENTS = {"reviewkd": ("reviewkd", REVIEWKD, _sgd),
                    "dkd_reviewkd": ("dkd+reviewkd", {"dkd": DKD, "reviewkd": REVIEWKD}, _sgd)}


def _method(name: str, arguments: Dict[str, Any], student, teacher) -> Method:
    """The method; a feature method also gets both detectors' FPN levels (its connectors' shapes)."""
    if getattr(method_builder(name), "features", False):
        arguments = dict(arguments, student_info=pyramid_info(student), teacher_info=pyramid_info(teacher))
    return build_method(name, **arguments)


def _train(name: str, model, teacher, method, optimizer, epochs: int, data: Dict[str, Any], out: Path, seed: int,
           log: Callable[[str], None]) -> Dict[str, Any]:
    steps = epochs * len(data["train"])
    schedule = dict(base_lr=LR, milestones=[int(0.75 * epochs) * len(data["train"])],
                    warmup_iterations=min(data["warmup"], steps - 1), warmup_factor=0.001)
    started = time.time()
    summary = train_detector(student=model, teacher=teacher, method=method, optimizer=optimizer,
                             lr_at=lambda step: warmup_multistep_lr(step, **schedule), train_loader=data["train"],
                             val_loader=data["val"], coco_gt=data["coco_gt"], epochs=epochs,
                             device=torch.device("cpu"), run_dir=out / name, seed=seed, resume=True,
                             eval_every=5, log=lambda line: log(f"{name}: {line}"))
    return {"AP": summary["last"].get("AP", 0.0), "AP50": summary["last"].get("AP50", 0.0),
            "best_AP": summary["best_AP"], "seconds": time.time() - started}


def _data(out: Path, sizes: Dict[str, int], seed: int) -> Dict[str, Any]:
    root = out / "data"
    ann = {split: write_synthetic_coco(root, split, sizes[split], seed=0) for split in ("train", "val")}
    train = CocoDetection(root / "train", ann["train"], train=True, seed=seed)
    val = CocoDetection(root / "val", ann["val"], train=False)
    return {"train": DetectionLoader(train, BATCH, train=True, seed=seed),
            "val": DetectionLoader(val, 8, train=False), "coco_gt": val.coco, "warmup": sizes["warmup"]}


def run_detection_demo(out: str | Path, quick: bool = False, seed: int = 0, log: Callable[[str], None] = print,
                       features: bool = False) -> Dict[str, Dict[str, float]]:
    """Train the teacher and the three students under ``out`` (finished runs are reused); print and
    return ``{run: {AP, AP50, best_AP, seconds}}`` (final-epoch AP), also saved as ``demo.json``.

    ``quick``: 16/8 images, teacher 3 epochs, students 1 (a smoke test, AP near 0). ``features``: also
    the ReviewKD and DKD+ReviewKD students (module docstring).
    """
    out, sizes = Path(out), QUICK if quick else FULL
    data = _data(out, sizes, seed)
    torch.manual_seed(seed)
    teacher = tiny_fasterrcnn(16, NUM_CLASSES)
    results = {"teacher": _train("teacher", teacher, None, build_method("ce"), _sgd(teacher.parameters()),
                                 sizes["teacher_epochs"], data, out, seed, log)}
    prepare_teacher(teacher)
    for name, (method, arguments, make_optimizer) in {**STUDENTS, **(FEATURE_STUDENTS if features else {})}.items():
        torch.manual_seed(seed + 1)  # every student starts from the same weights
        student = tiny_fasterrcnn(4, NUM_CLASSES)
        loss = _method(method, arguments, student, teacher)
        optimizer = make_optimizer([*student.parameters(), *loss.parameters()])  # a feature method's connectors too
        results[name] = _train(name, student, teacher, loss, optimizer, sizes["student_epochs"], data, out, seed, log)
    (out / "demo.json").write_text(json.dumps(results, indent=2))
    log(f"{'run':<14}{'AP':>8}{'AP50':>8}{'best AP':>9}{'seconds':>9}")
    for name, row in results.items():
        log(f"{name:<14}{row['AP']:8.1f}{row['AP50']:8.1f}{row['best_AP']:9.1f}{row['seconds']:9.1f}")
    return results
