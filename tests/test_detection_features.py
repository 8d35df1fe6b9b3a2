"""Feature distillation on detection: ReviewKD on the FPN levels (``fpn: true``) and DKD + ReviewKD (DKD on
the RoI logits, ReviewKD on the FPN; DKD's best COCO row). The levels the method reads are the backbones'
outputs, the terms are the parts' own, the connectors train with the student, and ``deepkd train``
resumes such a run bit-exactly with the connectors in its checkpoint."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from deepkd.cli import main
from deepkd.detection import prepare_teacher, tiny_fasterrcnn
from deepkd.detection.roi import pyramid_info, roi_forward, teacher_forward, teacher_roi_logits
from deepkd.detection.step import detection_terms, pyramid_features
from deepkd.detection.task import DetectionTask
from deepkd.engine.logs import read_jsonl
from deepkd.errors import ConfigError
from deepkd.losses import build_method
from deepkd.train.config import load_config
from tests.test_detection_train import _recipe

CLASSES = 8
DKD = dict(alpha=1.0, beta=0.25, temperature=1.0, warmup_epochs=0)
REVIEWKD = dict(reviewkd_weight=1.0, warmup_epochs=0, fpn=True)
DETECTOR_LOSSES = {"loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


@pytest.fixture(scope="module")
def batch(detection_batch):
    return detection_batch


def _pair(frozen_bn=False):
    torch.manual_seed(0)
    student = tiny_fasterrcnn(4, CLASSES, frozen_bn=frozen_bn).train()
    torch.manual_seed(1)
    return student, prepare_teacher(tiny_fasterrcnn(16, CLASSES))


def _method(name, student, teacher, **arguments):
    return build_method(name, student_info=pyramid_info(student), teacher_info=pyramid_info(teacher), **arguments)


def _forward(student, teacher, batch):
    torch.manual_seed(7)
    out = roi_forward(student, *batch)
    return out, teacher_forward(teacher, out.images.tensors, out.proposals, out.images.image_sizes)


def test_pyramid_info_reads_the_fpn_levels_and_leaves_batchnorm_statistics_alone():
    student, teacher = _pair()
    state = copy.deepcopy(student.state_dict())
    info = pyramid_info(student)
    assert (info.channels, info.sizes, info.pooled, info.preact) == ([8] * 3, [(32, 32), (16, 16), (8, 8)], None,
                                                                     False)
    assert pyramid_info(teacher).channels == [32] * 3 and not teacher.training
    assert all(module.training for module in student.modules())  # each module's mode restored
    assert all(torch.equal(value, state[key]) for key, value in student.state_dict().items())


def test_the_levels_are_the_backbones_outputs_on_the_students_tensor(batch):
    student, teacher = _pair(frozen_bn=True)  # FrozenBN: a second backbone pass gives the same maps
    out, taught = _forward(student, teacher, batch)
    with torch.no_grad():
        mine, theirs = student.backbone(out.images.tensors), teacher.backbone(out.images.tensors)
    assert len(out.features) == len(taught.features) == 3
    assert all(torch.equal(a, b) for a, b in zip(out.features, mine.values()))
    assert all(torch.equal(a, b) for a, b in zip(taught.features, theirs.values()))
    logits = teacher_roi_logits(teacher, out.images.tensors, out.proposals, out.images.image_sizes)
    assert torch.equal(taught.class_logits, logits)


def test_reviewkd_on_the_fpn_replaces_the_classifier_loss_and_trains_the_backbone_not_the_heads(batch):
    student, teacher = _pair()
    out, taught = _forward(student, teacher, batch)
    method = _method("reviewkd", student, teacher, **REVIEWKD)
    terms = detection_terms(out, taught.class_logits, method, 1, teacher_features=taught.features)
    assert set(terms) == {"ce", "reviewkd", *DETECTOR_LOSSES}
    torch.testing.assert_close(terms["ce"].value, out.losses["loss_classifier"], rtol=1e-6, atol=1e-6)
    expected = method(pyramid_features(out.class_logits, out.features),
                      pyramid_features(taught.class_logits, taught.features), out.labels, epoch=1)["reviewkd"]
    torch.testing.assert_close(terms["reviewkd"].value, expected.value, rtol=0, atol=0)
    named = {**dict(student.named_parameters()), **{f"method.{k}": v for k, v in method.named_parameters()}}
    grads = dict(zip(named, torch.autograd.grad(terms["reviewkd"].value, list(named.values()), allow_unused=True)))
    assert grads["backbone.stem.0.weight"] is not None and grads["backbone.fpn.layer_blocks.0.0.weight"] is not None
    assert all(grads[k] is not None for k in named if k.startswith("method."))
    assert all(grads[k] is None for k in named if k.startswith(("roi_heads.", "rpn.")))


def test_dkd_plus_reviewkd_is_dkd_on_the_roi_logits_and_reviewkd_on_the_fpn(batch):
    student, teacher = _pair()
    out, taught = _forward(student, teacher, batch)
    method = _method("dkd+reviewkd", student, teacher, dkd=DKD, reviewkd=REVIEWKD)
    terms = detection_terms(out, taught.class_logits, method, 1, teacher_features=taught.features)
    assert set(terms) == {"ce", "tckd", "nckd", "reviewkd", *DETECTOR_LOSSES}
    dkd = build_method("dkd", **DKD)(out.class_logits, taught.class_logits, out.labels, epoch=1)
    assert all(torch.equal(terms[k].value, dkd[k].value) and terms[k].stream == dkd[k].stream
               for k in ("ce", "tckd", "nckd"))
    review = method.parts["reviewkd"](pyramid_features(out.class_logits, out.features),
                                      pyramid_features(taught.class_logits, taught.features), out.labels, epoch=1)
    assert torch.equal(terms["reviewkd"].value, review["reviewkd"].value) and terms["reviewkd"].stream == "target"
    with pytest.raises(ConfigError, match="needs teacher logits and features"):
        detection_terms(out, taught.class_logits, method, 1)


def test_an_optimizer_without_the_connectors_is_refused_in_one_sentence():
    student, teacher = _pair()
    method = _method("reviewkd", student, teacher, **REVIEWKD)
    with pytest.raises(ConfigError, match="the optimizer lacks method ReviewKD's parameters"):
        DetectionTask(student=student, teacher=teacher, method=method,
                      optimizer=torch.optim.SGD(student.parameters(), lr=0.01), lr_at=lambda step: 0.01,
                      train_loader=None, val_loader=None, coco_gt=None, epochs=1, device=torch.device("cpu"))


def test_detection_takes_reviewkd_and_refuses_a_classifier_feature_method(tmp_path):
    assert load_config(_recipe(tmp_path, "ok", {"name": "reviewkd", **REVIEWKD}, teacher="t.pt")).detection
    with pytest.raises(ConfigError, match="detection does not work with feature method 'fitnet'"):
        load_config(_recipe(tmp_path, "no", {"name": "fitnet"}, teacher="t.pt"))
    with pytest.raises(ConfigError, match="detection does not work with feature method 'dkd\\+fitnet'"):
        load_config(_recipe(tmp_path, "no", {"name": "dkd+fitnet", "dkd": DKD}, teacher="t.pt"))


def test_demo_features_is_for_the_detection_demo(capsys):
    assert main(["demo", "--features", "--quick"]) == 2
    assert "--features adds the FPN feature methods to deepkd demo detection" in capsys.readouterr().err


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """An untrained tiny teacher's weights (``deepkd train`` builds tiny_fasterrcnn at its default width)."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(tiny_fasterrcnn(num_classes=CLASSES).state_dict(), path)
    return path


