"""ReviewKD (mdistiller's ``ReviewKD``): the levels and lists derived from the models equal mdistiller's
CIFAR-100 config, the loss and its gradients equal the ABF + HCL formulas written out here in plain torch
ops (float64), the warm-up, one-sentence errors, and a 2-epoch synthetic run that resumes bit-exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepkd.errors import ConfigError
from deepkd.features import FeatureInfo, Features
from deepkd.losses import build_method
from deepkd.losses.feature.reviewkd import hcl
from deepkd.models import create_model
from deepkd.models.features import FeatureExtractor, feature_info
from tests.conftest import assert_trains_and_resumes, trained_teacher

# mdistiller/engine/cfg.py, CFG.REVIEWKD, written for resnet32x4 -> resnet8x4
MDISTILLER = {"in_channels": [64, 128, 256, 256], "out_channels": [64, 128, 256, 256],
              "shapes": [1, 8, 16, 32], "out_shapes": [1, 8, 16, 32]}


def _pair(student="resnet8x4", teacher="resnet32x4", seed=0):
    torch.manual_seed(seed)
    s, t = create_model(student, num_classes=10).double(), create_model(teacher, num_classes=10).double().eval()
    return s, t, feature_info(s, (3, 32, 32)), feature_info(t, (3, 32, 32))


def _mse(a, b):
    return ((a - b) ** 2).mean()


def _pool(x, size):
    """Adaptive average pooling of a map whose side is a multiple of ``size``: block means."""
    n, c, h, w = x.shape
    return x.reshape(n, c, size, h // size, size, w // size).mean((3, 5))


def _hcl_level(fs, ft):
    """mdistiller's hcl for one level: pools at 4, 2, 1 (those below the height), weights 1/2, 1/4, 1/8."""
    height = fs.shape[2]
    terms = [(1.0, _mse(fs, ft))] + [(w, _mse(_pool(fs, s), _pool(ft, s)))
                                     for w, s in zip((0.5, 0.25, 0.125), [s for s in (4, 2, 1) if s < height])]
    return sum(w * v for w, v in terms) / sum(w for w, _ in terms)


def _bn_train(x, bn):
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight[:, None, None] + bn.bias[:, None, None]


def _upsample(x, size):
    """Nearest upsampling by an integer factor."""
    factor = size // x.shape[2]
    return x.repeat_interleave(factor, 2).repeat_interleave(factor, 3)


def _abf(abf, x, residual):
    """One ABF with its own weights (BN in training mode); same in and out size, as for this pair."""
    x = _bn_train(F.conv2d(x, abf.conv1[0].weight), abf.conv1[1])
    if residual is not None:
        residual = _upsample(residual, x.shape[2])
        att = torch.sigmoid(F.conv2d(torch.cat([x, residual], 1), abf.att_conv[0].weight, abf.att_conv[0].bias))
        x = x * att[:, :1] + residual * att[:, 1:]
    return _bn_train(F.conv2d(x, abf.conv2[0].weight, padding=1), abf.conv2[1]), x


def _reference(method, fs, ft, epoch):
    """mdistiller: reviewkd_weight min(epoch / warmup, 1) sum_l hcl(ABF outputs, teacher preact[1:] + pooled)."""
    levels = [fs.stages[1], fs.stages[2], fs.stages[3], fs.pooled[:, :, None, None]]
    outputs, residual = [], None
    for abf, x in zip(method.abfs, reversed(levels)):  # abfs[0] is the pooled level's (no fusion)
        out, residual = _abf(abf, x, residual)
        outputs.insert(0, out)
    teacher = [ft.preact[1], ft.preact[2], ft.preact[3], ft.pooled[:, :, None, None]]
    return 5.0 * min(epoch / 20.0, 1.0) * sum(_hcl_level(s, t) for s, t in zip(outputs, teacher))


def test_lists_derived_from_resnet8x4_and_resnet32x4_equal_mdistillers_config():
    _, _, s_info, t_info = _pair()
    method = build_method("reviewkd", student_info=s_info, teacher_info=t_info)
    derived = {key: getattr(method, key) for key in MDISTILLER}
    assert derived == MDISTILLER
    assert [abf.conv1[0].in_channels for abf in method.abfs][::-1] == MDISTILLER["in_channels"]
    assert [abf.conv2[0].out_channels for abf in method.abfs][::-1] == MDISTILLER["out_channels"]
    assert {abf.conv1[0].out_channels for abf in method.abfs} == {256}  # min(512, in_channels[-1])
    assert [abf.att_conv is None for abf in method.abfs] == [True, False, False, False]
    build_method("reviewkd", student_info=s_info, teacher_info=t_info, **MDISTILLER)  # the same lists, accepted
    assert (method.ce_weight, method.reviewkd_weight, method.warmup_epochs) == (1.0, 5.0, 20.0)


