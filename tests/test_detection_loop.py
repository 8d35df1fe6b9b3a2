"""The detection loop and demo: a few steps of each method, checkpoints and exact resume, the
offline demo (../shared/spec/DETECTION.md A11)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from deepkd.detection import (
    CocoDetection,
    DetectionLoader,
    detection_train_step,
    prepare_teacher,
    run_detection_demo,
    tiny_fasterrcnn,
    train_detector,
    warmup_multistep_lr,
    write_synthetic_coco,
)
from deepkd.engine.checkpoint import load_checkpoint
from deepkd.errors import RunExistsError, TrainingError
from deepkd.losses import LossTerm, Method, build_method
from deepkd.optim import DecoupledMomentumSGD

CLASSES = 8
DKD = dict(alpha=1.0, beta=0.25, temperature=1.0, warmup_epochs=0)
METHODS = {"plain": ("ce", {}), "dkd": ("dkd", DKD), "deepkd_dkd": ("deepkd_dkd", DKD)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    train = CocoDetection(root / "train", write_synthetic_coco(root, "train", 8, seed=1), train=True, seed=1)
    val = CocoDetection(root / "val", write_synthetic_coco(root, "val", 4, seed=1), train=False)
    return {"train": DetectionLoader(train, 4, train=True, seed=1), "val": DetectionLoader(val, 4, train=False),
            "coco_gt": val.coco}


def _teacher():
    torch.manual_seed(1)
    return prepare_teacher(tiny_fasterrcnn(16, CLASSES))


def _optimizer(student, method):
    if method == "deepkd_dkd":
        return DecoupledMomentumSGD(student.parameters(), lr=0.02, weight_decay=1e-4, weight_decay_stream="task",
                                    momentum={"task": 0.9, "target": 0.825, "non_target": 0.95})
    return torch.optim.SGD(student.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)


@pytest.mark.parametrize("name", list(METHODS))
def test_two_steps_change_the_student_not_the_teacher(name, data):
    teacher = _teacher()
    teacher_state = copy.deepcopy(teacher.state_dict())
    torch.manual_seed(0)
    student = tiny_fasterrcnn(4, CLASSES).train()
    start = copy.deepcopy(student.state_dict())
    method, arguments = METHODS[name]
    optimizer = _optimizer(student, method)
    steps = 0
    for images, targets in data["train"].iter_epoch(1):
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        terms = detection_train_step(student, teacher, build_method(method, **arguments), optimizer, images, targets,
                                     epoch=1)
        assert all(bool(torch.isfinite(v)) for v in terms.values())
        assert ("tckd" in terms) == (name != "plain")
        steps += 1
    assert steps == 2  # 8 images, batch 4
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, start[k])]
    assert "roi_heads.box_predictor.cls_score.weight" in changed and "backbone.stem.0.weight" in changed
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def _run(data, run_dir, **kwargs):
    torch.manual_seed(0)
    student = tiny_fasterrcnn(4, CLASSES)
    teacher = _teacher()
    method, optimizer = build_method("deepkd_dkd", **DKD), _optimizer(student, "deepkd_dkd")
    summary = train_detector(student=student, teacher=teacher, method=method, optimizer=optimizer,
                             lr_at=lambda step: warmup_multistep_lr(step, base_lr=0.02, milestones=[3],
                                                                    warmup_iterations=2),
                             train_loader=data["train"], val_loader=data["val"], coco_gt=data["coco_gt"], epochs=2,
                             device=torch.device("cpu"), run_dir=run_dir, seed=5, log=lambda line: None, **kwargs)
    return summary, student


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def test_train_detector_writes_metrics_checkpoints_and_resumes_exactly(data, tmp_path):
    summary, whole = _run(data, tmp_path / "whole")
    assert summary["status"] == "finished" and summary["steps"] == 4 and summary["best_epoch"] in (1, 2)
    records = _records(tmp_path / "whole")
    assert [r["epoch"] for r in records] == [1, 2] and all("AP" in r and "train_loss/nckd" in r for r in records)
    last = load_checkpoint(tmp_path / "whole" / "last.pt")
    assert (last["epoch"], last["batch"], last["step"]) == (3, 0, 4) and "rng" in last
    assert (tmp_path / "whole" / "best.pt").is_file()
    with pytest.raises(RunExistsError, match="already holds a checkpoint"):
        _run(data, tmp_path / "whole")

    stopped, _ = _run(data, tmp_path / "cut", stop_after_steps=3)  # mid-epoch 2
    assert stopped["status"] == "stopped"
    middle = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert (middle["epoch"], middle["batch"], middle["step"]) == (2, 1, 3)
    resumed, student = _run(data, tmp_path / "cut", resume=True)
    assert resumed["status"] == "finished"
    for key, value in whole.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key
    assert _records(tmp_path / "cut") == records


def test_max_steps_ends_the_run_mid_epoch_with_an_evaluation(data, tmp_path):
    summary, _ = _run(data, tmp_path, max_steps=3)  # 2 epochs of 2 steps, cut after 3
    assert summary["status"] == "finished" and summary["steps"] == 3
    records = _records(tmp_path)
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 2), (2, 3)] and "AP" in records[-1]
    again, _ = _run(data, tmp_path, max_steps=3, resume=True)  # a finished budget trains no further
    assert again["steps"] == 3 and _records(tmp_path) == records


class _Broken(Method):
    needs_teacher = False

    def forward(self, student_logits, teacher_logits, target, *, epoch):
        return {"ce": LossTerm(student_logits.sum() * float("nan"), "task")}


def test_non_finite_loss_stops_with_one_sentence(data, tmp_path):
    torch.manual_seed(0)
    student = tiny_fasterrcnn(4, CLASSES)
    with pytest.raises(TrainingError, match="non-finite loss at step 1"):
        train_detector(student=student, teacher=None, method=_Broken(), optimizer=_optimizer(student, "ce"),
                       lr_at=lambda step: 0.01, train_loader=data["train"], val_loader=data["val"],
                       coco_gt=data["coco_gt"], epochs=1, device=torch.device("cpu"), run_dir=tmp_path,
                       log=lambda line: None)


def test_warmup_multistep_schedule():
    lr = [warmup_multistep_lr(i, base_lr=0.02, milestones=[8, 10], warmup_iterations=4) for i in range(12)]
    assert lr[0] == pytest.approx(0.02 * 0.001) and lr[2] == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert lr[4:8] == [0.02] * 4 and lr[8] == pytest.approx(0.002) and lr[11] == pytest.approx(0.0002)


def test_demo_quick_runs_end_to_end(tmp_path):
    lines = []
    results = run_detection_demo(tmp_path, quick=True, log=lines.append)
    assert list(results) == ["teacher", "plain", "dkd", "deepkd_dkd"]
    assert all(0.0 <= r["AP"] <= 100.0 for r in results.values())
    assert json.loads((tmp_path / "demo.json").read_text()) == results
    assert any(line.startswith("deepkd_dkd") for line in lines)
    again = run_detection_demo(tmp_path, quick=True, log=lines.append, features=True)  # finished runs are reused
    assert {k: v["AP"] for k, v in again.items() if k in results} == {k: v["AP"] for k, v in results.items()}
    assert list(again) == [*results, "reviewkd", "dkd_reviewkd"]  # --features: ReviewKD on the FPN, with DKD
    assert all(0.0 <= r["AP"] <= 100.0 for r in again.values())
    for name in ("reviewkd", "dkd_reviewkd"):  # the connectors were trained and saved with the student
        saved = load_checkpoint(tmp_path / name / "last.pt")["method"]
        assert any(key.endswith("abfs.0.conv1.0.weight") for key in saved)


@pytest.mark.slow
def test_demo_teacher_reaches_50_ap_and_every_student_scores(tmp_path):
    results = run_detection_demo(tmp_path, log=print, features=True)
    assert results["teacher"]["AP"] >= 50.0
    assert all(results[name]["AP"] > 0.0 for name in [*METHODS, "reviewkd", "dkd_reviewkd"])