@pytest.mark.parametrize("method", [{"name": "reviewkd", **REVIEWKD},
                                    {"name": "dkd+reviewkd", "dkd": DKD, "reviewkd": REVIEWKD}])
def test_deepkd_train_resumes_bit_exactly_with_the_connectors_in_the_checkpoint(tmp_path, teacher_file, method,
                                                                                capsys):
    whole, parts = (_recipe(tmp_path, name, method, teacher=teacher_file) for name in ("whole", "parts"))
    assert main(["train", whole]) == 0
    assert main(["train", parts, "train.stop_after_steps=3"]) == 0  # mid-epoch 1 of 2 (4 steps an epoch)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "stopped"
    assert main(["train", parts, "--resume"]) == 0
    runs = [tmp_path / "runs" / name / "seed0" for name in ("whole", "parts")]
    a, b = (torch.load(run / "last.pt", weights_only=True) for run in runs)
    assert a["step"] == b["step"] == 8
    assert {"abfs.0.conv1.0.weight", "abfs.1.att_conv.0.bias", "abfs.2.conv2.1.running_var"} <= {
        k.removeprefix("parts.reviewkd.") for k in a["method"]}
    for part in ("model", "method"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    logged = [[{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(run / "metrics.jsonl")]
              for run in runs]
    assert logged[0] == logged[1] and all("train_loss/reviewkd" in r and "AP" in r for r in logged[0])
