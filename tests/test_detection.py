"""Detection distillation: RoI logits of student and teacher, terms and streams, the step
(../shared/spec/DETECTION.md section 5: A1-A8, A12)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from deepkd.detection import (
    check_pair,
    create_detector,
    detection_terms,
    detection_train_step,
    prepare_teacher,
    roi_forward,
    teacher_roi_logits,
    tiny_fasterrcnn,
    train_detector,
)
from deepkd.detection.models import TinyFPNBackbone
from deepkd.errors import ConfigError, DataError, MissingFileError, WeightsError
from deepkd.losses import build_method, stream_losses, total_loss
from deepkd.optim import DecoupledMomentumSGD, stream_grads

CLASSES = 8
DKD = dict(alpha=1.0, beta=0.25, temperature=1.0, warmup_epochs=0)


@pytest.fixture(scope="module")
def batch(detection_batch):
    return detection_batch


def _student(seed=0, **kwargs):
    torch.manual_seed(seed)
    return tiny_fasterrcnn(4, CLASSES, **kwargs).train()


def _teacher(seed=1):
    torch.manual_seed(seed)
    return prepare_teacher(tiny_fasterrcnn(16, CLASSES))


def _tiny_maskrcnn():
    backbone = TinyFPNBackbone(8)
    names = ["0", "1", "2"]
    return MaskRCNN(backbone, num_classes=None, min_size=128, max_size=128,
                    box_roi_pool=MultiScaleRoIAlign(names, 7, 2), box_head=TwoMLPHead(16 * 49, 64),
                    box_predictor=FastRCNNPredictor(64, CLASSES), mask_roi_pool=MultiScaleRoIAlign(names, 14, 2),
                    mask_head=MaskRCNNHeads(16, (16, 16), 1), mask_predictor=MaskRCNNPredictor(16, 16, CLASSES))


# -- A1 forward parity ------------------------------------------------------------------------
def _assert_parity(model, images, targets):
    model.train()
    state = copy.deepcopy(model.state_dict())  # BatchNorm in train mode updates its statistics
    torch.manual_seed(7)  # the RPN and RoI samplers draw from the global RNG
    ours = roi_forward(model, images, targets).losses
    model.load_state_dict(state)
    torch.manual_seed(7)
    reference = model(images, targets)
    assert list(ours) == list(reference) == ["loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"]
    for key, value in reference.items():
        assert torch.equal(ours[key], value), key
    assert float(reference["loss_classifier"].detach()) > 0


PARITY = [pytest.param("tiny_fasterrcnn", id="tiny"), pytest.param("fasterrcnn_mobilenet_v3_large_fpn", id="mv3"),
          pytest.param("fasterrcnn_resnet18_fpn", id="r18", marks=pytest.mark.slow),
          pytest.param("fasterrcnn_mobilenet_v2_fpn", id="mv2", marks=pytest.mark.slow),
          pytest.param("fasterrcnn_resnet50_fpn", id="r50", marks=pytest.mark.slow),
          pytest.param("fasterrcnn_resnet50_fpn_v2", id="r50v2", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", PARITY)
def test_roi_forward_losses_equal_torchvision(name, batch):
    torch.manual_seed(0)
    size = {} if name == "tiny_fasterrcnn" else dict(min_size=128, max_size=128)
    _assert_parity(create_detector(name, CLASSES, **size), *batch)


def test_roi_forward_refuses_what_it_cannot_train(batch):
    images, targets = batch
    with pytest.raises(ConfigError, match="train mode"):
        roi_forward(_student().eval(), images, targets)
    with pytest.raises(ConfigError, match="mask or keypoint head"):
        roi_forward(_tiny_maskrcnn().train(), images, targets)
    with pytest.raises(ConfigError, match="Faster/Mask R-CNN"):
        roi_forward(torch.nn.Linear(2, 2), images, targets)
    flat = [dict(targets[0], boxes=targets[0]["boxes"].clone())]
    flat[0]["boxes"][0, 2] = flat[0]["boxes"][0, 0]
    with pytest.raises(DataError, match="zero width or height"):
        roi_forward(_student(), images[:1], flat)


# -- A2 logits are torchvision's ----------------------------------------------------------------
def test_class_logits_are_the_box_predictors(batch):
    images, targets = batch
    model = _student()
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(3)
    out = roi_forward(model, images, targets)
    model.load_state_dict(state)
    captured = []
    handle = model.roi_heads.box_predictor.register_forward_hook(lambda mod, args, out: captured.append(out[0]))
    torch.manual_seed(3)
    reference = model(images, targets)
    handle.remove()
    assert torch.equal(out.class_logits, captured[0])
    assert torch.equal(TF.cross_entropy(out.class_logits, out.labels), reference["loss_classifier"])
    terms = build_method("dkd", ce_weight=1.0, **DKD)(out.class_logits, out.class_logits.detach(), out.labels, epoch=1)
    assert abs(float(terms["ce"].value.detach()) - float(reference["loss_classifier"].detach())) <= 1e-6
    rows = sum(len(p) for p in out.proposals)
    assert len(out.labels) == out.class_logits.shape[0] == rows == 64 * len(images)  # box_batch_size_per_image
    assert out.class_logits.shape[1] == CLASSES and int(out.labels.max()) > 0 and int(out.labels.min()) == 0


# -- A3 teacher path is torchvision's ------------------------------------------------------------
def _assert_teacher_path(teacher, batch):
    images, targets = batch
    out = roi_forward(_student(), images, targets)
    ours = teacher_roi_logits(teacher, out.images.tensors, out.proposals, out.images.image_sizes)
    captured = []
    handle = teacher.roi_heads.box_predictor.register_forward_hook(lambda mod, args, out: captured.append(out[0]))
    with torch.no_grad():
        features = teacher.backbone(out.images.tensors)
        teacher.roi_heads(features, [p.clone() for p in out.proposals], out.images.image_sizes)
    handle.remove()
    assert ours.shape == out.class_logits.shape and not ours.requires_grad
    assert torch.equal(ours, captured[0])


def test_teacher_logits_equal_its_roi_heads_faster_and_mask_rcnn(batch):
    _assert_teacher_path(_teacher(), batch)
    torch.manual_seed(2)
    _assert_teacher_path(prepare_teacher(_tiny_maskrcnn()), batch)


@pytest.mark.slow
def test_teacher_logits_equal_its_roi_heads_mask_rcnn_r50(batch):
    torch.manual_seed(2)
    teacher = create_detector("maskrcnn_resnet50_fpn", CLASSES, min_size=128, max_size=128)
    _assert_teacher_path(prepare_teacher(teacher), batch)


def test_teacher_and_pair_errors(batch):
    images, targets = batch
    out = roi_forward(_student(), images, targets)
    torch.manual_seed(1)
    with pytest.raises(ConfigError, match="prepare_teacher"):
        teacher_roi_logits(tiny_fasterrcnn(16, CLASSES), out.images.tensors, out.proposals, out.images.image_sizes)
    with pytest.raises(ConfigError, match="8 classes and the teacher 5"):
        check_pair(_student(), prepare_teacher(tiny_fasterrcnn(16, 5)))
    other = tiny_fasterrcnn(16, CLASSES, image_mean=[0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="image_mean"):
        check_pair(_student(), other)
    check_pair(_student(), _teacher())


# -- A4 self-distillation is zero --------------------------------------------------------------------
def test_self_distillation_is_exactly_zero(batch):
    student = _student(frozen_bn=True)
    teacher = prepare_teacher(copy.deepcopy(student))
    out = roi_forward(student, *batch)
    logits = teacher_roi_logits(teacher, out.images.tensors, out.proposals, out.images.image_sizes)
    assert torch.equal(logits, out.class_logits)
    terms = detection_terms(out, logits, build_method("dkd", **DKD), epoch=1)
    assert float(terms["tckd"].value.detach()) == 0.0 and float(terms["nckd"].value.detach()) == 0.0
    noisy = detection_terms(out, logits + torch.randn_like(logits), build_method("dkd", **DKD), epoch=1)
    assert float(noisy["tckd"].value.detach()) > 0 and float(noisy["nckd"].value.detach()) > 0


# -- A5 teacher untouched ------------------------------------------------------------------------------
def _assert_teacher_untouched(teacher, batch):
    before = copy.deepcopy(teacher.state_dict())
    for method, optimizer in (("dkd", "sgd"), ("deepkd_dkd", "decoupled")):
        student = _student()
        opt = (torch.optim.SGD(student.parameters(), lr=0.02, momentum=0.9) if optimizer == "sgd" else
               DecoupledMomentumSGD(student.parameters(), lr=0.02, weight_decay_stream="task",
                                    momentum={"task": 0.9, "target": 0.825, "non_target": 0.95}))
        detection_train_step(student, teacher, build_method(method, **DKD), opt, *batch, epoch=1)
        held = {id(p) for group in opt.param_groups for p in group["params"]}
        assert not held & {id(p) for p in teacher.parameters()}
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_teacher_untouched_by_dkd_and_deepkd_steps(batch):
    teacher = _teacher()  # BatchNorm2d: batch statistics would move its running buffers
    assert any("running_mean" in k for k in teacher.state_dict())
    _assert_teacher_untouched(teacher, batch)


@pytest.mark.slow
def test_teacher_untouched_v2_teacher_with_bn_head(batch):
    torch.manual_seed(1)
    teacher = create_detector("fasterrcnn_resnet50_fpn_v2", CLASSES, min_size=128, max_size=128)
    _assert_teacher_untouched(prepare_teacher(teacher), batch)


def test_optimizer_holding_teacher_or_frozen_parameters_is_refused(tmp_path):
    student, teacher = _student(), _teacher()
    optimizer = torch.optim.SGD([*student.parameters(), *teacher.parameters()], lr=0.1)
    arguments = dict(student=student, teacher=teacher, method=build_method("dkd", **DKD), lr_at=lambda step: 0.1,
                     train_loader=None, val_loader=None, coco_gt=None, epochs=1, device=torch.device("cpu"),
                     run_dir=tmp_path)
    with pytest.raises(ConfigError, match="teacher parameters"):
        train_detector(optimizer=optimizer, **arguments)
    student.backbone.stem[0].weight.requires_grad_(False)  # a frozen stage, as with pretrained backbones
    with pytest.raises(ConfigError, match="frozen parameters"):
        train_detector(optimizer=torch.optim.SGD(student.parameters(), lr=0.1), **arguments)


# -- A6 DKD numbers on 91 classes, background 0 ----------------------------------------------------------
def _mdistiller_dkd(student, teacher, target, alpha, beta, temperature):
    """mdistiller's dkd_loss (mdistiller/distillers/DKD.py), written out independently."""
    gt = torch.zeros_like(student).scatter_(1, target.unsqueeze(1), 1).bool()
    p_s, p_t = TF.softmax(student / temperature, dim=1), TF.softmax(teacher / temperature, dim=1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], dim=1)
    tckd = TF.kl_div(torch.log(b_s), b_t, reduction="sum") * temperature ** 2 / target.shape[0]
    q_t = TF.softmax(teacher / temperature - 1000.0 * gt, dim=1)
    log_q_s = TF.log_softmax(student / temperature - 1000.0 * gt, dim=1)
    nckd = TF.kl_div(log_q_s, q_t, reduction="sum") * temperature ** 2 / target.shape[0]
    return alpha * tckd + beta * nckd


