"""``deepkd train`` / ``deepkd eval`` of detection configs on the synthetic COCO-format set: the files
a run writes, best checkpoint by AP, exact resume, strict keys, and the shipped COCO recipes."""
import functools
import json

import pytest
import torch
import yaml

from deepkd.cli import main
from deepkd.detection import create_detector, list_detectors
from deepkd.engine.logs import read_jsonl
from deepkd.train import build
from deepkd.train.config import ConfigError, config_to_dict, load_config
from deepkd.train.detection_task import build_detection_lr, build_detection_method
from deepkd.train.method_config import is_deepkd_method, method_features
from deepkd.train.recipes import find_recipe, list_recipes

COCO_RECIPES = list_recipes("coco/")


def _recipe(tmp_path, name, method, teacher=None, optimizer=None, epochs=2, milestones=(6,)):
    """A tiny synthetic detection recipe: 8 train / 4 val images of 128 px, batch 2 (4 steps an epoch)."""
    recipe = {
        "experiment": name, "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "synthetic_coco", "root": str(tmp_path / "data"), "batch_size": 2, "eval_batch_size": 4,
                 "min_size": [128], "max_size": 128, "synthetic": {"num_train": 8, "num_val": 4}},
        "student": {"name": "tiny_fasterrcnn"},
        "method": method,
        "optimizer": optimizer or {"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"name": "multistep_iter", "epochs": epochs, "milestones": list(milestones),
                     "warmup_iterations": 3},
        "train": {"device": "cpu"},
    }
    if teacher is not None:
        recipe["teacher"] = {"name": "tiny_fasterrcnn", "weights": str(teacher)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


DKD = {"name": "dkd", "alpha": 1.0, "beta": 0.25, "temperature": 1.0, "warmup_epochs": 0}
DEEPKD = {**DKD, "name": "deepkd_dkd", "topk": True, "topk_ramp_start": 1, "topk_ramp_end": 2}
DECOUPLED = {"name": "decoupled", "lr": 0.02, "weight_decay": 1e-4, "weight_decay_stream": "task",
             "stream_momentum": {"task": 0.9, "target": 0.825, "non_target": 0.95}}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A teacher trained by ``deepkd train`` (its recipe and best.pt)."""
    tmp = tmp_path_factory.mktemp("teacher")
    recipe = _recipe(tmp, "teacher", {"name": "ce"}, epochs=TEACHER_EPOCHS, milestones=(4 * TEACHER_EPOCHS - 8,))
    assert main(["train", recipe]) == 0
    return recipe, tmp / "runs" / "teacher" / "seed0"


TEACHER_EPOCHS = 12


def test_eval_gives_the_ap_logged_for_the_best_checkpoint(teacher, capsys):
    recipe, run = teacher
    records = read_jsonl(run / "metrics.jsonl")
    best = max(records, key=lambda r: r["AP"])  # best.pt holds the first epoch with the best AP
    assert best["AP"] > 0 and json.loads((run / "summary.json").read_text())["best_AP"] == best["AP"]
    capsys.readouterr()
    assert main(["eval", recipe, str(run / "best.pt")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: evaluated[k] for k in ("AP", "AP50", "AP75")} == {k: best[k] for k in ("AP", "AP50", "AP75")}


def test_train_writes_ap_best_and_summary_and_eval_reads_it(tmp_path, teacher, capsys):
    recipe = _recipe(tmp_path, "dkd", DKD, teacher=teacher[1] / "best.pt")
    assert main(["train", recipe]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = tmp_path / "runs" / "dkd" / "seed0"
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == [4, 8]
    assert all("AP" in r and "train_loss/nckd" in r for r in records)
    assert summary["status"] == "finished" and summary["best_AP"] == max(r["AP"] for r in records)
    for name in ("best.pt", "last.pt", "summary.json", "config.yaml"):
        assert (run / name).is_file()
    # config.yaml is a recipe again, with every key the run read
    assert config_to_dict(load_config(str(run / "config.yaml"))) == config_to_dict(load_config(recipe))
    assert main(["train", recipe]) == 2  # the folder holds a run: --resume or another experiment
    assert "--resume" in capsys.readouterr().err


def test_stop_and_resume_is_bit_identical(tmp_path, teacher, capsys):
    whole = _recipe(tmp_path, "whole", DEEPKD, teacher=teacher[1] / "best.pt", optimizer=DECOUPLED)
    parts = _recipe(tmp_path, "parts", DEEPKD, teacher=teacher[1] / "best.pt", optimizer=DECOUPLED)
    assert main(["train", whole]) == 0
    assert main(["train", parts, "train.stop_after_steps=3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "stopped"
    assert main(["train", parts, "--resume", "optimizer.lr=0.1"]) == 2  # the run's config may not change
    assert "optimizer.lr 0.02 -> 0.1" in capsys.readouterr().err
    assert main(["train", parts, "--resume"]) == 0
    a, b = (torch.load(tmp_path / "runs" / n / "seed0" / "last.pt", weights_only=True) for n in ("whole", "parts"))
    assert a["step"] == b["step"] == 8 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    logged = [[{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(tmp_path / "runs" / n / "seed0" /
                                                                                 "metrics.jsonl")]
              for n in ("whole", "parts")]
    assert logged[0] == logged[1] and logged[0][-1]["topk"] is not None


@pytest.mark.parametrize("override, match", [
    ("data.download=true", "dataset 'synthetic_coco' does not use data.download"),
    ("train.compile=true", "detection does not use train.compile"),
    ("schedule={name: step}", "schedule 'step' does not fit dataset 'synthetic_coco'"),
    ("schedule.name=step", "schedule 'step' does not use schedule.warmup_iterations"),
    ("schedule.warmup_iteration=5", "did you mean 'schedule.warmup_iterations'"),
    ("data.synthetic.num_vall=3", "did you mean 'data.synthetic.num_val'"),
])
def test_unused_or_unknown_keys_are_errors(tmp_path, override, match):
    recipe = _recipe(tmp_path, "strict", {"name": "ce"})
    with pytest.raises(ConfigError, match=match):
        load_config(recipe, [override])


def test_detection_keys_are_errors_in_classification():
    with pytest.raises(ConfigError, match="student.weights_backbone is only for detectors"):
        load_config("cifar100/resnet32x4-resnet8x4/dkd", ["student.weights_backbone=torchvision:IMAGENET1K_V1"])
    with pytest.raises(ConfigError, match="does not use data.min_size"):
        load_config("cifar100/resnet32x4-resnet8x4/dkd", ["data.min_size=[800]"])


def test_the_iteration_schedule_warms_up_and_decays(tmp_path):
    cfg = load_config(_recipe(tmp_path, "lr", {"name": "ce"}))
    lr = build_detection_lr(cfg)
    assert lr(0) == pytest.approx(0.02 * 0.001) and lr(3) == pytest.approx(0.02) and lr(6) == pytest.approx(0.002)


def test_coco_recipes_cover_the_three_pairs():
    pairs = {name.split("/")[1] for name in COCO_RECIPES}
    assert len(pairs) == 3
    for pair in pairs:
        assert {n.rsplit("/", 1)[1] for n in COCO_RECIPES if f"/{pair}/" in n} == {
            "student", "kd", "dkd", "deepkd_dkd", "deepkd_dkd_topk", "reviewkd", "dkd_reviewkd"}


@functools.lru_cache(maxsize=None)
def _detector(name):
    """A COCO recipe's detector, the architecture only (no weights, no memory: its FPN levels are those of
    the weighted one, and pyramid_info's dry run works on meta tensors)."""
    with torch.device("meta"):
        return create_detector(name, 91)


@pytest.mark.parametrize("name", COCO_RECIPES)
def test_every_coco_recipe_builds(name):
    cfg, text = load_config(name), find_recipe(name).read_text()
    assert text.startswith("# ") and "expected AP" in text and "Detectron2" in text
    assert cfg.detection and {cfg.student.name, *(m.name for m in [cfg.teacher] if m)} <= set(list_detectors())
    models = [_detector(cfg.student.name), _detector(cfg.teacher.name)] if method_features(cfg.method.name) else [
        None, None]
    method = build_detection_method(cfg.method, *models)
    assert method.needs_teacher == (cfg.teacher is not None)
    arguments = cfg.method.resolved_arguments()
    if "reviewkd" in cfg.method.name:  # the reference's detection setting: every FPN level, no warm-up
        review = arguments.get("reviewkd", arguments)
        assert review["fpn"] is True and review["warmup_epochs"] == 0 and len(method.state_dict()) > 0
        assert review["reviewkd_weight"] == {"r50fpn-r18fpn": 1.2, "r50fpnv2-r50fpn": 1.0,
                                             "r50fpn-mv2fpn": 2.0}[name.split("/")[1]]
        arguments = arguments.get("dkd")  # DKD's part of dkd+reviewkd (reviewkd alone has no temperature)
    if cfg.method.name != "ce" and arguments is not None:  # pitfall 6: no CIFAR defaults
        assert arguments["temperature"] == 1.0
    if is_deepkd_method(cfg.method.name):  # pitfall 8: task momentum = the base 0.9, weight decay on task
        assert cfg.optimizer.stream_momentum["task"] == 0.9 and cfg.optimizer.weight_decay_stream == "task"
        if cfg.method.arguments()["topk"]:  # pitfall 7: the ramp's start is explicit
            assert {"topk_ramp_start", "topk_ramp_end"} <= set(cfg.method.arguments())
    with torch.device("meta"):  # the architecture only: no weight download
        student = create_detector(cfg.student.name, 91)
        if cfg.teacher is not None:
            create_detector(cfg.teacher.name, 91)
    optimizer = build.build_optimizer(cfg.optimizer, student)
    assert len(optimizer.param_groups) == 1 and build_detection_lr(cfg)(0) > 0


def test_sigterm_saves_the_step_and_resume_ends_identical(tmp_path, teacher):
    import os
    import signal
    import subprocess
    import sys
    import time

    whole = _recipe(tmp_path, "whole", DKD, teacher=teacher[1] / "best.pt", epochs=6)
    parts = _recipe(tmp_path, "parts", DKD, teacher=teacher[1] / "best.pt", epochs=6)
    assert main(["train", whole]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same kernels as the runs in this process
    process = subprocess.Popen([sys.executable, "-m", "deepkd.cli", "train", parts], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "parts" / "seed0" / "metrics.jsonl"
    deadline = time.time() + 120
    while not metrics.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # after the first epoch's evaluation: mid-run
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "stopped" and summary["reason"] == "SIGTERM" and 4 <= summary["step"] < 24
    assert main(["train", parts, "--resume"]) == 0
    a, b = (torch.load(tmp_path / "runs" / n / "seed0" / "last.pt", weights_only=True) for n in ("whole", "parts"))
    assert a["step"] == b["step"] == 24
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_summary_reports_box_ap(teacher, capsys):
    recipe, run = teacher
    capsys.readouterr()
    assert main(["summary", str(run), "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]
    records = read_jsonl(run / "metrics.jsonl")
    assert row["metric"] == "AP" and row["runs"] == 1
    assert row["best_AP"]["mean"] == max(r["AP"] for r in records) and row["last_AP"]["mean"] == records[-1]["AP"]
    assert main(["summary", str(run)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("AP")


def test_plot_draws_box_ap_and_loss_terms(teacher, tmp_path):
    from deepkd.commands import plots

    data = {teacher[1]: read_jsonl(teacher[1] / "metrics.jsonl")}
    drawn = [key for key, _, _ in plots.panels(data)]
    written = plots.plot_runs([str(teacher[1])], tmp_path)
    assert written[0].is_file() and drawn[:2] == ["AP", "AP50"]
    assert "train_loss/loss_box_reg" in drawn and "test_top1" not in drawn


def test_two_process_detection_run_logs_the_saved_students_ap(tmp_path, teacher, capsys):
    """torchrun, 2 ranks on gloo: each trains on its shard and the AP is gathered over both shards of the
    val set; `deepkd eval` of best.pt (one process, the whole val set) gives the AP the run logged. (The
    BatchNorm averaging itself is shown by tests/test_train.py; on this tiny set it changes no box.)"""
    import os
    import socket
    import subprocess
    import sys

    recipe = _recipe(tmp_path, "ddp", DKD, teacher=teacher[1] / "best.pt", epochs=2)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "-m", "deepkd.cli", "train", recipe],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "ddp" / "seed0"
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4]  # detection batches are per rank: 8 images / (2 x 2)
    best = max(records, key=lambda r: r["AP"])
    capsys.readouterr()
    assert main(["eval", recipe, str(run / "best.pt")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: evaluated[k] for k in ("AP", "AP50")} == {k: best[k] for k in ("AP", "AP50")}


def test_progress_lines_every_log_every_steps(tmp_path, teacher, capsys):
    recipe = _recipe(tmp_path, "lines", DKD, teacher=teacher[1] / "best.pt", epochs=1)
    assert main(["train", recipe, "train.progress=lines", "train.log_every=2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1 [")]
    assert [line.split("]")[0] for line in lines] == ["epoch 1/1 [2/4", "epoch 1/1 [4/4"]
    assert all("loss=" in line for line in lines)


def test_eval_every_skips_the_ap_of_the_epochs_between(tmp_path, teacher, capsys):
    recipe = _recipe(tmp_path, "sparse", DKD, teacher=teacher[1] / "best.pt", epochs=3)
    assert main(["train", recipe, "train.eval_every=2"]) == 0
    records = read_jsonl(tmp_path / "runs" / "sparse" / "seed0" / "metrics.jsonl")
    assert [r["epoch"] for r in records if "AP" in r] == [2, 3]
