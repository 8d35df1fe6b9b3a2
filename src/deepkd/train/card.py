"""The model card of a finished run, and of an experiment's seeds together.

A finished run folder is laid out as ``huggingface_hub.upload_folder`` uploads a model
repository as is: ``README.md`` (the card: a YAML header with ``library_name``, ``tags``, ``datasets``,
``metrics`` and a ``model-index``, then Markdown), ``config.json`` (architecture, classes,
preprocessing, the resolved recipe) and ``model.safetensors`` (a hard link to ``student.safetensors``,
which keeps its name; a copy where links are not possible). Every figure in the card names where it
comes from: a file of the run folder and its key, or the measurement and the machine it ran on.

:func:`write_group_card` writes one card for the seeds of an experiment (``deepkd summary --cards``):
top-1 as mean +- std over n seeds, each seed's figure listed. Detection runs: :mod:`deepkd.train.detection_card`.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml

from deepkd import __version__
from deepkd.models import count_parameters, create_model, load_weights
from deepkd.models.cost import activation_bytes, count_macs, cpu_name, latency_ms
from deepkd.train.config import config_to_dict, load_config

CARD, HUB_CONFIG, HUB_WEIGHTS = "README.md", "config.json", "model.safetensors"
BATCH_SIZES, REPEATS, WARMUP = (1, 32), 10, 3


def write_card(run_dir: str | Path) -> Path:
    """``README.md``, ``config.json`` and ``model.safetensors`` of a finished run folder (classification:
    ``config.yaml``, ``data.json``, ``summary.json``, ``student.safetensors``); returns the card's path."""
    run_dir = Path(run_dir)
    cfg, facts, shape, model = _student(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    cost = measure(model, shape)
    _link(run_dir / "student.safetensors", run_dir / HUB_WEIGHTS)
    hub = {"library_name": "deepkd", "architecture": cfg.student.name, "num_classes": facts["num_classes"],
           "id2label": dict(enumerate(facts["classes"] or map(str, range(facts["num_classes"])))),
           "input_size": list(shape), "mean": facts["mean"], "std": facts["std"], "deepkd": config_to_dict(cfg)}
    _write(run_dir / HUB_CONFIG, json.dumps(hub, indent=1))
    result = {"last": summary["last_top1"], "best": summary["best_top1"], "seed": cfg.seed, "run_dir": str(run_dir)}
    card = render(_subject(cfg, facts["num_classes"], shape), [result], cost, code_of(run_dir / "config.yaml"),
                  teacher_top1=_teacher_top1(run_dir))
    return _write(run_dir / CARD, card)


def write_group_card(folder: str | Path, run_dirs: Sequence[str | Path]) -> Optional[Path]:
    """``<folder>/README.md`` for the finished seeds of one experiment; None when none has finished."""
    finished = [Path(d) for d in run_dirs if _finished(Path(d))]
    if not finished:
        return None
    cfg, facts, shape, model = _student(finished[0])
    summaries = [json.loads((d / "summary.json").read_text()) for d in finished]
    results = [{"last": s["last_top1"], "best": s["best_top1"], "seed": s["seed"], "run_dir": str(d)}
               for s, d in zip(summaries, finished)]
    card = render(_subject(cfg, facts["num_classes"], shape), results, measure(model, shape),
                  code_of(finished[0] / "config.yaml"), folder=Path(folder))
    return _write(Path(folder) / CARD, card)


def _student(run_dir: Path):
    """``(cfg, data.json facts, input shape, the trained student in eval mode)`` of a run folder."""
    cfg = load_config(run_dir / "config.yaml")
    facts = json.loads((run_dir / "data.json").read_text())
    shape = (cfg.data.channels if cfg.data.dataset == "fashion_mnist" else 3, facts["input_size"], facts["input_size"])
    model = create_model(cfg.student.name, num_classes=facts["num_classes"])
    load_weights(model, run_dir / "student.safetensors")
    return cfg, facts, shape, model.eval()


def _finished(run_dir: Path) -> bool:
    path = run_dir / "summary.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "finished" and \
        (run_dir / "student.safetensors").is_file()


def measure(model: torch.nn.Module, shape: Sequence[int], batch_sizes: Sequence[int] = BATCH_SIZES) -> Dict[str, Any]:
    """Parameters, MACs, activation memory and CPU latency of ``model``, and how. Latency runs on one
    torch thread: a figure that does not depend on the cores the training happened to have, and that
    other jobs on the machine disturb least."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        latency = {b: latency_ms(model, shape, b, repeats=REPEATS, warmup=WARMUP) for b in batch_sizes}
    finally:
        torch.set_num_threads(threads)
    return {"parameters": count_parameters(model), "macs": count_macs(model, shape),
            "activation_bytes": activation_bytes(model, shape), "latency_ms": latency,
            "machine": f"{cpu_name()}, 1 torch thread, torch {torch.__version__}",
            "date": datetime.date.today().isoformat()}


CLASSIFICATION = {"task": "image-classification", "metric": "test top-1", "type": "accuracy", "split": "test",
                  "last_key": "`last_top1`", "best_key": "`best_top1` (chosen on the test split: optimistic)"}


def _subject(cfg, classes: int, shape: Sequence[int], kind: Dict[str, str] = CLASSIFICATION) -> Dict[str, Any]:
    """What the card describes: the run's models, method, data and training, and ``kind`` (the task, its
    metric and where summary.json keeps it)."""
    method = {k: v for k, v in cfg.method.model_dump().items() if k != "name"}
    return {"experiment": cfg.experiment, "student": cfg.student.name, "method": cfg.method.name,
            "method_keys": method, "teacher": cfg.teacher.name if cfg.teacher else None, "dataset": cfg.data.dataset,
            "classes": classes, "input": "x".join(map(str, shape)), "epochs": cfg.schedule.epochs,
            "lr": cfg.optimizer.lr, "optimizer": cfg.optimizer.name, **kind}


def _teacher_top1(run_dir: Path) -> Optional[float]:
    path = run_dir / "teacher.json"
    return json.loads(path.read_text())["top1"] if path.is_file() else None


def front_matter(subject: Dict[str, Any], name: str, last: float, best: float) -> Dict[str, Any]:
    """The card's YAML header (the Hugging Face model-card fields)."""
    task, kind = subject["task"], subject["type"]
    tags = ["deepkd", task, subject["method"], subject["student"]]
    if subject["teacher"]:
        tags.insert(1, "knowledge-distillation")
    dataset = {"name": subject["dataset"], "type": subject["dataset"], "split": subject["split"]}
    metric = subject["metric"].split(" ", 1)[-1]  # "top-1", "box AP"
    metrics = [{"type": kind, "name": f"{metric} (last epoch)", "value": round(last, 2)},
               {"type": kind, "name": f"{metric} (best epoch)", "value": round(best, 2)}]
    return {"library_name": "deepkd", "pipeline_tag": task, "tags": tags, "datasets": [subject["dataset"]],
            "metrics": [kind], "model-index": [{"name": name, "results": [{"task": {"type": task},
                                                                           "dataset": dataset, "metrics": metrics}]}]}


