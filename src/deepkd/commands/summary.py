"""``deepkd summary``: best and last test metric per experiment (classification: top-1 %; detection:
box AP), mean +- std over seeds."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, List, Sequence

from deepkd.errors import MissingFileError
from deepkd.train.logs import METRICS_JSONL, read_jsonl


def find_runs(paths: Sequence[str | Path]) -> List[Path]:
    """Run folders (those holding metrics.jsonl) at or below the given paths, sorted."""
    found = set()
    for path in map(Path, paths):
        if not path.exists():
            raise MissingFileError(f"run folder {str(path)!r} does not exist")
        if (path / METRICS_JSONL).is_file():
            found.add(path)
        found.update(p.parent for p in path.rglob(METRICS_JSONL))
    if not found:
        raise MissingFileError(f"no runs (folders with {METRICS_JSONL}) under {', '.join(map(str, paths))}")
    return sorted(found)


METRICS = (("test_top1", "top1", "top-1"), ("AP", "AP", "AP"))  # (metrics.jsonl key, row key, column)


def _run_record(run_dir: Path) -> Dict:
    records = read_jsonl(run_dir / METRICS_JSONL)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    experiment = summary.get("experiment") or run_dir.parent.name
    logged, name, _ = next((m for m in METRICS if any(m[0] in r for r in records)), METRICS[0])
    values = [r[logged] for r in records if logged in r]  # detection evaluates every eval_every epochs
    if not values:
        raise MissingFileError(f"{run_dir / METRICS_JSONL} holds no evaluated epoch yet")
    return {"experiment": experiment, "run_dir": str(run_dir), "epochs": len(records), "metric": name,
            f"best_{name}": max(values), f"last_{name}": values[-1], "finished": summary.get("status") == "finished"}


def _mean_std(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(paths: Sequence[str | Path]) -> List[Dict]:
    """One row per experiment: number of seeds, best and last top-1 as mean and sample std."""
    groups: Dict[str, List[Dict]] = {}
    for run_dir in find_runs(paths):
        record = _run_record(run_dir)
        groups.setdefault(record["experiment"], []).append(record)
    rows = []
    for experiment, runs in groups.items():
        name = runs[0]["metric"]
        rows.append({"experiment": experiment, "runs": len(runs), "metric": name,
                     "finished": sum(r["finished"] for r in runs),
                     "epochs": max(r["epochs"] for r in runs),
                     f"best_{name}": _mean_std([r[f"best_{name}"] for r in runs]),
                     f"last_{name}": _mean_std([r[f"last_{name}"] for r in runs])})
    return rows


def format_summary(rows: List[Dict]) -> str:
    """A fixed-width table; std is the sample standard deviation over seeds (0 for one run)."""
    width = max([len("experiment")] + [len(r["experiment"]) for r in rows])
    lines = [f"{'experiment':<{width}}  runs  epochs  best             last             metric"]
    for r in rows:
        best, last = r[f"best_{r['metric']}"], r[f"last_{r['metric']}"]
        lines.append(f"{r['experiment']:<{width}}  {r['runs']:>4}  {r['epochs']:>6}  "
                     f"{best['mean']:6.2f} +- {best['std']:4.2f}   {last['mean']:6.2f} +- {last['std']:4.2f}   "
                     f"{dict((m[1], m[2]) for m in METRICS)[r['metric']]}")
    return "\n".join(lines)