def _dkd_value(student, teacher, labels):
    terms = build_method("dkd", **DKD)(student, teacher, labels, epoch=1)
    return float(terms["tckd"].value + terms["nckd"].value)


def test_dkd_on_91_classes_matches_mdistiller_and_ignores_column_order():
    generator = torch.Generator().manual_seed(0)
    rows = 512
    student, teacher = torch.randn(rows, 91, generator=generator), 2 * torch.randn(rows, 91, generator=generator)
    labels = torch.randint(1, 91, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < 0.75] = 0  # most sampled RoIs are background
    ours = _dkd_value(student, teacher, labels)
    reference = float(_mdistiller_dkd(student, teacher, labels, 1.0, 0.25, 1.0))
    assert ours > 0.1 and abs(ours - reference) <= 1e-6
    order = list(range(1, 91)) + [0]  # Detectron2's layout: background last
    moved = _dkd_value(student[:, order], teacher[:, order], (labels - 1) % 91)
    assert abs(moved - ours) <= 1e-6
    assert abs(_dkd_value(student, teacher, (labels + 1) % 91) - ours) > 1e-3  # labels matter


# -- A7 streams ------------------------------------------------------------------------------------------
def test_streams_sum_to_the_total_gradient_and_skip_rpn_and_box_regression(batch):
    student, teacher = _student(), _teacher()
    out = roi_forward(student, *batch)
    logits = teacher_roi_logits(teacher, out.images.tensors, out.proposals, out.images.image_sizes)
    terms = detection_terms(out, logits, build_method("dkd", **DKD), epoch=1)
    assert {t.stream for t in terms.values()} == {"task", "target", "non_target"}
    assert {k for k, t in terms.items() if t.stream == "task"} == {"ce", "loss_box_reg", "loss_objectness",
                                                                   "loss_rpn_box_reg"}
    assert "loss_classifier" not in terms
    names, params = zip(*[(n, p) for n, p in student.named_parameters() if p.requires_grad])
    grads = stream_grads(stream_losses(terms), params, retain_graph=True, batched=False)
    whole = torch.autograd.grad(total_loss(terms), params, allow_unused=True)
    for index, reference in enumerate(whole):
        parts = [g[index] for g in grads.values() if g[index] is not None]
        assert (reference is None) == (not parts)
        if parts:
            torch.testing.assert_close(sum(parts), reference, atol=1e-5, rtol=0)
    for stream in ("target", "non_target"):
        by_name = dict(zip(names, grads[stream]))
        untouched = ("rpn.head.", "roi_heads.box_predictor.bbox_pred.")
        assert all(g is None for n, g in by_name.items() if n.startswith(untouched))
        assert by_name["roi_heads.box_predictor.cls_score.weight"] is not None
        stem = by_name["backbone.stem.0.weight"]
        assert stem is not None and float(stem.abs().sum()) > 0


