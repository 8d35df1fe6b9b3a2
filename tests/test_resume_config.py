"""--resume continues the run stored in last.pt: only how the run is watched may change, anything else
stops with one sentence and touches nothing; runs record the code that ran them (provenance)."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import deepkd
from deepkd import provenance as provenance_module
from deepkd.cli import main
from deepkd.engine.checkpoint import load_checkpoint
from deepkd.provenance import provenance
from deepkd.train.config import WATCH_KEYS, ConfigError, check_resume, config_to_dict, load_config
from deepkd.train.config_errors import validate_config
from deepkd.train.runner import run_recipe

TINY = {
    "experiment": "resume", "seed": 1,
    "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64,
             "synthetic": {"num_train": 128, "num_test": 64}},
    "student": {"name": "cnn_w4"},
    "method": {"name": "ce"},
    "schedule": {"name": "step", "epochs": 2, "milestones": [2]},
    "train": {"progress": "none", "tensorboard": "off"},
}


def _config(**changes):
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    for key, value in changes.items():
        section, _, name = key.partition("__")
        raw.setdefault(section, {})[name] = value
    return validate_config(raw)


def test_watched_keys_may_change():
    stored = config_to_dict(_config())
    watched = _config(train__progress="lines", train__log_every=1, train__tensorboard="on", train__wandb=True,
                      train__wandb_project="other", train__stop_after_steps=5, train__checkpoint_every=10)
    check_resume(stored, watched, "last.pt")
    assert {f"train.{k}" for k in ("progress", "log_every", "stop_after_steps", "checkpoint_every")} <= set(WATCH_KEYS)


def test_every_other_change_is_named_with_both_values():
    stored = config_to_dict(_config())
    changed = _config(optimizer__lr=0.1, schedule__epochs=3, train__progress="lines")
    with pytest.raises(ConfigError) as caught:
        check_resume(stored, changed, "runs/resume/seed1/last.pt")
    message = str(caught.value)
    assert "optimizer.lr 0.05 -> 0.1" in message and "schedule.epochs 2 -> 3" in message
    assert "runs/resume/seed1/last.pt" in message and "train.progress" not in message.split(" (only")[0]
    assert "\n" not in message and message.count(". ") == 0  # one sentence


def test_a_switched_choice_lists_the_keys_of_both_sides():
    stored = config_to_dict(_config())
    switched = validate_config({**TINY, "optimizer": {"name": "decoupled"}})
    with pytest.raises(ConfigError) as caught:
        check_resume(stored, switched, "last.pt")
    message = str(caught.value)
    assert "optimizer.name 'sgd' -> 'decoupled'" in message and "optimizer.momentum 0.9 -> (unset)" in message
    assert "optimizer.stream_momentum.non_target (unset) -> 0.95" in message


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def stopped_run(tmp_path):
    """A run stopped after 3 of its 8 steps: (recipe path, run folder)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "runs")}))
    assert main(["train", str(recipe), "train.stop_after_steps=3"]) == 0
    run_dir = tmp_path / "runs" / "resume" / "seed1"
    assert load_checkpoint(run_dir / "last.pt")["step"] == 3
    return recipe, run_dir


def test_refused_resume_touches_nothing(stopped_run, capsys):
    recipe, run_dir = stopped_run
    before = _snapshot(run_dir)
    capsys.readouterr()
    assert main(["train", str(recipe), "--resume", "optimizer.lr=0.1", "train.stop_after_steps=3"]) == 2
    assert main(["train", str(run_dir), "--resume", "seed=2", "method.name=kd"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("deepkd: error: --resume would change the run") for e in errors)
    assert "optimizer.lr 0.05 -> 0.1" in errors[0] and "stop_after_steps" not in errors[0].split(" (only")[0]
    assert "seed 1 -> 2" in errors[1] and "method.name 'ce' -> 'kd'" in errors[1]
    assert _snapshot(run_dir) == before


def test_resume_with_watched_changes_finishes(stopped_run):
    recipe, run_dir = stopped_run
    assert main(["train", str(recipe), "--resume", "train.stop_after_steps=4", "train.log_every=1"]) == 0
    assert load_checkpoint(run_dir / "last.pt")["step"] == 4
    assert main(["train", str(run_dir), "--resume", "train.stop_after_steps=0", "train.progress=lines"]) == 0
    assert load_checkpoint(run_dir / "last.pt")["step"] == 8



def test_run_recipe_is_deepkd_train_without_the_command_line(stopped_run):
    recipe, run_dir = stopped_run
    with pytest.raises(ConfigError, match=f"{re.escape(repr(str(run_dir)))} is a run folder: add --resume"):
        run_recipe(run_dir)
    with pytest.raises(ConfigError, match="--resume would change the run .*optimizer.lr 0.05 -> 0.1"):
        run_recipe(recipe, ["optimizer.lr=0.1"], resume=True)
    summary = run_recipe(run_dir, ["train.stop_after_steps=0"], resume=True)
    assert summary["status"] == "finished" and load_checkpoint(run_dir / "last.pt")["step"] == 8
    assert summary == json.loads((run_dir / "summary.json").read_text())

def test_config_yaml_records_the_code_and_stays_a_recipe(stopped_run):
    _, run_dir = stopped_run
    text = (run_dir / "config.yaml").read_text()
    header = dict(line[2:].split(": ", 1) for line in text.splitlines() if line.startswith("# "))
    assert header["version"] == deepkd.__version__ and header["commit"] == str(provenance()["commit"])
    assert load_config(run_dir / "config.yaml").train.stop_after_steps == 3  # a recipe that re-runs the run


def test_checkpoints_record_the_code_and_resume_keeps_config_yaml(stopped_run):
    recipe, run_dir = stopped_run
    assert load_checkpoint(run_dir / "last.pt")["provenance"] == provenance()
    written = (run_dir / "config.yaml").read_bytes()
    assert main(["train", str(recipe), "--resume", "train.stop_after_steps=0"]) == 0
    assert (run_dir / "config.yaml").read_bytes() == written


@pytest.fixture
def fresh_provenance():
    provenance_module._provenance.cache_clear()
    yield
    provenance_module._provenance.cache_clear()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_provenance_of_this_checkout(fresh_provenance):
    found = provenance()
    assert found["version"] == deepkd.__version__
    if found["commit"] != "unknown":  # a git checkout (the source tree of this test)
        assert re.fullmatch(r"[0-9a-f]{40}", found["commit"]) and isinstance(found["dirty"], bool)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_provenance_is_unknown_outside_a_deepkd_checkout(tmp_path, monkeypatch, fresh_provenance):
    package = tmp_path / "site-packages" / "deepkd"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.setattr(deepkd, "__file__", str(package / "__init__.py"))
    assert provenance() == {"version": deepkd.__version__, "commit": "unknown", "dirty": "unknown"}
    provenance_module._provenance.cache_clear()
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)  # another project's repository
    assert provenance()["commit"] == "unknown"
    provenance_module._provenance.cache_clear()
    monkeypatch.setenv("PATH", "")  # no git at all
    assert provenance()["dirty"] == "unknown"
