"""Study v2 (STUDY.md): every configuration at its own learning rate, selected on seeds it does not report.

    python benchmarks/study2.py select PROBLEM [--jobs 2]    # lr grid x seeds 0-2, extended until the best is inside
    python benchmarks/study2.py confirm PROBLEM [--jobs 2]   # each at its selected lr, seeds 3-7; controls (a), (c)
    python benchmarks/study2_report.py PROBLEM              # markdown tables, figure, per-run results JSON

PROBLEM is a folder of recipes under ``benchmarks/study/`` (``synthetic``, ``fashion_mnist``); runs go to
``runs/study2/<problem>/{select,confirm}`` through ``deepkd sweep`` (re-running resumes). Run it from a
separate install of a fixed commit (a git worktree and its own venv) so code changes cannot mix into a study.
``fashion_mnist_demo`` and ``fashion_mnist_demo2`` are the demo's problems (the first, then the one the demo
runs): four configurations, no controls (``--configs ce kd dkd deepkd_dkd_ref --controls``). Selection: the lr
with the best mean final-epoch top-1 over seeds 0-2 (every seed finished); a best at the grid's edge extends the
grid (x2 or /2) and selects again. Confirmation: seeds 3-7 at the selected lr; control (a) DeepKD+DKD with all
momenta 0.9 and control (c) DeepKD+DKD at the reference momenta, both at DKD's selected lr. ``study2_report.py``
prints the tables of STUDY.md and writes ``docs/study2/<problem>_*``.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent / "study"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "study2"
GRID = (0.025, 0.05, 0.1, 0.2, 0.4)
SELECT_SEEDS, CONFIRM_SEEDS = "0-2", "3-7"
CONFIGS = ["ce", "kd", "dkd", "dtkd", "dot", "deepkd_kd_ref", "deepkd_dkd_ref", "deepkd_dkd_paper", "deepkd_dkd_topk",
           "deepkd_dkd_topk_floor", "deepkd_dkd_auto", "dkd_stepmatched"]
CONTROLS = {"a": "deepkd_dkd_m09", "c": "deepkd_dkd_ref"}  # run at DKD's selected lr
COMPARISONS = [("kd", "ce"), ("dkd", "ce"), ("dtkd", "ce"), ("dot", "ce"), ("deepkd_kd_ref", "ce"),
               ("deepkd_dkd_ref", "ce"), ("dkd", "kd"), ("dtkd", "dkd"), ("dot", "kd"), ("deepkd_kd_ref", "kd"),
               ("deepkd_kd_ref", "dot"), ("deepkd_dkd_ref", "dkd"), ("deepkd_dkd_paper", "deepkd_dkd_ref"),
               ("deepkd_dkd_topk", "deepkd_dkd_ref"), ("deepkd_dkd_topk_floor", "deepkd_dkd_ref"),
               ("deepkd_dkd_auto", "deepkd_dkd_ref"),
               ("deepkd_dkd_ref", "dkd_stepmatched"), ("dkd_stepmatched", "dkd")]


def experiment(config: str, lr: float) -> str:
    """The sweep's name of ``config`` at ``lr`` (``deepkd sweep --set optimizer.lr=...``)."""
    return f"{config}__optimizer.lr={lr:g}"


