"""``deepkd demo``: distillation on the shipped synthetic set, offline, in minutes on a laptop CPU.

Distils the first study's teacher (docs/study/STUDY_v1.md) into the same small student alone, with DKD and with
DeepKD+DKD: the study's setting, whose five seeds per row say which differences are real. The
students run the study's seed 4, the one of its five seeds whose order of these rows is that of the
five-seed means (no single seed shows differences smaller than the seeds' spread in a stable order),
through ``deepkd sweep``, two processes at a time (the same ``train`` function and strict config as
``deepkd train``). The teacher is the study's, shipped (446 KB): training it takes 2.5 of the
demo's 5 minutes on 2 cores; ``train_teacher=True`` (``--train-teacher``) trains it here, which gives
the same weights bit for bit on the 2-core sandbox. KD, the study's fourth baseline, is left out for
time (``benchmarks/study.py`` runs it). Prints the table, writes a bar chart and (``--json``) a JSON
line mapping each row's name to its top-1 plus ``seconds``.
"""
from __future__ import annotations

import copy
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any, Dict

import torch
import yaml

from deepkd.commands.plots import plot_comparison
from deepkd.errors import RunExistsError, TrainingError
from deepkd.train.config_errors import validate_config
from deepkd.train.loop import train

# The first study's setting (docs/study/STUDY_v1.md; benchmarks/study/*.yaml): trained long enough that the student
# alone has converged, so a row's gain is what its loss teaches, not how much it enlarges the gradient.
DEMO = {
    "teacher_model": "cnn_w16", "student_model": "cnn_w4",
    "num_train": 8000, "num_test": 2000, "noise": 2.5, "batch_size": 64,
    "teacher_epochs": 12, "student_epochs": 24, "lr": 0.2, "warmup_epochs": 2, "teacher_seed": 0, "seed": 4,
}
QUICK = {**DEMO, "num_train": 1024, "num_test": 512, "teacher_epochs": 1, "student_epochs": 1}

TEACHER = Path(__file__).with_name("demo_teacher.safetensors")  # the study's teacher: DEMO's, trained alone

# name -> (run folder, method section, optimizer section); longest first, as the sweep starts them in order
STUDENTS = {
    "DeepKD+DKD": ("deepkd_dkd", {"name": "deepkd_dkd", "beta": 8.0},
                   {"name": "decoupled", "stream_momentum": {"task": 0.825, "target": 0.825, "non_target": 0.95}}),
    "DKD": ("dkd", {"name": "dkd", "beta": 8.0}, {"name": "sgd"}),
    "student alone": ("student_alone", {"name": "ce"}, {"name": "sgd"}),
}
MARKER = "demo.json"


def _config(recipe: Dict[str, Any], out: Path, experiment: str, model: str, epochs: int,
            method: Dict[str, Any], optimizer: Dict[str, Any], teacher: str | None, seed: int) -> Dict[str, Any]:
    method = copy.deepcopy(method)
    if method["name"] not in ("ce", "kd") and "warmup_epochs" not in method:
        method["warmup_epochs"] = recipe["warmup_epochs"]
    return {
        "experiment": experiment, "seed": seed, "output_dir": str(out),
        "data": {"dataset": "synthetic", "batch_size": recipe["batch_size"], "eval_batch_size": 500,
                 "synthetic": {"num_train": recipe["num_train"], "num_test": recipe["num_test"],
                               "noise": recipe["noise"]}},
        "student": {"name": model},
        "teacher": None if teacher is None else {"name": recipe["teacher_model"], "weights": teacher},
        "method": method,
        "optimizer": {**optimizer, "lr": recipe["lr"]},
        "schedule": {"name": "cosine", "epochs": epochs, "min_lr": 0.0},
        "train": {"progress": "none", "tensorboard": "off"},
    }