def test_method_without_teacher_logits_and_name_clashes(batch):
    out = roi_forward(_student(), *batch)
    with pytest.raises(ConfigError, match="needs teacher logits"):
        detection_terms(out, None, build_method("dkd", **DKD), epoch=1)
    plain = detection_terms(out, None, build_method("ce"), epoch=1)
    assert list(plain) == ["ce", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"]
    assert torch.equal(plain["ce"].value, out.losses["loss_classifier"])


# -- A8 optimizer equivalence -----------------------------------------------------------------------------
def test_decoupled_sgd_with_equal_momenta_reproduces_torch_sgd(batch):
    teacher, results = _teacher(), []
    for kind in ("torch", "decoupled"):
        student = _student()
        opt = (torch.optim.SGD(student.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4) if kind == "torch" else
               DecoupledMomentumSGD(student.parameters(), lr=0.02, weight_decay=1e-4, weight_decay_stream="task",
                                    momentum={"task": 0.9, "target": 0.9, "non_target": 0.9}))
        for step in range(3):
            torch.manual_seed(100 + step)
            detection_train_step(student, teacher, build_method("dkd", **DKD), opt, *batch, epoch=1)
        results.append(student.state_dict())
    start = _student().state_dict()
    assert any(not torch.equal(results[0][k], start[k]) for k in start)  # the steps did something
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], atol=1e-6, rtol=1e-6)


