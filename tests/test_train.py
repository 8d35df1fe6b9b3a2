"""The loop: equals a plain reference loop, resumes bit for bit, stops cleanly with clear errors."""
import json
import re

import pytest
import torch
from conftest import tiny_config, trained_teacher
from torch import nn

from deepkd.data import build_data
from deepkd.engine.checkpoint import load_checkpoint
from deepkd.engine.loop import NonFiniteLossError
from deepkd.models import create_model, load_weights
from deepkd.train.loop import train


def test_ce_step_equals_plain_reference_loop(tmp_path):
    cfg = tiny_config(tmp_path, schedule__epochs=1, train__stop_after_steps=3)
    train(cfg)
    ckpt = load_checkpoint(tmp_path / "runs" / "tiny" / "seed3" / "last.pt")
    # The 20-line reference: same seed, same batches, torch.optim.SGD on cross-entropy.
    torch.manual_seed(3)
    data = build_data("synthetic", batch_size=32, eval_batch_size=64, seed=3, synthetic_train=160,
                      synthetic_test=64)
    model = create_model("cnn_w4", num_classes=data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for index, (images, targets) in enumerate(data.train.iter_epoch(1)):
        if index == 3:
            break
        opt.zero_grad()
        nn.functional.cross_entropy(model(images), targets).backward()
        opt.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key


@pytest.mark.parametrize("method, optimizer", [
    ({"name": "dkd", "warmup_epochs": 1}, {"name": "sgd", "lr": 0.05}),
    ({"name": "deepkd_dkd", "warmup_epochs": 1}, {"name": "decoupled", "lr": 0.05}),
])
def test_resume_is_bit_identical(tmp_path, method, optimizer):
    teacher = trained_teacher(tmp_path)
    common = dict(method=method, optimizer=optimizer, teacher={"name": "cnn_w4", "weights": teacher})
    train(tiny_config(tmp_path, experiment="full", **common))
    stopped = train(tiny_config(tmp_path, experiment="cut", train__stop_after_steps=7, **common))
    assert stopped["status"] == "stopped"
    resumed = train(tiny_config(tmp_path, experiment="cut", **common), resume=True)
    assert resumed["status"] == "finished"
    a = load_checkpoint(tmp_path / "runs" / "full" / "seed3" / "last.pt")
    b = load_checkpoint(tmp_path / "runs" / "cut" / "seed3" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["step"] == b["step"] == 10
    metrics_a = (tmp_path / "runs" / "full" / "seed3" / "metrics.jsonl").read_text().splitlines()
    metrics_b = (tmp_path / "runs" / "cut" / "seed3" / "metrics.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
    assert [strip(x) for x in metrics_a] == [strip(x) for x in metrics_b]


def test_run_directory_outputs(tmp_path):
    summary = train(tiny_config(tmp_path))
    run_dir = tmp_path / "runs" / "tiny" / "seed3"
    for name in ["config.yaml", "metrics.jsonl", "metrics.csv", "last.pt", "best.pt", "student.safetensors",
                 "summary.json"]:
        assert (run_dir / name).is_file(), name
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["config"]["student"]["name"] == "cnn_w4" and ckpt["epoch"] == 3
    model = create_model("cnn_w4")
    load_weights(model, run_dir / "student.safetensors")
    assert summary["best_top1"] >= summary["last_top1"] or summary["best_top1"] == summary["last_top1"]
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(tmp_path))


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, optimizer={"name": "sgd", "lr": 1e4, "momentum": 0.9}, train__log_every=1)
    with pytest.raises(NonFiniteLossError, match=r"step \d+") as caught:
        train(cfg)
    bad_step = int(re.search(r"step (\d+)", str(caught.value)).group(1))
    last = tmp_path / "runs" / "tiny" / "seed3" / "last.pt"
    if last.exists():  # the explosion came after an epoch boundary: that checkpoint stays good
        ckpt = load_checkpoint(last)
        assert ckpt["step"] < bad_step
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_teacher_mismatch_and_missing_files(tmp_path):
    teacher = trained_teacher(tmp_path)
    wrong_arch = tiny_config(tmp_path, experiment="a", method={"name": "kd"},
                             teacher={"name": "cnn_w8", "weights": teacher})
    with pytest.raises((ValueError, RuntimeError), match="teacher|best.pt"):
        train(wrong_arch)
    missing = tiny_config(tmp_path, experiment="b", method={"name": "kd"},
                          teacher={"name": "cnn_w4", "weights": str(tmp_path / "nope.pt")})
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        train(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(corrupt)


def test_bf16_and_channels_last_run(tmp_path):
    cfg = tiny_config(tmp_path, schedule__epochs=1, train={"progress": "none", "tensorboard": "off",
                                                           "precision": "bf16", "channels_last": True})
    summary = train(cfg)
    assert summary["status"] == "finished" and 0.0 <= summary["best_top1"] <= 100.0
    ckpt = load_checkpoint(tmp_path / "runs" / "tiny" / "seed3" / "last.pt")
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())


def test_gsnr_recorded_and_plotted(tmp_path):
    from deepkd.commands.plots import plot_runs

    teacher = trained_teacher(tmp_path)
    cfg = tiny_config(tmp_path, method={"name": "deepkd_dkd", "warmup_epochs": 1},
                      optimizer={"name": "decoupled", "lr": 0.05},
                      teacher={"name": "cnn_w4", "weights": teacher}, train__gsnr_every=2, train__gsnr_samples=8)
    train(cfg)
    run_dir = tmp_path / "runs" / "tiny" / "seed3"
    records = [json.loads(x) for x in (run_dir / "gsnr.jsonl").read_text().splitlines()]
    assert len(records) == 5 and {"gsnr/task", "gsnr/target", "gsnr/non_target"} <= set(records[0])
    assert all(r["gsnr/task"] > 0 for r in records)
    paths = plot_runs([run_dir])
    assert [p.name for p in paths] == ["curves.png", "gsnr.png"]


@pytest.mark.slow
def test_compiled_run_matches_eager(tmp_path):
    """train.compile=true (inductor; ~30 s of compilation on a CPU) trains like eager."""
    eager = tiny_config(tmp_path, experiment="eager", schedule__epochs=1, train__stop_after_steps=3)
    compiled = tiny_config(tmp_path, experiment="compiled", schedule__epochs=1,
                           train={"progress": "none", "tensorboard": "off", "compile": True, "stop_after_steps": 3})
    train(eager)
    train(compiled)
    a = load_checkpoint(tmp_path / "runs" / "eager" / "seed3" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "runs" / "compiled" / "seed3" / "last.pt")["model"]
    assert set(a) == set(b)
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def _average_bn_worker(rank, init_file, results):
    import torch.distributed as dist

    from deepkd.engine.distributed import Dist, average_batchnorm_statistics

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm1d(2))
    for index, module in enumerate(model[1:]):
        module.running_mean.fill_(float(rank + index))
        module.running_var.fill_(float(2 * rank + 1))
        module.num_batches_tracked.fill_(7)
    average_batchnorm_statistics(model, Dist(rank, 2))
    results[rank] = {k: v.clone() for k, v in model.state_dict().items()}
    dist.destroy_process_group()


