"""``deepkd summary``: best and last top-1 per experiment, mean +- std over seeds."""
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


def _run_record(run_dir: Path) -> Dict:
    records = read_jsonl(run_dir / METRICS_JSONL)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    experiment = summary.get("experiment") or run_dir.parent.name
    return {"experiment": experiment, "run_dir": str(run_dir), "epochs": len(records),
            "best_top1": max(r["test_top1"] for r in records), "last_top1": records[-1]["test_top1"],
            "finished": summary.get("status") == "finished"}


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
        rows.append({"experiment": experiment, "runs": len(runs),
                     "finished": sum(r["finished"] for r in runs),
                     "epochs": max(r["epochs"] for r in runs),
                     "best_top1": _mean_std([r["best_top1"] for r in runs]),
                     "last_top1": _mean_std([r["last_top1"] for r in runs])})
    return rows


def format_summary(rows: List[Dict]) -> str:
    """A fixed-width table; std is the sample standard deviation over seeds (0 for one run)."""
    width = max([len("experiment")] + [len(r["experiment"]) for r in rows])
    lines = [f"{'experiment':<{width}}  runs  epochs  best top-1       last top-1"]
    for r in rows:
        best, last = r["best_top1"], r["last_top1"]
        lines.append(f"{r['experiment']:<{width}}  {r['runs']:>4}  {r['epochs']:>6}  "
                     f"{best['mean']:6.2f} +- {best['std']:4.2f}   {last['mean']:6.2f} +- {last['std']:4.2f}")
    return "\n".join(lines)