def test_reviewkd_equals_the_reference_formula_in_float64(epoch=7):
    student, teacher, s_info, t_info = _pair()
    method = build_method("reviewkd", student_info=s_info, teacher_info=t_info).double()
    images, target = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    fs = FeatureExtractor(student)(images)
    with torch.no_grad():
        ft = FeatureExtractor(teacher)(images)
    terms = method(fs, ft, target, epoch=epoch)
    reference = _reference(method, fs, ft, epoch)
    torch.testing.assert_close(terms["reviewkd"].value, reference, rtol=1e-10, atol=0)
    wrt = [*fs.stages[1:], fs.pooled, *(p for p in method.parameters())]
    ours = torch.autograd.grad(terms["reviewkd"].value, wrt, retain_graph=True, allow_unused=True)
    theirs = torch.autograd.grad(reference, wrt, allow_unused=True)
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert all(g is not None for g in ours)  # every connector weight and student level gets a gradient
    assert terms["reviewkd"].stream == "target" and terms["ce"].stream == "task"
    torch.testing.assert_close(terms["ce"].value, F.cross_entropy(fs.logits, target))


def test_the_weight_warms_up_as_epoch_over_20_from_epoch_1():
    model, teacher, s_info, t_info = _pair("cnn_w4", "cnn_w4")
    method = build_method("reviewkd", student_info=s_info, teacher_info=t_info).double()
    images, target = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    fs, ft = FeatureExtractor(model)(images), FeatureExtractor(teacher)(images)
    full = method(fs, ft, target, epoch=20)["reviewkd"].value
    for epoch, factor in [(1, 0.05), (10, 0.5), (19, 0.95), (21, 1.0), (240, 1.0)]:
        torch.testing.assert_close(method(fs, ft, target, epoch=epoch)["reviewkd"].value, factor * full,
                                   rtol=1e-14, atol=0)


@pytest.mark.parametrize("height, weights", [(1, [1.0]), (2, [1.0, 0.5]), (4, [1.0, 0.5, 0.25]),
                                             (8, [1.0, 0.5, 0.25, 0.125])])
def test_hcl_pools_only_below_the_maps_height_with_halving_weights(height, weights):
    fs, ft = torch.randn(2, 3, height, height, dtype=torch.float64), torch.randn(2, 3, height, height,
                                                                                 dtype=torch.float64)
    sizes = [s for s in (4, 2, 1) if s < height]
    values = [_mse(fs, ft)] + [_mse(_pool(fs, s), _pool(ft, s)) for s in sizes]
    expected = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    torch.testing.assert_close(hcl([fs], [ft]), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("student", ["wrn_16_2", "vgg8"])
def test_another_pair_needs_no_hand_set_lists(student):
    model, teacher, s_info, t_info = _pair(student=student)
    method = build_method("reviewkd", student_info=s_info, teacher_info=t_info).double()
    assert method.out_channels == MDISTILLER["out_channels"] and method.out_shapes == MDISTILLER["out_shapes"]
    assert method.in_channels == [*s_info.channels[1 - len(t_info.channels):], s_info.pooled]
    images, target = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (2,))
    fs = FeatureExtractor(model)(images)
    with torch.no_grad():
        ft = FeatureExtractor(teacher)(images)
    outputs = method.fuse(method.student_levels(fs))
    assert [o.shape[1:] for o in outputs] == [t.shape[1:] for t in [*ft.preact[1:], ft.pooled[:, :, None, None]]]
    loss = method(fs, ft, target, epoch=40)["reviewkd"].value
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in method.parameters())


