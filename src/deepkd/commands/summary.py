"""``deepkd summary``: best and last test metric per experiment (classification: top-1 %; detection:
box AP), mean +- std and a 95% confidence interval of the mean over seeds; ``--compare A B``: the
difference of two experiments' means with a 95% Welch interval; ``--reach ACC``: epochs to first
reach a test metric of ACC (a speed-up with ``--compare``).

The Student-t quantile is computed here (:func:`t_quantile`: bisection on the CDF, written with the
regularised incomplete beta function's continued fraction) rather than taken from scipy: a few
lines instead of a large dependency for one number, and the same value wherever deepkd is installed.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from deepkd.engine.logs import METRICS_JSONL, read_jsonl
from deepkd.errors import ConfigError, DataError, MissingFileError
from deepkd.registry import closest


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
    curve = [(r["epoch"], r[logged]) for r in records if logged in r]
    return {"experiment": experiment, "run_dir": str(run_dir), "epochs": len(records), "metric": name,
            f"best_{name}": max(values), f"last_{name}": values[-1], "finished": summary.get("status") == "finished",
            "curve": curve}


# -- statistics ---------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes' betacf)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (any real df > 0)."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (df = inf: the normal's), by bisection on :func:`t_cdf`."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, not p={p}, df={df}")
    if math.isinf(df):
        return statistics.NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    while high - low > 1e-12 * high:
        middle = 0.5 * (low + high)
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return 0.5 * (low + high)


def _mean_std(values: List[float]) -> Dict[str, Optional[float]]:
    """Mean, sample std and the half-width of the mean's 95% t interval (None for one value)."""
    n, std = len(values), statistics.stdev(values) if len(values) > 1 else 0.0
    ci95 = t_quantile(0.975, n - 1) * std / math.sqrt(n) if n > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "ci95": ci95}


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Dict[str, Optional[float]]:
    """mean(a) - mean(b) with its Welch interval (Welch-Satterthwaite degrees of freedom)."""
    if len(a) < 2 or len(b) < 2:
        raise ConfigError(f"a Welch interval needs at least two runs per configuration, not {len(a)} and {len(b)}")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0:  # no spread in either: the interval is the point
        return {"diff": diff, "low": diff, "high": diff, "df": None}
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(va + vb)
    return {"diff": diff, "low": diff - half, "high": diff + half, "df": df}


def epochs_to_reach(curve: Sequence, target: float) -> Optional[int]:
    """The first epoch whose test metric is at least ``target`` (None: never)."""
    return next((epoch for epoch, value in curve if value >= target), None)


def _reach(runs: List[Dict], target: float) -> Dict:
    """Epochs to ``target``: mean +- std over the runs that reach it, and how many of the runs do."""
    epochs = [e for e in (epochs_to_reach(r["curve"], target) for r in runs) if e is not None]
    stats = _mean_std(epochs) if epochs else {"mean": None, "std": None, "ci95": None}
    return {"target": target, "reached": len(epochs), "runs": len(runs), **stats}


# -- rows ---------------------------------------------------------------------------------------------
RESULTS_FORMAT = "deepkd-runs/1"  # ``deepkd summary --export``: the per-run records, to commit beside a report


def write_cards(groups: Dict[str, List[Dict]]) -> List[Path]:
    """One model card per experiment (:func:`deepkd.train.card.write_group_card`) in the folder its seeds
    share, and one in each finished run folder that has none yet (runs finished before deepkd wrote
    cards); experiments read from ``--export`` files (no folders) or of detection are left out."""
    from deepkd.train.card import CARD, write_card, write_group_card

    written = []
    for runs in groups.values():
        folders = [Path(r["run_dir"]) for r in runs if r["metric"] == "top1" and Path(r["run_dir"]).is_dir()]
        if not folders:
            continue
        written += [write_card(r["run_dir"]) for r in runs if r["run_dir"] and r["finished"]
                    and Path(r["run_dir"]).is_dir() and not (Path(r["run_dir"]) / CARD).is_file()]
        shared = Path(os.path.commonpath([str(f.absolute()) for f in folders]))
        shared = shared.parent if shared in {f.absolute() for f in folders} else shared
        card = write_group_card(Path(os.path.relpath(shared)) if not folders[0].is_absolute() else shared, folders)
        if card is not None:
            written.append(card)
    return written


def export_runs(groups: Dict[str, List[Dict]], path: str | Path) -> Path:
    """Write every run's record (experiment, best and last metric, curve) as one JSON file that
    :func:`collect` reads back in place of the run folders."""
    runs = [record for records in groups.values() for record in records]
    Path(path).write_text(json.dumps({"format": RESULTS_FORMAT, "runs": runs}, indent=1) + "\n")
    return Path(path)


