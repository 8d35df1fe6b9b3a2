"""``deepkd plot``: PNG figures of runs (accuracy, loss, LR, DTM K, per-stream GSNR)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from deepkd.commands.summary import find_runs
from deepkd.train.logs import GSNR_JSONL, METRICS_JSONL, read_jsonl


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _label(run_dir: Path, runs: List[Path]) -> str:
    names = {r.parent.name for r in runs}
    return run_dir.parent.name + (f"/{run_dir.name}" if len(names) < len(runs) else "")


def _curves(ax, runs: List[Path], data: Dict[Path, list], keys: Sequence[str], title: str, log: bool = False):
    for run_dir in runs:
        records = data[run_dir]
        epochs = [r["epoch"] for r in records]
        for key in keys:
            values = [r.get(key) for r in records]
            if any(v is not None for v in values):
                suffix = f" {key}" if len(keys) > 1 else ""
                ax.plot(epochs, [float("nan") if v is None else v for v in values], marker="o", markersize=3,
                        label=_label(run_dir, runs) + suffix)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    if log:
        ax.set_yscale("log")
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not recorded in these runs", ha="center", va="center", transform=ax.transAxes)


def plot_runs(paths: Sequence[str | Path], out: Optional[str | Path] = None) -> List[Path]:
    """Write ``curves.png`` (accuracy or box AP, losses, LR, K) and, when recorded, ``gsnr.png``; returns paths."""
    runs = find_runs(paths)
    out_dir = Path(out) if out is not None else runs[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {r: read_jsonl(r / METRICS_JSONL) for r in runs}
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    detection = any("AP" in r for records in data.values() for r in records)
    if detection:  # detection runs log box AP and each detector / distillation loss term
        _curves(axes[0, 0], runs, data, ["AP", "AP50"], "box AP (%)")
        terms = sorted({k for records in data.values() for r in records for k in r if k.startswith("train_loss")})
        _curves(axes[0, 1], runs, data, terms, "training losses")
    else:
        _curves(axes[0, 0], runs, data, ["test_top1"], "test top-1 (%)")
        _curves(axes[0, 1], runs, data, ["train_loss", "test_loss"], "loss")
    _curves(axes[1, 0], runs, data, ["lr"], "learning rate", log=True)
    _curves(axes[1, 1], runs, data, ["topk"], "dynamic top-k mask: K")
    fig.tight_layout()
    written = [out_dir / "curves.png"]
    fig.savefig(written[0], dpi=110)
    plt.close(fig)
    gsnr = {r: read_jsonl(r / GSNR_JSONL) for r in runs if (r / GSNR_JSONL).is_file()}
    if gsnr:
        written.append(_plot_gsnr(plt, gsnr, runs, out_dir / "gsnr.png"))
    return written


def _plot_gsnr(plt, gsnr: Dict[Path, list], runs: List[Path], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run_dir, records in gsnr.items():
        keys = sorted({k for r in records for k in r if k.startswith("gsnr/")})
        for key in keys:
            ax.plot([r["step"] for r in records], [r.get(key, float("nan")) for r in records],
                    label=f"{_label(run_dir, runs)} {key[5:]}")
    ax.set_title("gradient signal-to-noise ratio per stream")
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