def test_student_preact_reads_the_students_pre_activations():
    student, teacher, s_info, t_info = _pair()
    method = build_method("reviewkd", student_info=s_info, teacher_info=t_info, stu_preact=True).double()
    fs = FeatureExtractor(student)(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    levels = method.student_levels(fs)
    assert levels[0] is fs.preact[1] and levels[2] is fs.preact[3] and len(levels) == 4


def _info(stages=4, pooled=8, preact=True):
    return FeatureInfo([8] * stages, [(32 >> i, 32 >> i) for i in range(stages)], pooled, preact)


@pytest.mark.parametrize("changes, message", [
    ({"in_channels": [64, 128, 256, 512]}, r"in_channels \[64, 128, 256, 512\] does not match the student's"),
    ({"out_shapes": [1, 4, 16, 32]}, r"out_shapes \[1, 4, 16, 32\] does not match the teacher's level sizes"),
    ({"shapes": [1, 8, 16]}, "shapes .* does not match the student's level sizes"),
])
def test_lists_that_do_not_fit_the_models_are_refused_in_one_sentence(changes, message):
    _, _, s_info, t_info = _pair()
    with pytest.raises(ConfigError, match=message):
        build_method("reviewkd", student_info=s_info, teacher_info=t_info, **changes)


@pytest.mark.parametrize("student, teacher, changes, message", [
    (_info(), _info(preact=False), {}, "teacher's pre-activation features"),
    (_info(preact=False), _info(), {"stu_preact": True}, "student's pre-activation features.*stu_preact: false"),
    (_info(pooled=None), _info(), {}, "student's pooled feature"),
    (_info(stages=2), _info(stages=4), {}, "teacher's 4 levels .* the student has only 3"),
])
def test_models_reviewkd_cannot_read_are_refused_in_one_sentence(student, teacher, changes, message):
    with pytest.raises(ConfigError, match=message):
        build_method("reviewkd", student_info=student, teacher_info=teacher, **changes)


@pytest.mark.parametrize("student, teacher, changes, message", [
    (_info(pooled=None), _info(pooled=None), {}, "teacher's pooled feature .*set reviewkd's fpn: true"),
    (_info(stages=3), _info(stages=5), {"fpn": True}, "pairs the pyramids level by level, .* 3 levels and the teach"),
    (_info(), _info(), {"fpn": True, "stu_preact": True}, "fpn: true reads the pyramid's levels as they are"),
])
def test_pyramids_reviewkd_cannot_pair_are_refused_in_one_sentence(student, teacher, changes, message):
    with pytest.raises(ConfigError, match=message):
        build_method("reviewkd", student_info=student, teacher_info=teacher, **changes)


def _pyramid(channels, height, width, levels=3, seed=0):
    """FPN-like levels, finest first, halving (a detector's batch: not square, not the dry run's size)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, height >> i, width >> i, generator=generator, dtype=torch.float64)
            for i in range(levels)]


def test_fpn_mode_pairs_every_level_as_the_detection_reference_in_float64():
    """ReviewKD's Detection/model (kd_trans.py, rcnn.py): every student FPN level through its ABF (the deepest
    without fusion, no 1x1 pooled level, no stem skipped), HCL against the teacher's level of the same index,
    times the weight; no warm-up. The batch's sizes differ from the dry run's: the outputs follow the batch."""
    s_info = FeatureInfo([8] * 3, [(32, 32), (16, 16), (8, 8)], None, False)
    t_info = FeatureInfo([32] * 3, [(32, 32), (16, 16), (8, 8)], None, False)
    method = build_method("reviewkd", student_info=s_info, teacher_info=t_info, fpn=True, reviewkd_weight=1.2,
                          warmup_epochs=0).double()
    assert [abf.att_conv is None for abf in method.abfs] == [True, False, False]
    assert {abf.conv1[0].out_channels for abf in method.abfs} == {8}  # min(512, the student's FPN width)
    fs = Features(torch.randn(6, 5, dtype=torch.float64, requires_grad=True), _pyramid(8, 32, 48))
    ft = Features(torch.randn(6, 5, dtype=torch.float64), _pyramid(32, 32, 48, seed=1))
    for level in fs.stages:
        level.requires_grad_(True)
    target = torch.randint(0, 5, (6,))
    terms = method(fs, ft, target, epoch=1)
    outputs, residual = [], None
    for abf, x in zip(method.abfs, reversed(fs.stages)):
        out, residual = _abf(abf, x, residual)
        outputs.insert(0, out)
    reference = 1.2 * sum(_hcl_level(s, t) for s, t in zip(outputs, ft.stages))
    torch.testing.assert_close(terms["reviewkd"].value, reference, rtol=1e-10, atol=0)
    wrt = [*fs.stages, *method.parameters()]
    ours = torch.autograd.grad(terms["reviewkd"].value, wrt, retain_graph=True)
    for a, b in zip(ours, torch.autograd.grad(reference, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(terms["ce"].value, F.cross_entropy(fs.logits, target))
    torch.testing.assert_close(method(fs, ft, target, epoch=40)["reviewkd"].value, terms["reviewkd"].value)


def test_fpn_mode_resizes_each_output_to_its_teacher_level():
    """A student pyramid on other strides than the teacher's: each ABF output takes its teacher level's size."""
    s_info = FeatureInfo([4] * 3, [(16, 16), (8, 8), (4, 4)], None, False)
    t_info = FeatureInfo([6] * 3, [(32, 32), (16, 16), (8, 8)], None, False)
    method = build_method("reviewkd", student_info=s_info, teacher_info=t_info, fpn=True).double()
    fs, ft = Features(torch.zeros(1, 2), _pyramid(4, 16, 24)), Features(torch.zeros(1, 2), _pyramid(6, 32, 48))
    sizes = [tuple(t.shape[2:]) for t in reversed(ft.stages)]
    assert [tuple(o.shape[1:]) for o in method.fuse(method.student_levels(fs), sizes)] == [
        tuple(t.shape[1:]) for t in ft.stages]
    assert torch.isfinite(method(fs, ft, torch.zeros(1, dtype=torch.long), epoch=1)["reviewkd"].value)


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    return trained_teacher(tmp_path_factory.mktemp("teacher"))


def test_reviewkd_trains_and_resumes_bit_exactly(tmp_path, teacher_weights):
    method = assert_trains_and_resumes(tmp_path, teacher_weights, {"name": "reviewkd", "warmup_epochs": 1})
    assert set(method) >= {"abfs.0.conv1.0.weight", "abfs.1.att_conv.0.bias", "abfs.3.conv2.1.running_var"}