def _mean_std(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} +- {statistics.stdev(values):.2f} (n={len(values)})"


def code_of(config: Path) -> Dict[str, Any]:
    """The code that trained a run: the ``# version:``, ``# commit:``, ``# dirty:`` header of its
    ``config.yaml`` (:func:`deepkd.train.config.save_config`), or "unknown" for each one missing."""
    header = "\n".join(line[2:] for line in config.read_text().splitlines() if line.startswith("# "))
    try:
        found = yaml.safe_load(header) if header else {}
    except yaml.YAMLError:
        found = {}
    found = found if isinstance(found, dict) else {}
    return {key: found.get(key, "unknown") for key in ("version", "commit", "dirty")}


def render(subject: Dict[str, Any], summaries: List[Dict[str, Any]], cost: Dict[str, Any], code: Dict[str, Any], *,
           teacher_top1: Optional[float] = None, folder: Optional[Path] = None) -> str:
    """The card: YAML front matter, then a table whose every row names its source."""
    group = folder is not None
    last = [s["last"] for s in summaries]
    best = [s["best"] for s in summaries]
    seeds = ", ".join(str(s["seed"]) for s in summaries)
    name = subject["experiment"] + ("" if group else f"/seed{summaries[0]['seed']}")
    header = yaml.safe_dump(front_matter(subject, name, statistics.fmean(last), statistics.fmean(best)),
                            sort_keys=False)
    source = "each seed's summary.json" if group else "summary.json"
    teacher = subject["teacher"] or "none (the student alone)"
    if teacher_top1 is not None:
        teacher += f" (test top-1 {teacher_top1:.2f}, teacher.json)"
    method = ", ".join(f"{k}={v}" for k, v in subject["method_keys"].items()) or "defaults"
    lat = cost["latency_ms"]
    rows = [
        ("student", subject["student"], "config.yaml `student.name`"),
        ("teacher", teacher, "config.yaml `teacher.name`"),
        ("method", f"{subject['method']} ({method})", "config.yaml `method`"),
        ("data", f"{subject['dataset']}, {subject['classes']} classes, input {subject['input']}",
         "config.yaml `data`" + (", data.json" if subject["task"] == "image-classification" else "")),
        ("training", f"{subject['epochs']} epochs, {subject['optimizer']} lr {subject['lr']:g}",
         "config.yaml `schedule`, `optimizer`"),
        (f"{subject['metric']}, last epoch", _mean_std(last),
         f"{source} {subject['last_key']}" + (f", seeds {seeds}" if group else "")),
        (f"{subject['metric']}, best epoch", _mean_std(best), f"{source} {subject['best_key']}"),
        ("parameters", f"{cost['parameters']:,}", "counted on the student's tensors" +
         (f" (seed {summaries[0]['seed']})" if group else "")),
        ("MACs, one image", f"{cost['macs']:,}", "torch FlopCounterMode (FLOPs / 2)"),
        ("activations, one image", f"{cost['activation_bytes'] / 2**20:.2f} MiB",
         "float32 outputs of every leaf module (deepkd.models.cost.activation_bytes)"),
        *[(f"CPU latency, batch {b}", f"{lat[b]:.2f} ms",
           f"median of {REPEATS} runs after {WARMUP}; {cost['machine']}; {cost['date']}") for b in lat]]
    table = ["| | value | source |", "|---|---|---|", *[f"| {a} | {b} | {c} |" for a, b, c in rows]]
    title = (f"# {subject['experiment']}: {subject['student']}" +
             (f" distilled from {subject['teacher']} with {subject['method']}" if subject["teacher"]
              else f" trained with {subject['method']}"))
    body = [title, "", *table, "", *_usage(subject, summaries, folder, code)]
    return f"---\n{header}---\n\n" + "\n".join(body) + "\n"