def test_batchnorm_statistics_are_averaged_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_average_bn_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    a, b = results[0], results[1]
    assert all(torch.equal(a[k], b[k]) for k in a if "running" in k)  # one set of statistics on every rank
    assert not torch.equal(a["0.weight"], b["0.weight"])  # parameters (unseeded here) are not touched
    assert torch.equal(a["1.running_mean"], torch.full((4,), 0.5))
    assert torch.equal(a["2.running_mean"], torch.full((2,), 1.5))
    assert torch.equal(a["1.running_var"], torch.full((4,), 2.0)) and int(a["1.num_batches_tracked"]) == 7


def test_eval_every_tests_every_nth_epoch_and_the_last_and_changes_no_weight(tmp_path):
    """``train.eval_every: 2`` over 5 epochs tests after epochs 2, 4 and 5 (the last), trains the same
    weights as testing every epoch, and its summary reads the tested epochs only."""
    schedule = {"name": "step", "epochs": 5, "milestones": [4]}
    every = train(tiny_config(tmp_path, experiment="every", schedule=schedule))
    sparse = train(tiny_config(tmp_path, experiment="sparse", schedule=schedule, train__eval_every=2))
    runs = tmp_path / "runs"
    records = [json.loads(line) for line in (runs / "sparse" / "seed3" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in records if "test_top1" in r] == [2, 4, 5]
    a = load_checkpoint(runs / "every" / "seed3" / "last.pt")["model"]
    b = load_checkpoint(runs / "sparse" / "seed3" / "last.pt")["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert sparse["last_top1"] == every["last_top1"] == records[-1]["test_top1"]
    assert sparse["best_epoch"] in (2, 4, 5)
    assert sparse["best_top1"] == max(r["test_top1"] for r in records if "test_top1" in r)