def sweep(problem: str, configs: List[str], lrs, seeds: str, phase: str, jobs: int) -> None:
    count = len(parse_seeds(seeds))
    lrs = sorted({lr for c in configs for lr in missing(problem, phase, c, lrs, count)})
    if not lrs:
        return
    recipes = [str(HERE / problem / f"{c}.yaml") for c in configs]
    command = [sys.executable, "-m", "deepkd.cli", "sweep", *recipes, "--set",
               "optimizer.lr=" + ",".join(f"{lr:g}" for lr in lrs), "--seeds", seeds, "--jobs", str(jobs),
               "--out", str(Path("runs/study2") / problem / phase)]
    print("$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def groups(problem: str, phase: str) -> Dict[str, List[Dict]]:
    """The runs of a phase: this machine's run folders and the committed ``docs/study2/<problem>_<phase>.json``
    (runs of earlier sessions, whose folders are gone), one record per experiment and seed."""
    from deepkd.commands.summary import collect

    folder, committed = Path("runs/study2") / problem / phase, DOCS / f"{problem}_{phase}.json"
    # a phase's folder may exist before its first run (it holds the teacher cache copied from the selection)
    sources = [committed] * committed.exists() + [folder] * any(folder.glob("*/*/metrics.jsonl"))
    found = collect(sources) if sources else {}
    out = {}
    for name, runs in found.items():
        by_seed = {}
        for run in runs:  # a finished record wins; among equals the later (this machine's folder)
            seed = Path(run["run_dir"]).name
            if run["finished"] or not by_seed.get(seed, {}).get("finished"):
                by_seed[seed] = run
        out[name] = list(by_seed.values())
    return out


def missing(problem: str, phase: str, config: str, lrs, seeds: int) -> List[float]:
    """The lrs of ``lrs`` whose ``seeds`` runs of ``config`` have not all finished (here or committed)."""
    done = grid(groups(problem, phase), config, seeds)
    return [lr for lr in lrs if lr not in done]


def parse_seeds(text: str) -> List[int]:
    from deepkd.commands.sweep import parse_seeds as parse

    return parse(text)


def grid(found: Dict[str, List[Dict]], config: str, seeds: int = 3) -> Dict[float, List[Dict]]:
    """``{lr: finished runs}`` of ``config`` (lrs whose ``seeds`` runs all finished)."""
    out = {}
    for name, runs in found.items():
        base, _, lr = name.partition("__optimizer.lr=")
        finished = [r for r in runs if r["finished"]]
        if base == config and lr and len(finished) >= seeds:
            out[float(lr)] = finished
    return dict(sorted(out.items()))


def selected(found: Dict[str, List[Dict]], config: str) -> Tuple[Optional[float], Optional[str]]:
    """The lr of the best mean final top-1, and the edge ("low"/"high") it lies on, if any."""
    runs = grid(found, config)
    if not runs:
        return None, None
    best = max(runs, key=lambda lr: statistics.fmean(r["last_top1"] for r in runs[lr]))
    edge = "low" if best == min(runs) else "high" if best == max(runs) else None
    return best, edge


def select(problem: str, jobs: int, configs: List[str]) -> None:
    for config in configs:
        lrs = list(GRID)
        while True:
            sweep(problem, [config], lrs, SELECT_SEEDS, "select", jobs)
            best, edge = selected(groups(problem, "select"), config)
            if edge is None:
                break
            lrs = [best / 2] if edge == "low" else [best * 2]
        print(f"{config}: lr {best:g}", flush=True)


def share_teacher_cache(problem: str) -> None:
    """Copy the selection's teacher-logit caches into the confirmation's folder: their key is the teacher's
    weights and the training images, the same in both phases, so confirm need not compute them again."""
    source, target = (Path("runs/study2") / problem / phase / ".teacher_cache" for phase in ("select", "confirm"))
    for cache in source.glob("*.pt"):
        if not (target / cache.name).exists():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cache, target / f"{cache.name}.part")
            (target / f"{cache.name}.part").rename(target / cache.name)


def confirm(problem: str, jobs: int, configs: List[str], controls: List[str]) -> None:
    found = groups(problem, "select")
    share_teacher_cache(problem)
    for config in configs:
        best, edge = selected(found, config)
        if best is None or edge is not None:
            raise SystemExit(f"{config}: no selected lr yet (run `select` first)")
        sweep(problem, [config], [best], CONFIRM_SEEDS, "confirm", jobs)
    dkd, _ = selected(found, "dkd")
    for control in controls:
        sweep(problem, [CONTROLS[control]], [dkd], CONFIRM_SEEDS, "confirm", jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["select", "confirm"])
    parser.add_argument("problem")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--configs", nargs="*", default=CONFIGS)
    parser.add_argument("--controls", nargs="*", choices=sorted(CONTROLS), default=sorted(CONTROLS),
                        help="the controls `confirm` runs at DKD's selected lr (none for the demo's problem)")
    args = parser.parse_args()
    if args.step == "select":
        select(args.problem, args.jobs, args.configs)
    else:
        confirm(args.problem, args.jobs, args.configs, args.controls)


if __name__ == "__main__":
    main()
