"""``deepkd demo``: what distillation is for, in minutes on a laptop CPU.

The demo distils on Fashion-MNIST's photographs when this machine has them (the Debian package's files, a
folder of the four released files, or torchvision's download when online) and on the shipped synthetic set
otherwise; its first line says which and why (``data="synthetic"`` or ``"fashion_mnist"`` chooses). Either
way its rows are one problem of STUDY.md, built here exactly as the recipes of
``benchmarks/study/<problem>/`` (``tests/test_demo.py`` compares them): the student alone, with KD
(Fashion-MNIST only: four rows on the synthetic set pass the 5 minutes), with DKD and with DeepKD+DKD (the
reference momenta), each at the learning rate the study's protocol selected for it, at seed 3, the first
confirmation seed (not chosen for its result). One seed is one draw: the table prints the study's n = 5
means (seeds 3-7) beside each row, and they, not the single run, say which differences are real. The
teacher is shipped (trained by deepkd from ``benchmarks/study/teachers/``); ``train_teacher=True``
(``--train-teacher``) trains it here first, on one thread, as it was trained. The students run through
``deepkd sweep``, two processes at a time, with the same ``train`` function and strict config as ``deepkd
train``. Prints the table, writes a bar chart and (``--json``) a JSON line mapping each row's name to its
top-1 plus ``seconds``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import yaml

from deepkd.commands.plots import plot_comparison
from deepkd.errors import ConfigError, MissingFileError, RunExistsError, TrainingError
from deepkd.train.config_errors import validate_config
from deepkd.train.loop import train

HERE = Path(__file__).parent
SEED = 3  # the study's first confirmation seed
SYNTHETIC = {"dataset": "synthetic", "synthetic": {"num_train": 8000, "num_test": 2000, "noise": 2.5}}
# Each source's problem of STUDY.md: its data, its teacher's recipe, its students and each row's selected lr;
# "study": the row's final top-1 over the confirmation seeds 3-7 (n = 5), mean and std (docs/study2/*_confirm.json).
SETTINGS: Dict[str, Dict[str, Any]] = {
    "fashion_mnist": {
        "problem": "fashion_mnist_demo2", "title": "Fashion-MNIST, 200 images a class, flip only",
        "data": {"dataset": "fashion_mnist", "train_per_class": 200, "crop_pad": 0},
        "teacher_data": {"dataset": "fashion_mnist"},
        "teacher_model": "resnet8", "teacher_weights": HERE / "demo_teacher_fashion_mnist_resnet8.safetensors",
        "teacher_epochs": 10, "teacher_batch_size": 128, "teacher_lr": 0.1,
        "student_model": "cnn_w8", "student_epochs": 30, "teacher_cache": True,
        "rows": ("student alone", "KD", "DKD", "DeepKD+DKD"),
        "lr": {"student alone": 0.4, "KD": 0.2, "DKD": 0.05, "DeepKD+DKD": 0.025},
        "study": {"student alone": (86.22, 0.03), "KD": (87.11, 0.5), "DKD": (87.26, 0.33),
                  "DeepKD+DKD": (86.52, 0.4)},
    },
    "synthetic": {
        "problem": "synthetic", "title": "the shipped synthetic set (100 classes in 20 superclasses)",
        "data": SYNTHETIC, "teacher_data": SYNTHETIC,
        "teacher_model": "cnn_w16", "teacher_weights": HERE / "demo_teacher.safetensors",
        "teacher_epochs": 12, "teacher_batch_size": 64, "teacher_lr": 0.2,
        "student_model": "cnn_w4", "student_epochs": 24,
        "rows": ("student alone", "DKD", "DeepKD+DKD"),  # KD too would pass the 5 minutes
        "lr": {"student alone": 0.4, "DKD": 0.2, "DeepKD+DKD": 0.1},
        "study": {"student alone": (88.75, 1.17), "DKD": (87.47, 0.34), "DeepKD+DKD": (86.46, 0.43)},
    },
}
QUICK_DATA = {"fashion_mnist": {"dataset": "fashion_mnist", "train_per_class": 4, "crop_pad": 0},
              "synthetic": {**SYNTHETIC, "synthetic": {"num_train": 1024, "num_test": 512, "noise": 2.5}}}
QUICK = {source: {"data": data, "teacher_data": data}  # a smoke test of the whole path: one epoch on a few images
         for source, data in QUICK_DATA.items()}
# row -> (run folder and study configuration, method section, optimizer section without its lr)
SGD = {"name": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False}
STUDENTS = {  # longest first: the sweep starts them in this order, two at a time
    "DeepKD+DKD": ("deepkd_dkd_ref", {"name": "deepkd_dkd", "beta": 8.0, "warmup_epochs": 2},
                   {"name": "decoupled", "stream_momentum": {"task": 0.825, "target": 0.825, "non_target": 0.95},
                    "weight_decay": 5e-4, "weight_decay_stream": "target"}),
    "DKD": ("dkd", {"name": "dkd", "beta": 8.0, "warmup_epochs": 2}, SGD),
    "KD": ("kd", {"name": "kd"}, SGD),
    "student alone": ("ce", {"name": "ce"}, SGD),
}
MARKER = "demo.json"
CACHE = {"teacher_cache": True, "teacher_cache_dtype": "fp32"}  # the teacher's logits of every view, computed once
# the students test every 5th epoch and the last: a row is its final-epoch top-1 (a test changes no weight), and a
# test of Fashion-MNIST's 10,000 images costs about three of the student's training epochs
STUDENT_EVAL_EVERY = 5


def choose_data(data: str = "auto", root: Optional[str] = None) -> Tuple[str, str]:
    """``(source, why)``: ``"fashion_mnist"`` when its four files are found under ``root`` (unset: the
    Debian package's folder, else the download folder) or torchvision can download them; otherwise
    (``data="auto"``) ``"synthetic"``. ``data="fashion_mnist"`` stops with the reader's sentence instead."""
    from deepkd.data import fashion_mnist

    if data == "synthetic":
        return "synthetic", "asked for with --data synthetic"
    if data not in ("auto", "fashion_mnist"):
        raise ConfigError(f"deepkd demo --data {data!r}: choose auto, fashion_mnist or synthetic")
    folder = fashion_mnist.resolve_root(root)
    try:
        fashion_mnist.locate(folder, download=True)
    except MissingFileError:
        if data == "fashion_mnist":
            raise
        return "synthetic", (f"Fashion-MNIST is not in {folder} and could not be downloaded; apt-get install "
                             "dataset-fashion-mnist, or --root a folder of its four files, to distil on it")
    return "fashion_mnist", f"its released files in {folder}"


def _config(setting: Dict[str, Any], data: Dict[str, Any], out: Path, experiment: str, model: str, epochs: int,
            batch_size: int, method: Dict[str, Any], optimizer: Dict[str, Any], teacher: Optional[str],
            seed: int) -> Dict[str, Any]:
    return {
        "experiment": experiment, "seed": seed, "output_dir": str(out),
        "data": {**copy.deepcopy(data), "batch_size": batch_size, "eval_batch_size": 500},
        "student": {"name": model},
        "teacher": None if teacher is None else {"name": setting["teacher_model"], "weights": teacher},
        "method": copy.deepcopy(method),
        "optimizer": copy.deepcopy(optimizer),
        "schedule": {"name": "cosine", "epochs": epochs, "min_lr": 0.0},
        "train": {"progress": "none", "tensorboard": "off",
                  **(CACHE if teacher is not None and setting.get("teacher_cache") else {})},
    }


def teacher_config(setting: Dict[str, Any], out: Path, root: Optional[str] = None) -> Dict[str, Any]:
    """The teacher's run: ``benchmarks/study/teachers/``'s recipe of this setting, output under ``out``."""
    data = {**setting["teacher_data"], **({"root": root} if root else {})}
    return _config(setting, data, out, "teacher", setting["teacher_model"], setting["teacher_epochs"],
                   setting["teacher_batch_size"], {"name": "ce"}, {**SGD, "lr": setting["teacher_lr"]}, None, 0)


def student_configs(setting: Dict[str, Any], out: Path, teacher: str,
                    root: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """Each row's run: the study's recipe ``benchmarks/study/<problem>/<configuration>.yaml`` at the row's
    selected lr and seed 3, tested every ``STUDENT_EVAL_EVERY`` epochs; the teacher-logit cache where the
    setting has one (``teacher_cache``: a few thousand views, cheaper than the teacher run live), else the same
    logits computed live."""
    data = {**setting["data"], **({"root": root} if root else {})}
    configs = {}
    for name, (folder, method, optimizer) in STUDENTS.items():
        if name not in setting["rows"]:
            continue
        configs[name] = _config(setting, data, out, folder, setting["student_model"], setting["student_epochs"], 64,
                                method, {**optimizer, "lr": setting["lr"][name]},
                                None if method["name"] == "ce" else teacher, SEED)
        configs[name]["train"]["eval_every"] = STUDENT_EVAL_EVERY
    return configs


def _prepare(out: Path) -> None:
    if out.exists():
        if not (out / MARKER).is_file() and any(out.iterdir()):
            raise RunExistsError(f"{str(out)!r} exists and is not a deepkd demo folder; choose --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("{}")


def run_demo(out: str | Path = "runs/demo", quick: bool = False, as_json: bool = False,
             train_teacher: bool = False, data: str = "auto", root: Optional[str] = None) -> Dict[str, float]:
    """Run the whole demo; returns ``{row name: top-1 %, "seconds": wall time}``. ``quick`` trains its
    own small teacher; otherwise the shipped one is used unless ``train_teacher``."""
    source, why = choose_data(data, root)
    setting = {**SETTINGS[source], **(QUICK[source] if quick else {})}
    if quick:
        setting.update(teacher_epochs=1, student_epochs=1)
    out = Path(out)
    _prepare(out)
    started = time.time()
    print(f"deepkd demo: distilling on {setting['title']} ({why}); {setting['teacher_model']} teacher -> "
          f"{setting['student_model']} student, each row at its learning rate selected in STUDY.md", flush=True)
    teacher = setting["teacher_weights"]
    if quick or train_teacher:
        teacher = _train_teacher(teacher_config(setting, out, root))
    students = _students(student_configs(setting, out, str(Path(teacher).resolve()), root), out, setting["rows"])
    summary = json.loads((out / "dkd" / f"seed{SEED}" / "summary.json").read_text())
    rows = {"teacher": round(summary["teacher_top1"], 2), **students}
    seconds = time.time() - started
    _report(rows, seconds, out, setting, quick)
    result = {**rows, "seconds": round(seconds, 1)}
    (out / MARKER).write_text(json.dumps(result, indent=2))
    if as_json:
        print(json.dumps(result))
    return result


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one CPU thread inside the block, as it was before after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train_teacher(raw: Dict[str, Any]) -> Path:
    """Train the teacher on one thread, as the shipped one was (bit for bit on the 2-core sandbox); its
    final weights, as the study's recipes use."""
    started = time.time()
    with _one_thread():
        summary = train(validate_config(raw, "demo teacher"))
    print(f"  teacher        final top-1 {summary['last_top1']:6.2f}%  ({time.time() - started:5.1f}s)", flush=True)
    return Path(raw["output_dir"]) / "teacher" / f"seed{raw['seed']}" / "student.safetensors"


def _students(configs: Dict[str, Dict[str, Any]], out: Path, order: Tuple[str, ...]) -> Dict[str, float]:
    """The student rows, two at a time through ``deepkd sweep`` (one CPU thread or GPU each); final top-1."""
    from deepkd.commands.sweep import run_sweep

    files = {}
    for name, raw in configs.items():
        validate_config(raw, f"demo row {name!r}")
        path = out / "recipes" / f"{raw['experiment']}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump({k: v for k, v in raw.items() if v is not None}, sort_keys=False))
        files[name] = path
    started = time.time()
    states = run_sweep([str(p) for p in files.values()], out=str(out), jobs=2, stream=io.StringIO())
    rows = {}
    for name, raw in configs.items():
        run = out / raw["experiment"] / f"seed{SEED}"
        if states.get(f"{raw['experiment']}/{run.name}") != "finished":
            raise TrainingError(f"demo row {name!r} did not finish: see {run / 'train.log'}")
        rows[name] = round(json.loads((run / "summary.json").read_text())["last_top1"], 2)
    print(f"  (the {len(rows)} students in {time.time() - started:.1f}s, two at a time)", flush=True)
    return {name: rows[name] for name in order}


def _report(rows: Dict[str, float], seconds: float, out: Path, setting: Dict[str, Any], quick: bool) -> None:
    alone, study = rows["student alone"], ({} if quick else setting["study"])
    print(f"\n{'':<14} {'lr':>5} {'top-1':>7} {'vs alone':>9}   the study: n = 5, mean +- std")
    for name, top1 in rows.items():
        lr = f"{setting['lr'][name]:g}" if name in setting["lr"] else ""
        delta = "" if name in ("teacher", "student alone") else f"{top1 - alone:+.2f}"
        mean = f"{study[name][0]:.2f} +- {study[name][1]:.2f}" if name in study else ""
        print(f"{name:<14} {lr:>5} {top1:7.2f} {delta:>9}   {mean}")
    figure = plot_comparison(rows, out / "comparison.png", f"deepkd demo: {setting['title']}")
    print(f"\nfinal-epoch top-1 (%), one run per row (seed {SEED}): a row moves between seeds and machines; the "
          f"study's five seeds per row (STUDY.md, problem {setting['problem']!r}) say which differences are real")
    print(f"wall time {seconds:.0f}s; runs and figure in {out} ({figure.name})")


def run_detection_demo(out: str | Path = "runs/demo_detection", quick: bool = False,
                       as_json: bool = False, features: bool = False) -> Dict[str, float]:
    """``deepkd demo detection``: the tiny Faster R-CNN teacher, then the student alone, with DKD and with
    DeepKD+DKD on the synthetic COCO-format set (:mod:`deepkd.detection.demo`); ``features``
    (``--features``): also ReviewKD and DKD+ReviewKD on the FPN. Returns ``{row: final box AP,
    "seconds": wall time}`` and writes ``comparison.png``."""
    from deepkd.detection.demo import run_detection_demo as run_rows

    out = Path(out)
    _prepare(out)
    # the tiny detectors are launch-bound: one thread is several times faster than two on a small CPU
    started = time.time()
    with _one_thread():
        results = run_rows(out, quick=quick, features=features)
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
