"""The engine under detection (issue 19): a detection run stopped by SIGTERM mid-epoch resumes to the
weights of an uninterrupted run, a changed training key is refused by name, its checkpoints hold the
config and the provenance, TensorBoard gets its scalars; and the README's "Add a task" code runs."""
import json
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from deepkd.engine import TASKS
from deepkd.engine.checkpoint import load_checkpoint
from deepkd.errors import ConfigError
from deepkd.train.config_errors import validate_config
from deepkd.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every process: the same float sums
STEPS_PER_EPOCH = 4


def detection_recipe(tmp_path: Path, **train_keys) -> dict:
    """The smallest synthetic detection run of tests/test_detection_train.py: 8 train / 4 val images of
    128 px, batch 2 (4 steps an epoch), 2 epochs, tiny Faster R-CNN without a teacher."""
    return {"experiment": "det", "seed": 0, "output_dir": str(tmp_path / "runs"),
            "data": {"dataset": "synthetic_coco", "root": str(tmp_path.parent / "data"), "batch_size": 2,
                     "eval_batch_size": 4, "min_size": [128], "max_size": 128,
                     "synthetic": {"num_train": 8, "num_val": 4}},
            "student": {"name": "tiny_fasterrcnn"}, "method": {"name": "ce"},
            "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4},
            "schedule": {"name": "multistep_iter", "epochs": 2, "milestones": [6], "warmup_iterations": 3},
            "train": {"device": "cpu", "progress": "none", **train_keys}}


def _start(recipe: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deepkd.cli", "train", str(recipe), *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _write(folder: Path, **train_keys) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(detection_recipe(folder, **train_keys)))
    return path


def test_detection_stopped_by_sigterm_mid_epoch_resumes_to_the_same_weights(tmp_path):
    whole = _start(_write(tmp_path / "whole"))
    recipe = _write(tmp_path / "cut", progress="lines", log_every=1)
    cut = _start(recipe)
    lines = []
    for line in cut.stdout:  # "epoch 1/2 [2/4] loss=...": the second step is done
        lines.append(line)
        if line.startswith("epoch 1/2 [2/4]"):
            cut.send_signal(signal.SIGTERM)
    assert cut.wait(timeout=120) == 0, "".join(lines)
    stopped = json.loads(lines[-1])
    assert stopped["status"] == "stopped" and stopped["reason"] == "SIGTERM", stopped
    assert 2 <= stopped["step"] < STEPS_PER_EPOCH  # mid-epoch 1
    middle = load_checkpoint(Path(stopped["run_dir"]) / "last.pt")
    assert (middle["epoch"], middle["batch"]) == (1, stopped["step"]) and middle["meters"]
    resumed = _start(recipe, "--resume", "train.progress=none")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and json.loads(output.strip().splitlines()[-1])["status"] == "finished", output
    assert whole.wait(timeout=300) == 0, whole.stdout.read()
    a = load_checkpoint(tmp_path / "whole" / "runs" / "det" / "seed0" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "runs" / "det" / "seed0" / "last.pt")
    assert a["step"] == b["step"] == 2 * STEPS_PER_EPOCH
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
    strip = lambda path: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                          for x in path.read_text().splitlines()]
    assert strip(tmp_path / "cut" / "runs" / "det" / "seed0" / "metrics.jsonl") == \
        strip(tmp_path / "whole" / "runs" / "det" / "seed0" / "metrics.jsonl")


@pytest.fixture(scope="module")
def stopped_detection(tmp_path_factory):
    """A detection run stopped after 3 steps (mid-epoch 1), in process."""
    tmp = tmp_path_factory.mktemp("stopped") / "run"
    cfg = validate_config(detection_recipe(tmp, stop_after_steps=3))
    summary = train(cfg)
    assert summary["status"] == "stopped" and summary["step"] == 3
    return tmp, Path(summary["run_dir"])


def test_detection_resume_with_a_changed_training_key_is_refused_by_name(stopped_detection):
    tmp, run_dir = stopped_detection
    before = (run_dir / "last.pt").read_bytes()
    changed = detection_recipe(tmp)
    changed["optimizer"]["lr"] = 0.05
    with pytest.raises(ConfigError, match=r"optimizer\.lr 0\.02 -> 0\.05"):
        train(validate_config(changed), resume=True)
    assert (run_dir / "last.pt").read_bytes() == before


def test_detection_checkpoint_holds_its_config_and_provenance(stopped_detection):
    tmp, run_dir = stopped_detection
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["task"] == "detection" and ckpt["step"] == 3
    assert ckpt["config"]["data"]["dataset"] == "synthetic_coco" and ckpt["config"]["optimizer"]["lr"] == 0.02
    assert validate_config(ckpt["config"]).task == "detection"
    assert {"version", "commit"} <= set(ckpt["provenance"])


class _SummaryWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard need not be installed)."""

    scalars: list = []

    def __init__(self, log_dir):
        self.log_dir = log_dir

    def add_scalar(self, key, value, step):
        self.scalars.append((key, value, step))

    def close(self):
        pass


def test_detection_writes_tensorboard_scalars_when_asked(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_SummaryWriter))
    _SummaryWriter.scalars = []
    cfg = validate_config({**detection_recipe(tmp_path, tensorboard="on"),
                           "schedule": {"name": "multistep_iter", "epochs": 1, "warmup_iterations": 3}})
    assert train(cfg)["status"] == "finished"
    keys = {key for key, _, step in _SummaryWriter.scalars if step == 1}
    assert {"AP", "AP50", "train_loss", "train_loss/loss_box_reg", "lr"} <= keys, keys


def add_a_task_code() -> str:
    """The Python block of README.md's "Add a task" section."""
    section = re.search(r"## Add a task\n(.*?)(?=\n## |\Z)", (ROOT / "README.md").read_text(), re.S)
    assert section, "README.md has no 'Add a task' section"
    return re.search(r"```python\n(.*?)```", section.group(1), re.S).group(1)


def test_add_a_task_runs_as_written_and_resumes(tmp_path, monkeypatch, capsys):
    code = add_a_task_code()
    assert len(code.strip().splitlines()) <= 60
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, "ADD_A_TASK", "exec"), {"__name__": "add_a_task"})
        first = json.loads((tmp_path / "runs" / "regression" / "summary.json").read_text())
        assert first["status"] == "finished" and first["steps"] == 3 * 8 and first["best_r2"] > 0.9
        records = [json.loads(x) for x in (tmp_path / "runs" / "regression" / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [1, 2, 3] and "train_loss/distill" in records[0]
        assert load_checkpoint(tmp_path / "runs" / "regression" / "last.pt")["task"] == "regression"
    finally:
        TASKS._builders.pop("regression", None)
        TASKS._info.pop("regression", None)
    assert "regression" not in TASKS
