"""Combined methods (``method.name: a+b``): the sum of the parts, the task term once, streams kept."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepkd.losses import build_method
from deepkd.models import create_model
from deepkd.models.features import FeatureExtractor, feature_info
from tests.conftest import assert_trains_and_resumes, tiny_config, trained_teacher


def _features(seed=0):
    torch.manual_seed(seed)
    student, teacher = create_model("resnet8x4", num_classes=10), create_model("resnet32x4", num_classes=10).eval()
    images, target = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    infos = dict(student_info=feature_info(student, (3, 32, 32)), teacher_info=feature_info(teacher, (3, 32, 32)))
    with torch.no_grad():
        teacher_out = FeatureExtractor(teacher)(images)
    return FeatureExtractor(student)(images), teacher_out, target, infos


def test_dkd_plus_fitnet_is_the_sum_of_the_parts_with_one_task_term():
    student, teacher, target, infos = _features()
    torch.manual_seed(1)
    combined = build_method("dkd+fitnet", dkd={"beta": 2.0, "warmup_epochs": 0}, fitnet={"hint_layer": 1}, **infos)
    torch.manual_seed(1)
    fitnet = build_method("fitnet", hint_layer=1, **infos)
    dkd = build_method("dkd", beta=2.0, warmup_epochs=0)
    terms = combined(student, teacher, target, epoch=3)
    alone = {**fitnet(student, teacher, target, epoch=3), **dkd(student.logits, teacher.logits, target, epoch=3)}
    assert list(terms) == ["ce", "tckd", "nckd", "fitnet"]
    for name, term in terms.items():
        assert term.stream == alone[name].stream
        torch.testing.assert_close(term.value, alone[name].value, rtol=0, atol=0)
    assert combined.features and combined.needs_teacher and not combined.needs_index
    assert [n for n, _ in combined.named_parameters()][0].startswith("parts.fitnet.regressor")


def test_a_combined_recipe_checks_each_part_in_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="method.dkd: method 'dkd' has no argument 'betta'; did you mean 'beta'"):
        tiny_config(tmp_path, method={"name": "dkd+fitnet", "dkd": {"betta": 2}})
    with pytest.raises(ValueError, match="unknown method 'fitnett'; did you mean 'fitnet'"):
        tiny_config(tmp_path, method={"name": "dkd+fitnett"})
    with pytest.raises(ValueError, match="cannot be combined: a two-view method"):
        build_method("mlkd+kd")
    with pytest.raises(ValueError, match="set optimizer.name: decoupled"):  # a DeepKD part needs its optimizer
        tiny_config(tmp_path, method={"name": "deepkd_dkd+fitnet"}, teacher={"name": "cnn_w4", "weights": "t.pt"})


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    return trained_teacher(tmp_path_factory.mktemp("teacher"))


def test_dkd_plus_fitnet_trains_and_resumes_bit_exactly(tmp_path, teacher_weights):
    state = assert_trains_and_resumes(tmp_path, teacher_weights,
                                      {"name": "dkd+fitnet", "dkd": {"warmup_epochs": 1}, "fitnet": {"hint_layer": 1}})
    assert "parts.fitnet.regressor.0.weight" in state


def test_deepkd_dkd_plus_fitnet_puts_the_feature_term_on_the_target_stream(tmp_path, teacher_weights):
    from deepkd.train.forward import forward_pair
    from deepkd.train.loop import setup_run, train

    cfg = tiny_config(tmp_path, method={"name": "deepkd_dkd+fitnet", "fitnet": {"hint_layer": 1}},
                      teacher={"name": "cnn_w4", "weights": teacher_weights},
                      optimizer={"name": "decoupled", "lr": 0.05})
    summary = train(cfg)
    assert summary["status"] == "finished"
    last = json.loads(Path(summary["run_dir"], "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_loss/ce", "train_loss/tckd", "train_loss/nckd", "train_loss/fitnet"} <= set(last)
    run = setup_run(cfg, tmp_path / "probe")
    images, target = next(iter(run.data.train.iter_epoch(1)))
    student, teacher, _ = forward_pair(*run.extractors, images)
    streams = {name: term.stream for name, term in run.method(student, teacher, target, epoch=1).items()}
    assert streams == {"ce": "task", "tckd": "target", "nckd": "non_target", "fitnet": "target"}


def test_a_training_mode_teacher_is_shared_only_with_parts_that_want_it():
    """One teacher forward serves every part: OFD's training-mode teacher (mdistiller's) beside KD's
    eval-mode one is refused by name; with ``ofd.teacher_mode: eval`` they combine."""
    from deepkd.errors import ConfigError

    *_, infos = _features()
    infos["teacher_model"] = create_model("resnet32x4", num_classes=10).eval()
    with pytest.raises(ConfigError, match=r"but ofd runs it in training mode .* set method.ofd.teacher_mode: eval"):
        build_method("kd+ofd", **infos)
    assert build_method("kd+ofd", ofd={"teacher_mode": "eval"}, **infos).teacher_mode == "eval"
    assert build_method("ofd+ce", **infos).teacher_mode == "train"  # ce has no teacher to disagree about