def _prepare(out: Path) -> None:
    if out.exists():
        if not (out / MARKER).is_file() and any(out.iterdir()):
            raise RunExistsError(f"{str(out)!r} exists and is not a deepkd demo folder; choose --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("{}")


def run_demo(out: str | Path = "runs/demo", quick: bool = False, as_json: bool = False,
             train_teacher: bool = False) -> Dict[str, float]:
    """Run the whole demo; returns ``{row name: top-1 %, "seconds": wall time}``. ``quick`` trains its
    own small teacher; otherwise the shipped one is used unless ``train_teacher``."""
    recipe = QUICK if quick else DEMO
    out = Path(out)
    _prepare(out)
    started = time.time()
    print(f"deepkd demo: synthetic set ({recipe['num_train']} train / {recipe['num_test']} test images, "
          f"100 classes in 20 superclasses), teacher {recipe['teacher_model']}, student {recipe['student_model']}")
    teacher = TEACHER
    if quick or train_teacher:
        teacher_cfg = _config(recipe, out, "teacher", recipe["teacher_model"], recipe["teacher_epochs"],
                              {"name": "ce"}, {"name": "sgd"}, None, recipe["teacher_seed"])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the study's teacher: the shipped weights, bit for bit
        try:
            _train_row("teacher", teacher_cfg)
        finally:
            torch.set_num_threads(threads)
        # the final weights, as the study's recipes use (benchmarks/study/*.yaml)
        teacher = out / "teacher" / f"seed{recipe['teacher_seed']}" / "student.safetensors"
    students = _students(recipe, out, str(teacher.resolve()))
    summary = json.loads((out / "dkd" / f"seed{recipe['seed']}" / "summary.json").read_text())
    rows = {"teacher": round(summary["teacher_top1"], 2), **students}
    seconds = time.time() - started
    _report(rows, seconds, out)
    result = {**rows, "seconds": round(seconds, 1)}
    (out / MARKER).write_text(json.dumps(result, indent=2))
    if as_json:
        print(json.dumps(result))
    return result


def _train_row(name: str, raw: Dict[str, Any]) -> float:
    started = time.time()
    summary = train(validate_config(raw, f"demo row {name!r}"))
    print(f"  {name:<14} best top-1 {summary['best_top1']:6.2f}%  ({time.time() - started:5.1f}s)", flush=True)
    return round(summary["best_top1"], 2)


def _students(recipe: Dict[str, Any], out: Path, teacher: str) -> Dict[str, float]:
    """The student rows, two at a time through ``deepkd sweep`` (one CPU thread or GPU each)."""
    from deepkd.commands.sweep import run_sweep

    files = []
    for name, (folder, method, optimizer) in STUDENTS.items():
        raw = _config(recipe, out, folder, recipe["student_model"], recipe["student_epochs"], method, optimizer,
                      None if method["name"] == "ce" else teacher, recipe["seed"])
        validate_config(raw, f"demo row {name!r}")
        path = out / "recipes" / f"{folder}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump({k: v for k, v in raw.items() if v is not None}, sort_keys=False))
        files.append(str(path))
    started = time.time()
    states = run_sweep(files, out=str(out), jobs=2, stream=io.StringIO())
    rows = {}
    for name, (folder, _, _) in STUDENTS.items():
        run = out / folder / f"seed{recipe['seed']}"
        if states.get(f"{folder}/{run.name}") != "finished":
            raise TrainingError(f"demo row {name!r} did not finish: see {run / 'train.log'}")
        rows[name] = round(json.loads((run / "summary.json").read_text())["best_top1"], 2)
        print(f"  {name:<14} best top-1 {rows[name]:6.2f}%", flush=True)
    print(f"  (the {len(rows)} students in {time.time() - started:.1f}s, two at a time)")
    return {name: rows[name] for name in ("student alone", "DKD", "DeepKD+DKD")}


def _report(rows: Dict[str, float], seconds: float, out: Path) -> None:
    alone = rows["student alone"]
    print(f"\n{'':<14} {'top-1':>7} {'vs alone':>9}")
    for name, top1 in rows.items():
        delta = "" if name in ("teacher", "student alone") else f"{top1 - alone:+.2f}"
        print(f"{name:<14} {top1:7.2f} {delta:>9}")
    figure = plot_comparison(rows, out / "comparison.png", "deepkd demo: synthetic CIFAR-shaped set")
    print("\none seed per row (the first study's seed 4): rows move between machines; docs/study/STUDY_v1.md has five "
          "seeds per row with 95% intervals, and which differences are real (all rows at lr 0.2, tuned for SGD)")
    print(f"wall time {seconds:.0f}s; runs and figure in {out} ({figure.name})")


def run_detection_demo(out: str | Path = "runs/demo_detection", quick: bool = False,
                       as_json: bool = False, features: bool = False) -> Dict[str, float]:
    """``deepkd demo detection``: the tiny Faster R-CNN teacher, then the student alone, with DKD and with
    DeepKD+DKD on the synthetic COCO-format set (:mod:`deepkd.detection.demo`); ``features``
    (``--features``): also ReviewKD and DKD+ReviewKD on the FPN. Returns ``{row: final box AP,
    "seconds": wall time}`` and writes ``comparison.png``."""
    import torch

    from deepkd.detection.demo import run_detection_demo as run_rows

    out = Path(out)
    _prepare(out)
    # the tiny detectors are launch-bound: one thread is several times faster than two on a small CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.time()
    try:
        results = run_rows(out, quick=quick, features=features)
    finally:
        torch.set_num_threads(threads)
    seconds = time.time() - started
    names = {"teacher": "teacher", "plain": "student alone", "dkd": "DKD", "deepkd_dkd": "DeepKD+DKD",
             "reviewkd": "ReviewKD", "dkd_reviewkd": "DKD+ReviewKD"}
    rows = {names.get(k, k): round(v["AP"], 2) for k, v in results.items()}
    figure = plot_comparison(rows, out / "comparison.png", "deepkd demo detection: synthetic COCO-format set")
    print(f"\nwall time {seconds:.0f}s; runs and figure in {out} ({figure.name})")
    result = {**rows, "seconds": round(seconds, 1)}
    (out / MARKER).write_text(json.dumps(result, indent=2))
    if as_json:
        print(json.dumps(result))
    return result
