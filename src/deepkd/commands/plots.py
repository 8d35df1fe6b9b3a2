"""``deepkd plot``: PNG figures of runs (accuracy, loss, LR, DTM K, per-stream GSNR)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from deepkd.commands.summary import find_runs
from deepkd.engine.logs import GSNR_JSONL, METRICS_JSONL, read_jsonl


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def configuration(run_dir: Path) -> str:
    """A run's configuration: its experiment folder (the seeds of one configuration are its runs)."""
    return run_dir.parent.name


def colours(runs: Sequence[Path]) -> Dict[str, str]:
    """One colour per configuration, the same in every panel and figure of one call."""
    names = sorted({configuration(r) for r in runs})
    palette = [f"C{i}" for i in range(10)] if len(names) <= 10 else \
        [_pyplot().get_cmap("tab20")(i / 20) for i in range(20)]
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def default_out(runs: Sequence[Path]) -> Path:
    """One run: its folder; several: their common parent (where a user looks for a comparison)."""
    return runs[0] if len(runs) == 1 else Path(os.path.commonpath([str(r.resolve()) for r in runs]))


def panels(data: Dict[Path, list]) -> List[Tuple[str, str, bool]]:
    """``(metric key, title, log scale)`` of every panel this set of runs has values for, in order."""
    keys = [k for records in data.values() for r in records for k in r]
    if "AP" in keys:  # detection runs log box AP and each detector / distillation loss term
        wanted = [("AP", "box AP (%)", False), ("AP50", "box AP50 (%)", False)]
        wanted += [(k, k.replace("train_loss/", "training loss: "), False)
                   for k in sorted({k for k in keys if k.startswith("train_loss/")})]
    else:
        wanted = [("test_top1", "test top-1 (%)", False), ("train_loss", "training loss", True),
                  ("test_loss", "test loss", True)]
    wanted += [("lr", "learning rate", True), ("topk", "dynamic top-k mask: K", False)]
    wanted += [(k, k.replace("momentum/", "momentum: "), False) for k in sorted({k for k in keys
                                                                                 if k.startswith("momentum/")})]
    present = set(keys)
    return [p for p in wanted if p[0] in present and _has_values(data, p[0])]


def _has_values(data: Dict[Path, list], key: str) -> bool:
    return any(r.get(key) is not None for records in data.values() for r in records)


def _band(ax, runs: List[Path], data: Dict[Path, list], key: str, x: str, colour, label: str) -> None:
    """Mean over a configuration's seeds as a line, min..max over them as a band (one run: its line)."""
    series: Dict[float, list] = {}
    for run_dir in runs:
        for record in data[run_dir]:
            if record.get(key) is not None:
                series.setdefault(record[x], []).append(float(record[key]))
    xs = sorted(series)
    mean = [sum(series[v]) / len(series[v]) for v in xs]
    ax.plot(xs, mean, color=colour, marker="o" if len(xs) < 40 else None, markersize=3,
            label=f"{label} (n={len(runs)})" if len(runs) > 1 else label)
    if len(runs) > 1:
        ax.fill_between(xs, [min(series[v]) for v in xs], [max(series[v]) for v in xs], color=colour, alpha=0.2)


def plot_runs(paths: Sequence[str | Path], out: Optional[str | Path] = None) -> List[Path]:
    """Write ``curves.png`` (one panel per recorded metric: accuracy or box AP, losses, LR, K, momenta;
    one colour per configuration, its seeds as a band) and, when recorded, ``gsnr.png``; returns paths."""
    runs = find_runs(paths)
    out_dir = Path(out) if out is not None else default_out(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {r: read_jsonl(r / METRICS_JSONL) for r in runs}
    groups: Dict[str, List[Path]] = {}
    for run_dir in runs:
        groups.setdefault(configuration(run_dir), []).append(run_dir)
    colour, chosen = colours(runs), panels(data)
    plt = _pyplot()
    columns = min(3, max(1, len(chosen)))
    rows = max(1, math.ceil(len(chosen) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False)
    for ax, (key, title, log) in zip(axes.flat, chosen):
        for name, members in groups.items():
            _band(ax, members, data, key, "epoch", colour[name], name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_yscale("log" if log else "linear")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(chosen):]:
        ax.set_visible(False)
    fig.tight_layout()
    written = [out_dir / "curves.png"]
    fig.savefig(written[0], dpi=110)
    plt.close(fig)
    gsnr = {r: read_jsonl(r / GSNR_JSONL) for r in runs if (r / GSNR_JSONL).is_file()}
    if gsnr:
        written.append(_plot_gsnr(plt, gsnr, groups, colour, out_dir / "gsnr.png"))
    return written


def _plot_gsnr(plt, gsnr: Dict[Path, list], groups: Dict[str, List[Path]], colour: Dict[str, str],
               path: Path) -> Path:
    """GSNR per stream: one panel per stream, the configurations' colours, seeds as bands."""
    streams = sorted({k for records in gsnr.values() for r in records for k in r if k.startswith("gsnr/")})
    fig, axes = plt.subplots(1, len(streams), figsize=(5 * len(streams), 4), squeeze=False)
    for ax, key in zip(axes.flat, streams):
        for name, members in groups.items():
            measured = [r for r in members if r in gsnr]
            if measured:
                _band(ax, measured, gsnr, key, "step", colour[name], name)
        ax.set_title(f"GSNR, {key[5:]} stream")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_comparison(rows: Dict[str, float], path: str | Path, title: str) -> Path:
    """A bar chart of top-1 per method (the demo's comparison figure)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(rows)
    bars = ax.bar(names, [rows[n] for n in names], color="#4c72b0")
    for bar, name in zip(bars, names):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{rows[name]:.1f}",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    low = min(rows.values())
    ax.set_ylim(max(0.0, low - 10), min(100.0, max(rows.values()) + 5))
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_summary(groups: Dict[str, list], rows: List[Dict], path: str | Path) -> Path:
    """``deepkd summary --figure``: (left) the test metric per epoch, mean line and +-std band over each
    experiment's seeds; (right) each experiment's best metric, mean with its 95% CI as an error bar.
    ``groups``/``rows``: :func:`deepkd.commands.summary.collect` and :func:`~deepkd.commands.summary.summary_rows`."""
    import statistics

    plt = _pyplot()
    label = {"top1": "test top-1 (%)", "AP": "box AP (%)"}[rows[0]["metric"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for experiment, runs in groups.items():
        by_epoch: Dict[int, list] = {}
        for run in runs:
            for epoch, value in run["curve"]:
                by_epoch.setdefault(epoch, []).append(value)
        epochs = sorted(by_epoch)
        mean = [statistics.fmean(by_epoch[e]) for e in epochs]
        std = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
        (line,) = left.plot(epochs, mean, marker="o", markersize=3, label=f"{experiment} (n={len(runs)})")
        left.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                          color=line.get_color(), alpha=0.2)
    left.set_title(f"{label} per epoch: mean +- std over seeds")
    left.set_xlabel("epoch")
    left.legend(fontsize=7)
    best = [r["best_" + r["metric"]] for r in rows]
    names = [r["experiment"] for r in rows]
    right.errorbar(range(len(rows)), [b["mean"] for b in best], yerr=[b["ci95"] or 0.0 for b in best],
                   fmt="o", color="#4c72b0", capsize=4)
    right.set_xticks(range(len(rows)), names)
    right.set_title(f"best {label}: mean with 95% CI")
    plt.setp(right.get_xticklabels(), rotation=20, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
