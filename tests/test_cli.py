"""The ``deepkd`` command end to end, and 2-process data parallelism (gloo, CPU)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from deepkd.cli import main
from deepkd.engine.checkpoint import load_checkpoint

RECIPE = {
    "experiment": "cli", "seed": 1,
    "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64,
             "synthetic": {"num_train": 128, "num_test": 64}},
    "student": {"name": "cnn_w4"},
    "method": {"name": "ce"},
    "schedule": {"name": "step", "epochs": 2, "milestones": [2]},
    "train": {"progress": "lines", "log_every": 2, "tensorboard": "off"},
}


def write_recipe(tmp_path, name="recipe.yaml", **changes):
    recipe = {**RECIPE, "output_dir": str(tmp_path / "runs"), **changes}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_train_plot_summary(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    assert main(["train", str(recipe)]) == 0
    assert main(["train", str(recipe), "seed=2"]) == 0
    out = capsys.readouterr().out
    assert "epoch 2:" in out and "test_top1" in out and "[4/4]" in out
    run_dir = tmp_path / "runs" / "cli" / "seed1"
    assert main(["plot", str(run_dir.parent)]) == 0  # two seeds: the figure lands in their common parent
    assert (run_dir.parent / "curves.png").stat().st_size > 10_000
    assert main(["summary", str(tmp_path / "runs"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rows[0]["runs"] == 2 and rows[0]["best_top1"]["std"] >= 0
    assert main(["summary", str(tmp_path / "runs")]) == 0
    assert "+-" in capsys.readouterr().out


def test_clear_errors(tmp_path, capsys):
    assert main(["train", str(write_recipe(tmp_path, student={"name": "resnet8y4"}))]) == 2
    assert main(["train", str(write_recipe(tmp_path, data={**RECIPE["data"], "batch_sise": 3}))]) == 2
    assert main(["train", str(write_recipe(tmp_path, data={"dataset": "cifar100", "root": str(tmp_path / "no"),
                                                             "download": False}))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("deepkd: error: ") for line in err)
    assert "resnet8x4" in err[0] and "data.batch_size" in err[1] and str(tmp_path / "no") in err[2]


def test_resume_from_run_dir(tmp_path):
    recipe = write_recipe(tmp_path, train={**RECIPE["train"], "stop_after_steps": 3})
    assert main(["train", str(recipe)]) == 0
    run_dir = tmp_path / "runs" / "cli" / "seed1"
    assert load_checkpoint(run_dir / "last.pt")["step"] == 3
    assert main(["train", str(run_dir), "--resume", "train.stop_after_steps=0"]) == 0
    assert load_checkpoint(run_dir / "last.pt")["step"] == 8


def test_shipped_recipes_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["list", "recipes", "resnet32x4-resnet8x4"]) == 0
    listed = capsys.readouterr().out.split()
    assert "cifar100/resnet32x4-resnet8x4/dkd" in listed and all(not n.endswith(".yaml") for n in listed)
    missing = tmp_path / "no_data"  # the recipe is found; training stops at its (absent) data
    assert main(["train", "cifar100/resnet32x4-resnet8x4/dkd", f"output_dir={tmp_path / 'runs'}",
                 f"data.root={missing}", "data.download=false"]) == 2
    assert main(["train", "cifar100/resnet32x4-resnet8x4/dkdd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert str(missing) in err[0] and "did you mean 'cifar100/resnet32x4-resnet8x4/dkd'" in err[1]


def test_list_models_and_methods(capsys):
    assert main(["list", "models", "cnn_w*"]) == 0
    assert "cnn_w8" in capsys.readouterr().out
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "deepkd_dkd" in out and "reviewkd     Chen et al." in out
    assert all(f"\n{name} " in out for name in ("dot", "logit_stand", "a+b"))  # the settings, with papers
    assert "ICCV 2023" in out and "CVPR 2024" in out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("method, optimizer", [("ce", "sgd"), ("dkd", "decoupled")])
def test_two_process_ddp_equals_one_process(tmp_path, method, optimizer):
    teacher_recipe = write_recipe(tmp_path, "teacher.yaml", experiment="teacher", student={"name": "cnn_w8_plain"},
                                  schedule={"name": "step", "epochs": 1, "milestones": []})
    assert main(["train", str(teacher_recipe)]) == 0
    teacher = str(tmp_path / "runs" / "teacher" / "seed1" / "best.pt")
    changes = dict(student={"name": "cnn_w8_plain"}, method={"name": method, "warmup_epochs": 1}
                   if method != "ce" else {"name": "ce"}, optimizer={"name": optimizer, "lr": 0.05},
                   teacher={"name": "cnn_w8_plain", "weights": teacher} if method != "ce" else None)
    single = write_recipe(tmp_path, "single.yaml", experiment="single", **changes)
    double = write_recipe(tmp_path, "double.yaml", experiment="double", **changes)
    assert main(["train", str(single)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={_free_port()}", "-m", "deepkd.cli", "train", str(double)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_checkpoint(tmp_path / "runs" / "single" / "seed1" / "last.pt")
    b = load_checkpoint(tmp_path / "runs" / "double" / "seed1" / "last.pt")
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5)
    runs = tmp_path / "runs"
    rec_a = [json.loads(x) for x in (runs / "single" / "seed1" / "metrics.jsonl").read_text().splitlines()]
    rec_b = [json.loads(x) for x in (runs / "double" / "seed1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_top1"] for r in rec_a] == [r["test_top1"] for r in rec_b]
    assert pytest.approx([r["train_loss"] for r in rec_a], rel=1e-4) == [r["train_loss"] for r in rec_b]


def test_two_process_batchnorm_logged_accuracy_is_the_saved_students(tmp_path, capsys):
    """Each rank's BatchNorm sees its half of every batch; the statistics are averaged before each test
    and save, so the last logged test top-1 is what `deepkd eval` of student.safetensors measures."""
    recipe = write_recipe(tmp_path, experiment="bn", student={"name": "cnn_w8"},
                          data={**RECIPE["data"], "synthetic": {"num_train": 256, "num_test": 200}})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={_free_port()}", "-m", "deepkd.cli", "train", str(recipe)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "bn" / "seed1"
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["test_top1"]
    assert main(["eval", str(recipe), str(run / "student.safetensors")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["top1"] == logged
    saved = load_checkpoint(run / "last.pt")["model"]
    assert any(k.endswith("running_mean") for k in saved)


def test_demo_quick_json(tmp_path, capsys):
    assert main(["demo", "--quick", "--json", "--data", "synthetic", "--out", str(tmp_path / "demo")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("deepkd demo: distilling on the shipped synthetic set")
    assert "--data synthetic" in lines[0]
    result = json.loads(lines[-1])
    assert set(result) == {"teacher", "student alone", "DKD", "DeepKD+DKD", "seconds"}
    assert (tmp_path / "demo" / "deepkd_dkd_ref" / "seed3" / "train.log").is_file()  # the students ran as a sweep
    assert all(0.0 <= result[k] <= 100.0 for k in result if k != "seconds")
    assert (tmp_path / "demo" / "comparison.png").is_file()


def test_demo_detection_quick_json(tmp_path, capsys):
    assert main(["demo", "detection", "--quick", "--json", "--out", str(tmp_path / "demo")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(result) == ["teacher", "student alone", "DKD", "DeepKD+DKD", "seconds"]
    assert all(0.0 <= result[k] <= 100.0 for k in result if k != "seconds")
    assert (tmp_path / "demo" / "comparison.png").is_file() and (tmp_path / "demo" / "dkd" / "metrics.jsonl").is_file()


def test_ctrl_c_saves_and_resumes(tmp_path):
    import signal

    recipe = write_recipe(tmp_path, data={**RECIPE["data"], "synthetic": {"num_train": 4096, "num_test": 64}},
                          schedule={"name": "step", "epochs": 1, "milestones": []},
                          train={"progress": "lines", "log_every": 1, "tensorboard": "off"})
    process = subprocess.Popen([sys.executable, "-m", "deepkd.cli", "train", str(recipe)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in process.stdout:
        if "[3/128]" in line:
            process.send_signal(signal.SIGINT)
            break
    output = process.stdout.read()
    assert process.wait(timeout=120) == 0, output
    assert "stopped at step" in output
    run_dir = tmp_path / "runs" / "cli" / "seed1"
    stopped = load_checkpoint(run_dir / "last.pt")
    assert 3 <= stopped["batch"] < 128 and stopped["epoch"] == 1
    assert main(["train", str(recipe), "--resume", "train.progress=none"]) == 0
    assert load_checkpoint(run_dir / "last.pt")["step"] == 128
