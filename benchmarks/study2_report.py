"""The tables and figure of STUDY.md from the runs of ``benchmarks/study2.py``.

    python benchmarks/study2_report.py PROBLEM [--configs ...]

Prints markdown: the selection grid (mean +- std of the final-epoch top-1 over seeds 0-2 per lr, the
selected lr in bold; the best-epoch top-1 beside it), the confirmation table (seeds 3-7 at the selected
lr: n, mean +- std, 95% CI, best-epoch), the comparisons as Welch 95% intervals on the final-epoch top-1,
and the controls; writes ``docs/study2/<problem>_{select,confirm}.json`` (``deepkd summary --export``:
``deepkd summary FILE --compare A B`` gives any row again) and ``docs/study2/<problem>_lr.png``.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Dict, List

from study2 import COMPARISONS, CONFIGS, CONTROLS, DOCS, experiment, grid, groups, selected

from deepkd.commands.summary import export_runs, summary_rows, welch_interval


def _ms(values: List[float]) -> str:
    return f"{statistics.fmean(values):.2f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def selection_table(found: Dict, configs: List[str]) -> str:
    lrs = sorted({lr for c in configs for lr in grid(found, c)})
    head = "| configuration | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | selected |"
    lines = [head, "|---" * (len(lrs) + 2) + "|"]
    for config in configs:
        runs, (best, edge) = grid(found, config), selected(found, config)
        cells = []
        for lr in lrs:
            if lr not in runs:
                cells.append("")
                continue
            final, best_epoch = [r["last_top1"] for r in runs[lr]], [r["best_top1"] for r in runs[lr]]
            text = f"{_ms(final)} ({statistics.fmean(best_epoch):.2f})"
            cells.append(f"**{text}**" if lr == best else text)
        chosen = "-" if best is None else f"{best:g}" + (" (at the edge of the finished lrs)" if edge else "")
        lines.append(f"| {config} | " + " | ".join(cells) + f" | {chosen} |")
    return "\n".join(lines)


def confirmed(found: Dict, select_found: Dict, config: str, lr=None) -> List[Dict]:
    lr = lr if lr is not None else selected(select_found, config)[0]
    return [] if lr is None else [r for r in found.get(experiment(config, lr), []) if r["finished"]]


def confirmation_table(found: Dict, select_found: Dict, configs: List[str]) -> str:
    lines = ["| configuration | lr | n | final top-1, mean +- std | 95% CI | best-epoch top-1 |",
             "|---|---|---|---|---|---|"]
    for config in configs:
        lr, runs = selected(select_found, config)[0], confirmed(found, select_found, config)
        if not runs:
            continue
        final = [r["last_top1"] for r in runs]
        stats = summary_rows({config: runs})[0]["last_top1"]
        half = stats["ci95"] or 0.0
        lines.append(f"| {config} | {lr:g} | {len(runs)} | {_ms(final)} | [{stats['mean'] - half:.2f}, "
                     f"{stats['mean'] + half:.2f}] | {_ms([r['best_top1'] for r in runs])} |")
    return "\n".join(lines)


def _difference(a: List[Dict], b: List[Dict]) -> str:
    got = welch_interval([r["last_top1"] for r in a], [r["last_top1"] for r in b])
    real = "yes" if got["low"] > 0 or got["high"] < 0 else "no"
    return f"{got['diff']:+.2f} | [{got['low']:+.2f}, {got['high']:+.2f}] | {len(a)}, {len(b)} | {real}"


def comparison_table(found: Dict, select_found: Dict) -> str:
    lines = ["| difference (final top-1) | mean | 95% Welch CI | n | excludes 0 |", "|---|---|---|---|---|"]
    for a, b in COMPARISONS:
        ra, rb = confirmed(found, select_found, a), confirmed(found, select_found, b)
        if len(ra) > 1 and len(rb) > 1:
            lines.append(f"| {a} - {b} | {_difference(ra, rb)} |")
    dkd_lr = selected(select_found, "dkd")[0]
    for label, config in CONTROLS.items():
        control, dkd = confirmed(found, select_found, config, dkd_lr), confirmed(found, select_found, "dkd")
        if len(control) > 1 and len(dkd) > 1:
            lines.append(f"| control ({label}): {config} at DKD's lr {dkd_lr:g} - dkd | {_difference(control, dkd)} |")
    return "\n".join(lines)


def control_a(found: Dict, select_found: Dict) -> str:
    """Per seed: DeepKD+DKD at momenta 0.9 against DKD: final top-1, the epochs whose test top-1 agree, and the
    largest weight difference (where both runs' folders are on this machine; committed records keep no weights)."""
    dkd_lr = selected(select_found, "dkd")[0]
    ours = {Path(r["run_dir"]).name: r for r in confirmed(found, select_found, CONTROLS["a"], dkd_lr)}
    theirs = {Path(r["run_dir"]).name: r for r in confirmed(found, select_found, "dkd")}
    lines = ["| seed | DKD (SGD 0.9) | DeepKD+DKD, momenta 0.9 | epochs with equal test top-1 | max abs weight "
             "difference |", "|---|---|---|---|---|"]
    for seed in sorted(set(ours) & set(theirs)):
        curves = [dict(map(tuple, r["curve"])) for r in (ours[seed], theirs[seed])]
        equal = sum(curves[0][e] == curves[1].get(e) for e in curves[0])
        lines.append(f"| {seed} | {theirs[seed]['last_top1']:.2f} | {ours[seed]['last_top1']:.2f} | "
                     f"{equal}/{len(curves[1])} | {_weight_gap(ours[seed], theirs[seed])} |")
    return "\n".join(lines)


def _weight_gap(a: Dict, b: Dict) -> str:
    import torch
    from safetensors.torch import load_file

    files = [Path(r["run_dir"]) / "student.safetensors" for r in (a, b)]
    if not all(f.is_file() for f in files):
        return "(weights not on this machine)"
    x, y = (load_file(str(f)) for f in files)
    return f"{max(float((x[k].float() - y[k].float()).abs().max()) for k in x if torch.is_floating_point(x[k])):.3g}"


def figure(found: Dict, configs: List[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    top = 0.0
    for index, config in enumerate(configs):
        runs = grid(found, config)
        if not runs:
            continue
        lrs = list(runs)
        means = [statistics.fmean(r["last_top1"] for r in runs[lr]) for lr in lrs]
        stds = [statistics.stdev([r["last_top1"] for r in runs[lr]]) for lr in lrs]
        top = max(top, *means)
        for ax in axes:
            ax.errorbar(lrs, means, yerr=stds, marker="o", capsize=3, color=f"C{index % 10}",
                        linestyle="-" if index < 10 else "--", label=config)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate")
    axes[0].set_ylabel("final-epoch test top-1 (%), mean +- std over seeds 0-2")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].set_ylim(top - 6, top + 1)  # where the selected lrs and the differences of a point or two are
    axes[1].set_title("the top 6 points", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(problem: str, configs: List[str]) -> None:
    select_found, confirm_found = groups(problem, "select"), groups(problem, "confirm")
    DOCS.mkdir(parents=True, exist_ok=True)
    for phase, found in (("select", select_found), ("confirm", confirm_found)):
        if found:
            export_runs(found, DOCS / f"{problem}_{phase}.json")
    figure(select_found, configs, DOCS / f"{problem}_lr.png")
    print(f"## {problem}: selection (seeds 0-2; final-epoch top-1 mean +- std, best-epoch mean in brackets)\n")
    print(selection_table(select_found, configs))
    if confirm_found:
        print(f"\n## {problem}: confirmation (seeds 3-7 at the selected lr)\n")
        print(confirmation_table(confirm_found, select_found, configs))
        print("\n" + comparison_table(confirm_found, select_found))
        print("\n" + control_a(confirm_found, select_found))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("problem")
    parser.add_argument("--configs", nargs="*", default=CONFIGS)
    arguments = parser.parse_args()
    report(arguments.problem, arguments.configs)
