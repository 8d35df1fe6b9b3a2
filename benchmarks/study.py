"""The study of STUDY.md: DeepKD's claims on the offline synthetic set, several seeds each.

    python benchmarks/study.py run [--seeds 0-4] [--jobs 2]   # teacher, the sweep, the GSNR runs
    python benchmarks/study.py report                          # tables (markdown) and figures

``run`` trains the teacher once (``benchmarks/study/teacher.yaml``), then ``deepkd sweep`` over the
study's recipes (``benchmarks/study/*.yaml``; re-running skips finished runs and resumes interrupted
ones) into ``runs/study/sweep``, the two-view methods and DKD (12 epochs) into ``runs/study/two_view``, and DeepKD+KD /
DeepKD+DKD with ``train.gsnr_every`` into ``runs/study/gsnr``. ``report`` prints the tables of
STUDY.md from those folders (``deepkd summary``'s statistics) and writes ``runs/study/*.png``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent / "study"
OUT = Path("runs/study")
STUDY = ["ce", "kd", "dkd", "deepkd_kd_ref", "deepkd_kd_paper", "deepkd_dkd_ref", "deepkd_dkd_paper",
         "deepkd_dkd_topk", "deepkd_dkd_auto"]
TWO_VIEW = ["mlkd", "crld", "deepkd_mlkd", "deepkd_crld"]
# (a, b): the differences the study reports, a - b with a 95% Welch interval
COMPARISONS = [("kd", "ce"), ("dkd", "ce"), ("dkd", "kd"), ("deepkd_dkd_ref", "kd"), ("deepkd_kd_ref", "kd"),
               ("deepkd_kd_paper", "kd"),
               ("deepkd_kd_paper", "deepkd_kd_ref"), ("deepkd_dkd_ref", "dkd"), ("deepkd_dkd_paper", "dkd"),
               ("deepkd_dkd_paper", "deepkd_dkd_ref"), ("deepkd_dkd_topk", "deepkd_dkd_ref"),
               ("deepkd_dkd_auto", "deepkd_dkd_ref"), ("deepkd_dkd_auto", "dkd")]
TWO_VIEW_COMPARISONS = [("mlkd", "dkd"), ("crld", "dkd"), ("deepkd_mlkd", "mlkd"), ("deepkd_crld", "crld")]


def deepkd(*args: str) -> None:
    print("$ deepkd " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "deepkd.cli", *args], check=True)


def run(seeds: str, two_view_seeds: str, gsnr_seeds: str, jobs: int) -> None:
    teacher = OUT / "teacher" / "seed0" / "student.safetensors"
    if not teacher.is_file():
        deepkd("train", str(HERE / "teacher.yaml"))
    deepkd("sweep", *(str(HERE / f"{n}.yaml") for n in STUDY), "--seeds", seeds, "--jobs", str(jobs),
           "--out", str(OUT / "sweep"))
    # the two-view methods run 12 epochs (each costs about 2.5 one-view runs here), DKD beside them too
    deepkd("sweep", *(str(HERE / f"{n}.yaml") for n in ["dkd", *TWO_VIEW]), "schedule.epochs=12", "--seeds",
           two_view_seeds, "--jobs", str(jobs), "--out", str(OUT / "two_view"))
    deepkd("sweep", str(HERE / "deepkd_kd_ref.yaml"), str(HERE / "deepkd_dkd_ref.yaml"), "train.gsnr_every=25",
           "--seeds", gsnr_seeds, "--jobs", str(jobs), "--out", str(OUT / "gsnr"))


def _table(folders: List[Path], order: List[str], comparisons) -> str:
    from deepkd.commands.summary import collect, compare, summary_rows

    groups = {}
    for folder in folders:
        groups.update(collect([folder]))
    rows = {r["experiment"]: r for r in summary_rows(groups, reach=80.0)}
    lines = ["| configuration | n | best top-1, mean +- std | 95% CI | epochs to 80% (runs reaching it) |",
             "|---|---|---|---|---|"]
    for name in [n for n in order if n in rows]:
        best, reach = rows[name]["best_top1"], rows[name]["reach"]
        interval = f"[{best['mean'] - best['ci95']:.2f}, {best['mean'] + best['ci95']:.2f}]" if best["ci95"] else "-"
        epochs = f"{reach['mean']:.1f} +- {reach['std']:.1f}" if reach["reached"] else "never"
        lines.append(f"| {name} | {rows[name]['runs']} | {best['mean']:.2f} +- {best['std']:.2f} | {interval} | "
                     f"{epochs} ({reach['reached']}/{reach['runs']}) |")
    lines += ["", "| difference (best top-1) | mean | 95% Welch CI | excludes 0 | speed-up to 80% |",
              "|---|---|---|---|---|"]
    for a, b in comparisons:
        if a in groups and b in groups and len(groups[a]) > 1 and len(groups[b]) > 1:
            got = compare(groups, a, b, reach=80.0)
            best, speed = got["best_top1"], got["reach"]["speedup"]
            real = "yes" if best["low"] > 0 or best["high"] < 0 else "no"
            lines.append(f"| {a} - {b} | {best['diff']:+.2f} | [{best['low']:+.2f}, {best['high']:+.2f}] | {real} | "
                         f"{f'{speed:.2f}x' if speed else '-'} |")
    return "\n".join(lines)


def _band(ax, steps: List[int], runs: List[List[dict]], key: str, label: str) -> None:
    """Mean over the seeds of ``key`` per measurement, with the seeds' min-max band."""
    values = [[r.get(key, float("nan")) for r in records[:len(steps)]] for records in runs]
    columns = list(zip(*values))
    ax.plot(steps[:len(columns)], [sum(v) / len(v) for v in columns], label=label)
    ax.fill_between(steps[:len(columns)], [min(v) for v in columns], [max(v) for v in columns], alpha=0.2)


