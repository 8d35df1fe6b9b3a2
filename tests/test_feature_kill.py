"""The feature methods that carry state of their own (CRD's memory banks, ReviewKD's and OFD's connectors,
OFD's training-mode teacher statistics) killed with SIGKILL in a real ``deepkd train`` process and resumed
with ``--resume``: the run ends bit-identical to an uninterrupted one, method state included. (Every
method's 2-epoch stop-and-resume through ``train()`` is in its own test file; this is the kill.)"""
import signal

import pytest
import torch
import yaml

from deepkd.engine.checkpoint import load_checkpoint
from tests.conftest import trained_teacher
from tests.test_preemption import STEPS_PER_EPOCH, Training

EPOCHS = 2
METHODS = {"crd": {"name": "crd", "nce_k": 64}, "reviewkd": {"name": "reviewkd", "warmup_epochs": 1},
           "ofd": {"name": "ofd"}}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return trained_teacher(tmp_path_factory.mktemp("teacher"))


def _recipe(folder, teacher, method):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "experiment": "kill", "seed": 3, "output_dir": str(folder / "runs"),
        "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64,
                 "synthetic": {"num_train": 32 * STEPS_PER_EPOCH, "num_test": 64}},
        "student": {"name": "cnn_w4"}, "teacher": {"name": "cnn_w4", "weights": teacher}, "method": method,
        "optimizer": {"name": "sgd", "lr": 0.05}, "schedule": {"name": "step", "epochs": EPOCHS, "milestones": [1]},
        "train": {"progress": "lines", "log_every": 1, "tensorboard": "off", "checkpoint_every": 4}}))
    return path, folder / "runs" / "kill" / "seed3"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_killed_feature_run_resumes_bit_identical(tmp_path, teacher, name):
    recipe, reference = _recipe(tmp_path / "whole", teacher, METHODS[name])
    whole = Training(str(recipe))
    assert whole.finish() == 0, whole.output[-2000:]
    recipe, run_dir = _recipe(tmp_path / "killed", teacher, METHODS[name])
    killed = Training(str(recipe))
    killed.wait_for_step(STEPS_PER_EPOCH + 7)  # in the second epoch, past a periodic checkpoint
    killed.process.send_signal(signal.SIGKILL)
    assert killed.finish() == -signal.SIGKILL
    saved = load_checkpoint(run_dir / "last.pt")["step"]
    assert 0 < saved < EPOCHS * STEPS_PER_EPOCH  # killed mid-run: the resume starts from a periodic save
    resumed = Training(str(recipe), "--resume")
    assert resumed.finish() == 0, resumed.output[-2000:]
    assert (run_dir / "student.safetensors").read_bytes() == (reference / "student.safetensors").read_bytes()
    a, b = load_checkpoint(run_dir / "last.pt"), load_checkpoint(reference / "last.pt")
    assert a["method"] and set(a["method"]) == set(b["method"])  # the connectors / memory banks are saved
    for part in ("model", "method", *(("teacher_buffers",) if "teacher_buffers" in b else ())):
        for key, value in b[part].items():
            assert torch.equal(a[part][key], value), (part, key)
    assert ("teacher_buffers" in b) == (name == "ofd")  # OFD's teacher runs in training mode by default