def _read_results(path: Path) -> List[Dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable JSON results file ({err})") from None
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise DataError(f"{path} is not a results file of `deepkd summary --export` (format {RESULTS_FORMAT!r})")
    return data["runs"]


def collect(paths: Sequence[str | Path]) -> Dict[str, List[Dict]]:
    """The runs at or below ``paths`` (run folders, folders holding runs, or ``--export`` JSON files),
    grouped by experiment (one configuration of a sweep)."""
    files = [Path(p) for p in paths if Path(p).is_file() and Path(p).suffix == ".json"]
    folders = [p for p in paths if Path(p) not in files]
    records = [r for f in files for r in _read_results(f)] + [_run_record(d) for d in
                                                               (find_runs(folders) if folders else [])]
    groups: Dict[str, List[Dict]] = {}
    for record in records:
        groups.setdefault(record["experiment"], []).append(record)
    return groups


def summary_rows(groups: Dict[str, List[Dict]], reach: Optional[float] = None) -> List[Dict]:
    """One row per experiment: runs, best and last metric (mean, std, 95% CI half-width), epochs to ``reach``."""
    rows = []
    for experiment, runs in groups.items():
        name = runs[0]["metric"]
        row = {"experiment": experiment, "runs": len(runs), "metric": name,
               "finished": sum(r["finished"] for r in runs),
               "epochs": max(r["epochs"] for r in runs),
               f"best_{name}": _mean_std([r[f"best_{name}"] for r in runs]),
               f"last_{name}": _mean_std([r[f"last_{name}"] for r in runs])}
        if reach is not None:
            row["reach"] = _reach(runs, reach)
        rows.append(row)
    return rows


def summarize(paths: Sequence[str | Path], reach: Optional[float] = None) -> List[Dict]:
    """:func:`summary_rows` of the runs at or below ``paths``."""
    return summary_rows(collect(paths), reach)


def compare(groups: Dict[str, List[Dict]], a: str, b: str, reach: Optional[float] = None) -> Dict:
    """Experiment ``a`` minus ``b``: best and last metric with 95% Welch intervals; with ``reach``,
    epochs to it and the speed-up of ``a`` (epochs of ``b`` / epochs of ``a``; > 1: ``a`` is faster)."""
    for name in (a, b):
        if name not in groups:
            near = closest(name, list(groups))
            hint = f"; did you mean {near[0]!r}?" if near else f" (experiments: {', '.join(sorted(groups))})"
            raise ConfigError(f"--compare: no experiment named {name!r}{hint}")
    metric = groups[a][0]["metric"]
    out = {"a": a, "b": b, "metric": metric}
    for which in ("best", "last"):
        key = f"{which}_{metric}"
        out[key] = welch_interval([r[key] for r in groups[a]], [r[key] for r in groups[b]])
    if reach is not None:
        ra, rb = _reach(groups[a], reach), _reach(groups[b], reach)
        out["reach"] = {"target": reach, a: ra, b: rb,
                        "speedup": rb["mean"] / ra["mean"] if ra["mean"] and rb["mean"] else None}
    return out


# -- text ---------------------------------------------------------------------------------------------
def _interval(stats: Dict) -> str:
    text = f"{stats['mean']:6.2f} +- {stats['std']:4.2f}"
    if stats["ci95"] is None:
        return f"{text} {'':<17}"
    return f"{text} [{stats['mean'] - stats['ci95']:6.2f}, {stats['mean'] + stats['ci95']:6.2f}]"


def format_summary(rows: List[Dict]) -> str:
    """A fixed-width table: mean +- sample std over seeds (0 for one run) [95% CI of the mean]."""
    width = max([len("experiment")] + [len(r["experiment"]) for r in rows])
    reach = next((r["reach"]["target"] for r in rows if "reach" in r), None)
    head = f"{'experiment':<{width}}  runs  epochs  {'best [95% CI]':<37}  {'last [95% CI]':<37}  metric"
    lines = [head + (f"  epochs to {reach:g}" if reach is not None else "")]
    for r in rows:
        best, last = r["best_" + r["metric"]], r["last_" + r["metric"]]
        label = dict(m[1:] for m in METRICS)[r["metric"]]
        line = (f"{r['experiment']:<{width}}  {r['runs']:>4}  {r['epochs']:>6}  {_interval(best)}  "
                f"{_interval(last)}  {label:<6}")
        if "reach" in r:
            got = r["reach"]
            line += f"  {got['mean']:.1f} +- {got['std']:.1f}" if got["reached"] else "  never"
            line += f" ({got['reached']}/{got['runs']} runs)"
        lines.append(line.rstrip())
    return "\n".join(lines)


def format_comparison(result: Dict) -> str:
    """``A - B`` per metric with its Welch interval, and the speed-up to the --reach target."""
    label = dict(m[1:] for m in METRICS)[result["metric"]]
    lines = []
    for which in ("best", "last"):
        got = result[f"{which}_{result['metric']}"]
        df = f"Welch df {got['df']:.1f}" if got["df"] is not None else "no spread"
        lines.append(f"{result['a']} - {result['b']} ({which} {label}): {got['diff']:+.2f} "
                     f"[95% CI {got['low']:+.2f}, {got['high']:+.2f}], {df}")
    if "reach" in result:
        got = result["reach"]
        if got["speedup"] is None:
            lines.append(f"{label} {got['target']:g}: not reached by every configuration's runs; no speed-up")
        else:
            lines.append(f"{label} {got['target']:g}: {result['a']} in {got[result['a']]['mean']:.1f} epochs, "
                         f"{result['b']} in {got[result['b']]['mean']:.1f}: {got['speedup']:.2f}x as fast")
    return "\n".join(lines)