def _gsnr_figure(folder: Path, path: Path) -> None:
    """Per-stream GSNR over training (mean over seeds, min-max band), one panel per configuration;
    below it, for auto-momentum runs, the momenta the rule chose."""
    from deepkd.commands.plots import _pyplot

    plt = _pyplot()
    configs: Dict[str, List[List[dict]]] = {}
    for log in sorted(folder.rglob("gsnr.jsonl")):
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        configs.setdefault(log.parent.parent.name, []).append(records)
    if not configs:
        return
    rows = 2 if any("momentum/task" in runs[0][0] for runs in configs.values()) else 1
    fig, axes = plt.subplots(rows, len(configs), figsize=(5 * len(configs), 3.6 * rows), squeeze=False)
    for column, (name, runs) in enumerate(sorted(configs.items())):
        steps = [r["step"] for r in runs[0]]
        ax = axes[0][column]
        for stream in ("task", "target", "non_target"):
            _band(ax, steps, runs, f"gsnr/{stream}", stream)
        ax.set(yscale="log", title=f"{name} ({len(runs)} seeds)", xlabel="step",
               ylabel="GSNR (mean over parameters)")
        ax.legend()
        if rows == 2:
            ax = axes[1][column]
            for stream in ("task", "target", "non_target"):
                _band(ax, steps, runs, f"momentum/{stream}", stream)
            ax.set(title="momenta chosen (stream_momentum: auto)", xlabel="step", ylabel="momentum")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report() -> None:
    from deepkd.commands.plots import plot_summary
    from deepkd.commands.summary import collect, summary_rows

    print("## One-view methods\n")
    print(_table([OUT / "sweep"], STUDY, COMPARISONS))
    if (OUT / "two_view").is_dir():
        print("\n## Two-view methods, next to DKD (12 epochs)\n")
        print(_table([OUT / "two_view"], ["dkd", *TWO_VIEW], TWO_VIEW_COMPARISONS))
    groups = collect([OUT / "sweep"])
    print("\n" + str(plot_summary(groups, summary_rows(groups), OUT / "study.png")))
    for name in ("gsnr", "sweep"):  # the probe runs at ref momenta, and the auto runs' own measurements
        if (OUT / name).is_dir():
            _gsnr_figure(OUT / name, OUT / f"gsnr_{name}.png")
            print(OUT / f"gsnr_{name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    go.add_argument("--seeds", default="0-4")
    go.add_argument("--two-view-seeds", default="0-2")
    go.add_argument("--gsnr-seeds", default="0")
    go.add_argument("--jobs", type=int, default=2)
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "run":
        run(args.seeds, args.two_view_seeds, args.gsnr_seeds, args.jobs)
    else:
        report()


if __name__ == "__main__":
    main()
