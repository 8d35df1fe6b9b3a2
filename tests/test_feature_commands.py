"""The new methods in the commands a user runs on them: ``deepkd sweep`` over feature, combined, CTKD and
logit-standardised methods, then ``deepkd summary`` (mean and std over seeds, the per-term losses) and
``deepkd plot`` (one colour per configuration) read them like any other run."""
from __future__ import annotations

import json

import yaml

from deepkd.cli import main
from tests.conftest import trained_teacher

METHODS = {"fitnet": {"name": "fitnet", "hint_layer": 1}, "crd": {"name": "crd", "nce_k": 32},
           "dkd_reviewkd": {"name": "dkd+reviewkd", "dkd": {"warmup_epochs": 1}},
           "ctkd": {"name": "ctkd"}, "kd_stand": {"name": "kd", "logit_stand": True, "temperature": 2.0}}


def test_sweep_summary_and_plot_treat_the_new_methods_like_the_old(tmp_path, capsys):
    teacher = trained_teacher(tmp_path / "teacher")
    recipes = []
    for name, method in METHODS.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "experiment": name, "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64,
                                         "synthetic": {"num_train": 160, "num_test": 64}},
            "student": {"name": "cnn_w4"}, "teacher": {"name": "cnn_w4", "weights": teacher}, "method": method,
            "optimizer": {"name": "sgd", "lr": 0.05}, "schedule": {"name": "step", "epochs": 1, "milestones": [1]},
            "train": {"progress": "none", "tensorboard": "off"}}))
        recipes.append(str(path))
    out = tmp_path / "sweep"
    assert main(["sweep", *recipes, "--seeds", "0-1", "--jobs", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["summary", str(out), "--json"]) == 0
    rows = {row["experiment"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(METHODS) and all(row["finished"] == 2 for row in rows.values())
    assert all(row["best_top1"]["std"] >= 0 for row in rows.values())
    terms = json.loads((out / "dkd_reviewkd" / "seed0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_loss/ce", "train_loss/tckd", "train_loss/nckd", "train_loss/reviewkd"} <= set(terms)
    assert main(["plot", *(str(p) for p in sorted(out.glob("*/seed*"))), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "curves.png").stat().st_size > 10_000