def _usage(subject: Dict[str, Any], summaries: List[Dict[str, Any]], group: Optional[Path],
           code: Dict[str, Any]) -> List[str]:
    where = "." if not group else os.path.relpath(summaries[0]["run_dir"], group)
    if subject["task"] == "image-classification":
        commands = [(f"deepkd predict {where} image.png", "class probabilities"),
                    (f"deepkd export {where} --format onnx", "ONNX, checked against PyTorch"),
                    (f"deepkd quantize {where}", "int8 ONNX, top-1 before and after")]
        build = f"`deepkd.models.create_model(\"{subject['student']}\", num_classes={subject['classes']})`"
    else:
        commands = [(f"deepkd export {where} --format onnx", "ONNX detector, checked against PyTorch")]
        build = f"`deepkd.detection.create_detector(\"{subject['student']}\", {subject['classes']})`"
    width = max(len(c) for c, _ in commands) + 2
    lines = ["## Use", "", "```", *[f"{c.ljust(width)}# {what}" for c, what in commands], "```", "",
             f"In Python: {build} and `deepkd.models.load_weights(model, \"{os.path.join(where, HUB_WEIGHTS)}\")`.",
             "", "## Reproduce", ""]
    if group:
        lines += [f"Seeds: {', '.join(str(s['seed']) for s in summaries)}, in "
                  + ", ".join(f"`{s['run_dir']}`" for s in summaries) + ". Each folder's `config.yaml` is its "
                  "resolved recipe: `deepkd train <folder>/config.yaml` trains that seed again."]
    else:
        lines += ["`deepkd train config.yaml` trains this run again: `config.yaml` is the resolved recipe "
                  f"(seed {summaries[0]['seed']} included), headed by the code that ran it."]
    lines += ["", "## Provenance", "",
              f"Trained by deepkd {code['version']}, commit {code['commit']} (uncommitted changes: {code['dirty']}), "
              "from the header of config.yaml. Card written by deepkd "
              f"{__version__} with torch {torch.__version__}, Python {platform.python_version()}, on "
              f"{datetime.date.today().isoformat()}."]
    return lines


def _link(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (a copy where the file system has no links)."""
    partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    partial.unlink(missing_ok=True)
    try:
        os.link(source, partial)
    except OSError:
        shutil.copyfile(source, partial)
    os.replace(partial, target)


def _write(path: Path, text: str) -> Path:
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)
    return path