def test_bf16_step_and_precision_errors(batch):
    student, teacher = _student(), _teacher()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    terms = detection_train_step(student, teacher, build_method("dkd", **DKD), optimizer, *batch, epoch=1,
                                 precision="bf16")
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v)) for v in terms.values())
    with pytest.raises(ConfigError, match="precision must be"):
        detection_train_step(student, teacher, build_method("dkd", **DKD), optimizer, *batch, epoch=1,
                             precision="fp16")


# -- A12 top-k mask on 91 classes --------------------------------------------------------------------------
def test_topk_mask_on_91_roi_classes(batch):
    torch.manual_seed(0)
    student = tiny_fasterrcnn(4, 91).train()
    torch.manual_seed(1)
    teacher = prepare_teacher(tiny_fasterrcnn(16, 91))
    out = roi_forward(student, *batch)
    logits = teacher_roi_logits(teacher, out.images.tensors, out.proposals, out.images.image_sizes)
    method = build_method("dkd", **DKD, topk=True, topk_ramp_start=2, topk_ramp_end=8)
    masked = detection_terms(out, logits, method, epoch=1)
    assert [method.topk(e) for e in (1, 2)] == [5, 5] and method.topk(8) == method.topk(12) == 91
    assert 5 < method.topk(5) < 91
    keep = method.dtm.keep(logits.float(), out.labels, 1, -100)
    rows = torch.arange(len(out.labels))
    assert not bool(keep[rows, out.labels].any()) and bool((keep.sum(1) == 5).all())
    assert method.dtm.keep(logits.float(), out.labels, 8, -100) is None
    full = detection_terms(out, logits, method, epoch=8)
    plain = detection_terms(out, logits, build_method("dkd", **DKD), epoch=1)
    assert torch.equal(full["nckd"].value, plain["nckd"].value)
    assert not torch.equal(masked["nckd"].value, plain["nckd"].value)


# -- the model registry ------------------------------------------------------------------------------------
def test_create_detector_weights_errors_and_file_round_trip(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="91 classes, not 8"):
        create_detector("fasterrcnn_resnet50_fpn", 8, weights="torchvision:COCO_V1")
    with pytest.raises(WeightsError, match="choose from COCO_V1"):
        create_detector("fasterrcnn_resnet50_fpn", 91, weights="torchvision:COCO_V9")
    with pytest.raises(WeightsError, match="no such weights"):
        create_detector("tiny_fasterrcnn", 8, weights="torchvision:COCO_V1")
    with pytest.raises(MissingFileError, match="does not exist"):
        create_detector("tiny_fasterrcnn", 8, weights=str(tmp_path / "none.pt"))
    model = _student()
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    loaded = create_detector("tiny_fasterrcnn", CLASSES, weights=str(tmp_path / "tiny.pt"), width=4)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(WeightsError, match="does not fit"):
        create_detector("tiny_fasterrcnn", CLASSES, weights=str(tmp_path / "tiny.pt"), width=8)

    from torchvision.models._api import WeightsEnum

    def offline(self, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(MissingFileError, match=r"fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9\.pth"):
        create_detector("fasterrcnn_mobilenet_v3_large_320_fpn", 91, weights="torchvision:COCO_V1")
