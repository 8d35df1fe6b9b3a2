"""``deepkd sweep`` end to end (local processes, submitit's local executor, a killed and resumed sweep)
and the sweep statistics of ``deepkd summary`` (t quantiles, 95% intervals, Welch, --reach, --figure)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from deepkd.cli import main
from deepkd.commands.summary import t_quantile, welch_interval
from deepkd.commands.sweep import sweep_folder

RECIPE = {
    "experiment": "unused", "seed": 0,
    "data": {"dataset": "synthetic", "batch_size": 64, "eval_batch_size": 128,
             "synthetic": {"num_train": 256, "num_test": 128}},
    "student": {"name": "cnn_w4"},
    "method": {"name": "ce"},
    "optimizer": {"name": "sgd", "lr": 0.05},
    "schedule": {"name": "step", "epochs": 1, "milestones": [1]},
    "train": {"progress": "none", "tensorboard": "off"},
}


def write_recipe(folder, **changes):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, **changes}))
    return path


def finished(run_dir):
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text())["status"] == "finished"


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A 2 (learning rates) x 2 (seeds) sweep, two runs at once; returns its folder."""
    root = tmp_path_factory.mktemp("grid")
    out = root / "sweep"
    argv = ["sweep", str(write_recipe(root)), "--seeds", "0-1", "--set", "optimizer.lr=0.05,0.1", "--jobs", "2",
            "--out", str(out), "data.synthetic.seed=1"]
    assert main(argv) == 0
    return out, argv


CONFIGS = ("tiny__optimizer.lr=0.05", "tiny__optimizer.lr=0.1")


def test_grid_runs_manifest_and_summary(grid, capsys):
    out, _ = grid
    folders = sorted(p.relative_to(out).as_posix() for p in out.glob("*/seed*"))
    assert folders == [f"{c}/seed{s}" for c in CONFIGS for s in (0, 1)]
    assert all(finished(out / f) for f in folders)
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # --jobs 2: each run its share of the cores
    assert {json.loads((out / f / "summary.json").read_text())["torch_threads"] for f in folders} == {threads}
    for config, lr in zip(CONFIGS, (0.05, 0.1)):  # each folder trained its own configuration
        stored = yaml.safe_load((out / config / "seed1" / "config.yaml").read_text())
        assert stored["optimizer"]["lr"] == lr and stored["experiment"] == config and stored["seed"] == 1
        assert stored["data"]["synthetic"]["seed"] == 1
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["set"] == {"optimizer.lr": ["0.05", "0.1"]} and manifest["seeds"] == [0, 1]
    assert sorted(r["folder"] for r in manifest["runs"]) == folders
    capsys.readouterr()
    assert main(["summary", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["experiment"] for r in rows) == list(CONFIGS)
    assert all(r["runs"] == 2 and r["finished"] == 2 for r in rows)
    best = rows[0]["best_top1"]
    assert best["ci95"] == pytest.approx(t_quantile(0.975, 1) * best["std"] / math.sqrt(2))
    for config in CONFIGS:  # the sweep wrote a model card per configuration, over its two seeds
        card = (out / config / "README.md").read_text()
        assert card.startswith("---\n") and "(n=2)" in card and "seeds 0, 1" in card


def test_rerun_skips_finished_runs(grid, capsys):
    out, argv = grid
    watched = [p for p in out.glob("*/seed*/*") if p.name in ("last.pt", "summary.json", "metrics.jsonl", "train.log")]
    assert len(watched) == 16
    before = {p: p.stat().st_mtime_ns for p in watched}
    capsys.readouterr()
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in watched} == before  # nothing retrained, no process started
    assert capsys.readouterr().out.count("finished") == 4
    assert main([*argv, "--dry-run"]) == 0
    assert capsys.readouterr().out.count("skip (finished)") == 4


def test_killed_sweep_resumes(tmp_path):
    out = tmp_path / "sweep"
    # 30 short epochs: the SIGTERM sent once epoch 1 is saved lands well before the run's end
    argv = ["sweep", str(write_recipe(tmp_path)), "--seeds", "0-1", "--out", str(out), "schedule.epochs=30",
            "schedule.milestones=[30]", "data.synthetic.num_train=128"]
    sweep = subprocess.Popen([sys.executable, "-m", "deepkd.cli", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    first, second = out / "tiny" / "seed0", out / "tiny" / "seed1"
    started = time.time()
    while not (first / "last.pt").is_file() and sweep.poll() is None and time.time() - started < 300:
        time.sleep(0.05)
    sweep.send_signal(signal.SIGTERM)  # forwarded to the run, which saves last.pt and stops
    output, _ = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, output
    assert "stopped" in output and not finished(first) and (first / "last.pt").is_file()
    assert not second.exists()  # queued, never started
    kept = (first / "metrics.jsonl").read_text().splitlines()
    assert 1 <= len(kept) < 30
    assert main([*argv, "--jobs", "2"]) == 0  # the resumed run and the fresh one side by side
    assert finished(first) and finished(second)
    records = (first / "metrics.jsonl").read_text().splitlines()
    assert records[:len(kept)] == kept and [json.loads(r)["epoch"] for r in records] == list(range(1, 31))


def test_submitit_local_executor(tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", str(write_recipe(tmp_path)), "--seeds", "0,3", "--jobs", "2", "--executor",
                 "submitit-local", "--out", str(out), "--timeout-min", "10"]) == 0
    assert finished(out / "tiny" / "seed0") and finished(out / "tiny" / "seed3")
    assert len(list((out / "submitit").glob("*_result.pkl"))) == 2


def test_user_errors_are_one_line(tmp_path, capsys):
    recipe = str(write_recipe(tmp_path))
    out = ["--out", str(tmp_path / "sweep")]
    assert main(["sweep", recipe, "--seeds", "0-x", *out]) == 2
    assert main(["sweep", recipe, "--set", "optimizer.lrr=0.1,0.2", *out]) == 2
    assert main(["sweep", recipe, "--set", "seed=1,2", *out]) == 2
    assert main(["sweep", recipe, "--set", "optimizer.lr=0.1,,0.2", *out]) == 2
    assert main(["sweep", "optimizer.lr=0.1", *out]) == 2
    assert main(["sweep", recipe, "--jobs", "0", *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and all(line.startswith("deepkd: error: ") for line in err)
    assert "--seeds '0-x'" in err[0] and "did you mean 'optimizer.lr'" in err[1] and "--seeds" in err[2]
    assert "at least one recipe" in err[4] and "--jobs" in err[5]
    assert not (tmp_path / "sweep").exists()
    runs = write_fake_runs(tmp_path / "fake")
    assert main(["summary", str(runs), "--compare", "fast", "slwo"]) == 2
    assert "did you mean 'slow'" in capsys.readouterr().err


def test_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", str(write_recipe(tmp_path)), "--seeds", "0-2", "--set", "method.name=ce", "--set",
                 "schedule.milestones=[1],[2,3]", "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and not out.exists()
    assert lines[0].startswith("tiny__method.name=ce__schedule.milestones=_1_/seed0: deepkd train ")
    assert "schedule.milestones=[2,3]" in lines[3]



def test_out_defaults_to_the_recipes_output_dir(tmp_path, capsys):
    shared = tmp_path / "shared"
    recipe = write_recipe(tmp_path / "a", output_dir=str(shared))
    other = write_recipe(tmp_path / "b", output_dir=str(shared))
    other = other.rename(other.with_name("other.yaml"))
    assert main(["sweep", str(recipe), str(other), "--seeds", "0", "--dry-run"]) == 0
    assert main(["sweep", str(recipe), "--seeds", "0"]) == 0
    assert finished(shared / "sweep" / "tiny" / "seed0") and (shared / "sweep" / "sweep.json").is_file()
    assert sweep_folder([str(write_recipe(tmp_path / "c"))]) == Path("runs") / "sweep"  # output_dir's default


def test_recipes_with_different_output_dirs_need_out(tmp_path, capsys):
    first = write_recipe(tmp_path / "a", output_dir=str(tmp_path / "runs_a"))
    second = write_recipe(tmp_path / "b", output_dir=str(tmp_path / "runs_b"))
    second = second.rename(second.with_name("other.yaml"))
    capsys.readouterr()
    assert main(["sweep", str(first), str(second), "--seeds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepkd: error: the recipes disagree on output_dir")
    assert all(str(p) in err[0] for p in (first, second, tmp_path / "runs_a", tmp_path / "runs_b"))
    assert "--out" in err[0]
    assert not (tmp_path / "runs_a").exists() and not (tmp_path / "runs_b").exists()
    assert main(["sweep", str(first), str(second), "--seeds", "0", "--out", str(tmp_path / "s"), "--dry-run"]) == 0


# -- statistics ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("p, df, table", [(0.975, 1, 12.7062), (0.975, 4, 2.7764), (0.975, 10, 2.2281),
                                          (0.95, 30, 1.6973), (0.995, 3, 5.8409), (0.975, math.inf, 1.9600),
                                          (0.975, 1e6, 1.9600), (0.025, 4, -2.7764)])
def test_t_quantile_table(p, df, table):
    assert t_quantile(p, df) == pytest.approx(table, abs=1e-4)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for p in (0.6, 0.9, 0.975, 0.999):
        for df in (1, 2.5, 4.92, 17, 250):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_welch_interval_by_hand():
    a, b = [70.1, 71.3, 70.8], [68.2, 69.9, 68.7, 69.4]
    va, vb = 0.36333333 / 3, 0.56333333 / 4  # sample variances by hand, over n
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    got = welch_interval(a, b)
    assert got["diff"] == pytest.approx(70.733333 - 69.05, abs=1e-6)
    assert got["df"] == pytest.approx(df, rel=1e-6) and got["df"] == pytest.approx(4.9203, abs=1e-4)
    # t(0.975, 4.9203) = 2.58316 (Simpson integration of the t density, computed apart from deepkd)
    assert (got["low"], got["high"]) == pytest.approx((0.36126, 3.00541), abs=1e-4)
    with pytest.raises(ValueError, match="at least two runs"):
        welch_interval([1.0], [1.0, 2.0])


CURVES = {  # experiment -> per seed: test top-1 per epoch
    "fast": [[30, 52, 60, 61], [20, 40, 45, 55]],  # reaches 50 at epochs 2 and 4
    "slow": [[10, 20, 30, 50], [10, 20, 40, 45], [5, 10, 20, 30]],  # at 4; two never
}


def write_fake_runs(root):
    for experiment, curves in CURVES.items():
        for seed, curve in enumerate(curves):
            run_dir = root / experiment / f"seed{seed}"
            run_dir.mkdir(parents=True)
            records = [{"epoch": e + 1, "test_top1": v, "train_loss": 1.0} for e, v in enumerate(curve)]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            (run_dir / "summary.json").write_text(json.dumps({"status": "finished", "experiment": experiment}))
    return root


def test_reach_and_compare(tmp_path, capsys):
    runs = write_fake_runs(tmp_path)
    assert main(["summary", str(runs), "--reach", "50", "--compare", "fast", "slow", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["experiment"]: r for r in result["rows"]}
    fast, slow = rows["fast"]["reach"], rows["slow"]["reach"]
    assert (fast["reached"], fast["runs"], fast["mean"], fast["std"]) == (2, 2, 3.0, pytest.approx(math.sqrt(2)))
    assert (slow["reached"], slow["runs"], slow["mean"], slow["std"]) == (1, 3, 4.0, 0.0)
    assert rows["fast"]["best_top1"]["mean"] == 58.0 and rows["slow"]["last_top1"]["mean"] == pytest.approx(125 / 3)
    best = rows["slow"]["best_top1"]  # 50, 45, 30: std 10.408, t(0.975, 2) = 4.3027
    assert best["ci95"] == pytest.approx(4.302653 * statistics_std([50, 45, 30]) / math.sqrt(3), rel=1e-6)
    compared = result["compare"]
    assert compared["reach"]["speedup"] == pytest.approx(4.0 / 3.0)
    assert compared["best_top1"] == welch_interval([61, 55], [50, 45, 30])
    assert main(["summary", str(runs), "--reach", "50", "--compare", "fast", "slow"]) == 0
    text = capsys.readouterr().out
    assert "1.33x as fast" in text and "(1/3 runs)" in text and "[95% CI" in text
    assert main(["summary", str(runs), "--reach", "99"]) == 0
    assert "never (0/2 runs)" in capsys.readouterr().out


def statistics_std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_figure_png(tmp_path):
    runs = write_fake_runs(tmp_path / "runs")
    figure = tmp_path / "sweep.png"
    assert main(["summary", str(runs), "--figure", str(figure)]) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000


def test_export_reads_back_as_the_same_tables(tmp_path, capsys):
    """`deepkd summary --export FILE`: the per-run records a report commits; summary of FILE gives its tables."""
    runs = write_fake_runs(tmp_path / "runs")
    exported = tmp_path / "results.json"
    assert main(["summary", str(runs), "--compare", "fast", "slow", "--json", "--export", str(exported)]) == 0
    from_folders = capsys.readouterr().out
    assert main(["summary", str(exported), "--compare", "fast", "slow", "--json"]) == 0
    assert capsys.readouterr().out == from_folders
    assert len(json.loads(exported.read_text())["runs"]) == 5
    foreign = tmp_path / "other.json"
    foreign.write_text('{"rows": []}')
    assert main(["summary", str(foreign)]) == 2
    assert "not a results file of `deepkd summary --export`" in capsys.readouterr().err
