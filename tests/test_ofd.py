"""OFD (Heo et al., ICCV 2019) equal to mdistiller's formula; its margins from the right teacher BatchNorms."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepkd.errors import ConfigError
from deepkd.features import FeatureInfo
from deepkd.losses import build_method
from deepkd.losses.feature.ofd import bn_before_relu, gaussian_margin
from deepkd.models import create_model
from deepkd.models.features import FeatureExtractor, feature_info
from tests.conftest import assert_trains_and_resumes, trained_teacher


def _randomize_batchnorms(model, seed):
    """Teacher BNs with varied (and some negative) gammas, large betas: margins of both branches."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = (torch.rand(c, generator=gen, dtype=torch.float64) * 3 - 1.5).to(m.weight)
            m.bias.data = (torch.randn(c, generator=gen, dtype=torch.float64) * 2).to(m.bias)
            m.running_mean = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.1).to(m.running_mean)
            m.running_var = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(m.running_var)


def _reference_margin(bn):
    """mdistiller's margin, written out with scipy's normal CDF, as a FloatTensor."""
    norm = pytest.importorskip("scipy.stats").norm
    out = []
    for s, m in zip(bn.weight.tolist(), bn.bias.tolist()):
        s = abs(s)
        if norm.cdf(-m / s) > 0.001:
            out.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m)
        else:
            out.append(-3 * s)
    return torch.tensor(out, dtype=torch.float32)


def _reference_ofd(s_pre, t_pre, connectors, margins):
    """mdistiller's ofd_loss: connector (conv, BN on batch statistics), teacher pooled to the student's size,
    three masked squared-error terms, abs, mean over the batch, sum, / 2^(n-i-1)."""
    n, total = len(connectors), 0.0
    for i, (seq, s, t, margin) in enumerate(zip(connectors, s_pre, t_pre, margins)):
        conv, bn = seq[0], seq[1]
        h = F.conv2d(s, conv.weight, None, 1, conv.padding)
        mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
        h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight[:, None, None] + bn.bias[:, None, None]
        t = F.adaptive_avg_pool2d(t, h.shape[-2:])
        m = margin.to(h)[None, :, None, None]
        loss = ((h - m) ** 2 * ((h > m) & (t <= m)).to(h)
                + (h - t) ** 2 * ((h > t) & (t > m) & (t <= 0)).to(h)
                + (h - t) ** 2 * (t > 0).to(h))
        total = total + torch.abs(loss).mean(dim=0).sum() / 2 ** (n - i - 1)
    return total


@pytest.mark.parametrize("student_name, teacher_name", [("resnet8x4", "resnet32x4"), ("vgg8", "resnet32x4"),
                                                        ("resnet8x4", "wrn_16_2")])
def test_ofd_equals_the_reference_formula_in_float64(student_name, teacher_name):
    torch.manual_seed(0)
    student = create_model(student_name, num_classes=10).double()
    teacher = create_model(teacher_name, num_classes=10).double().eval()
    _randomize_batchnorms(teacher, 1)
    s_info, t_info = feature_info(student, (3, 32, 32)), feature_info(teacher, (3, 32, 32))
    method = build_method("ofd", student_info=s_info, teacher_info=t_info, teacher_model=teacher).double()
    images, target = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    fs = FeatureExtractor(student)(images)
    with torch.no_grad():
        ft = FeatureExtractor(teacher)(images)
    terms = method(fs, ft, target, epoch=1)
    # mdistiller's bn_before_relu of these teachers, written out
    bns = ([getattr(teacher, f"layer{k}")[-1].bn2 for k in (1, 2, 3)] if teacher_name.startswith("resnet")
           else [teacher.block2.layer[0].bn1, teacher.block3.layer[0].bn1, teacher.bn1])
    margins = [_reference_margin(bn) for bn in bns]
    for ours, theirs in zip(method.margins(), margins):
        assert torch.equal(ours.float(), theirs)
    assert any((m == -3 * b.weight.abs().float()).any() for m, b in zip(margins, bns))  # both margin branches
    s_pre, t_pre = fs.preact[1:][-3:], ft.preact[1:][-3:]
    reference = 0.001 * _reference_ofd(s_pre, t_pre, method.connectors, margins)
    torch.testing.assert_close(terms["ofd"].value, reference, rtol=1e-10, atol=0)
    weights = [c[0].weight for c in method.connectors] + [c[1].weight for c in method.connectors]
    ours = torch.autograd.grad(terms["ofd"].value, [*s_pre, *weights], retain_graph=True)
    theirs = torch.autograd.grad(reference, [*s_pre, *weights])
    for a, b in zip(ours, theirs):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert terms["ofd"].stream == "target" and terms["ce"].stream == "task"
    torch.testing.assert_close(terms["ce"].value, F.cross_entropy(fs.logits, target))


def test_connectors_are_mdistillers():
    s_info = FeatureInfo([8, 16, 32, 64], [(32, 32), (32, 32), (16, 16), (8, 8)], 64, True)
    teacher = create_model("resnet8x4", num_classes=10)
    t_info = feature_info(teacher, (3, 32, 32))
    method = build_method("ofd", student_info=s_info, teacher_info=t_info, teacher_model=teacher, kernel_size=3)
    assert len(method.connectors) == 3 and not any(k.startswith("teacher") for k in method.state_dict())
    for seq, s, t in zip(method.connectors, [16, 32, 64], [64, 128, 256]):
        conv, bn = seq
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (s, t, (3, 3), (1, 1))
        assert conv.bias is None and torch.equal(bn.weight, torch.ones(t)) and torch.equal(bn.bias, torch.zeros(t))
        assert abs(conv.weight.std().item() / math.sqrt(2.0 / (9 * t)) - 1) < 0.1


def test_margin_is_the_mean_of_the_negative_part():
    weight = torch.tensor([1.0, -2.0, 0.5, 1.0, 0.0, 0.0])
    bias = torch.tensor([0.0, 1.0, 3.0, -1.0, -0.5, 0.7])
    margin = gaussian_margin(weight, bias)
    assert margin.dtype == torch.float32
    torch.testing.assert_close(margin[0], torch.tensor(-math.sqrt(2 / math.pi)))  # half-normal mean
    assert margin[2] == -1.5  # P(x < 0) = Phi(-6) < 0.001: -3 |gamma|
    assert margin[4] == -0.5 and margin[5] == 0.0  # gamma = 0: the formula's limit min(beta, 0)
    x = torch.randn(2_000_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 + 1
    torch.testing.assert_close(margin[1].double(), x[x < 0].mean(), rtol=3e-3, atol=0)
    bn = torch.nn.BatchNorm2d(4)
    bn.weight.data, bn.bias.data = weight[:4].clone(), bias[:4].clone()
    assert torch.equal(margin[:4], _reference_margin(bn))


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "ResNet18", "ResNet50", "wrn_16_1", "vgg8",  # resnet18/50:
                                  "MobileNetV2", "ShuffleV1", "cnn_w4", "resnet18", "resnet50"])  # torchvision
def test_each_margin_comes_from_the_batchnorm_that_feeds_that_preactivation(name):
    # moving one BN's bias by delta moves the pre-activation it feeds by exactly delta (output + shortcut)
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    bns = bn_before_relu(model)
    images = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        before = FeatureExtractor(model)(images).preact[1:]
        assert len(bns) == len(before)
        for i, bn in enumerate(bns):
            delta = torch.randn(bn.num_features)
            bn.bias += delta
            after = FeatureExtractor(model)(images).preact[1:]
            bn.bias -= delta
            torch.testing.assert_close(after[i] - before[i], delta[:, None, None].expand_as(before[i]),
                                       rtol=0, atol=1e-4)


def _infos(student, teacher):
    s, t = create_model(student, num_classes=10), create_model(teacher, num_classes=10)
    return feature_info(s, (3, 32, 32)), feature_info(t, (3, 32, 32)), t


@pytest.mark.parametrize("student, teacher, kernel_size, message", [
    ("ShuffleV2", "resnet8x4", 1, "this student does not expose"),
    ("resnet8x4", "ShuffleV2", 1, "which ShuffleNetV2 does not expose"),
    ("resnet8x4", "cnn_w8_plain", 1, "'stages.1.0' is a Conv2d"),
    ("resnet8x4", "resnet8x4", 0, "kernel_size must be at least 1"),
])
def test_what_cannot_work_is_refused_in_one_sentence(student, teacher, kernel_size, message):
    s_info, t_info, t = _infos(student, teacher)
    with pytest.raises(ConfigError, match=message):
        build_method("ofd", student_info=s_info, teacher_info=t_info, teacher_model=t, kernel_size=kernel_size)


def test_an_unknown_teacher_architecture_is_refused():
    s_info, t_info, _ = _infos("resnet8x4", "resnet8x4")
    with pytest.raises(ConfigError, match="deepkd knows only for .* not Sequential"):
        build_method("ofd", student_info=s_info, teacher_info=t_info, teacher_model=torch.nn.Sequential())
    with pytest.raises(ConfigError, match="add a teacher section"):
        build_method("ofd", student_info=s_info)


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    return trained_teacher(tmp_path_factory.mktemp("teacher"))


def test_teacher_mode_is_train_by_default_and_checked():
    s_info, t_info, t = _infos("resnet8x4", "resnet32x4")
    assert build_method("ofd", student_info=s_info, teacher_info=t_info, teacher_model=t).teacher_mode == "train"
    chosen = build_method("ofd", student_info=s_info, teacher_info=t_info, teacher_model=t, teacher_mode="eval")
    assert chosen.teacher_mode == "eval"
    with pytest.raises(ConfigError, match="ofd teacher_mode 'training' is not one of eval, train"):
        build_method("ofd", student_info=s_info, teacher_info=t_info, teacher_model=t, teacher_mode="training")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_teacher_runs_in_the_methods_mode_for_the_training_forward_only(mode):
    """mdistiller's OFD.train leaves the teacher in training mode: batch statistics, running ones moving;
    after the forward the teacher is back in eval mode (its evaluation, the teacher-accuracy check)."""
    import copy

    from deepkd.train.forward import forward_pair

    torch.manual_seed(0)
    student, teacher = create_model("resnet8x4", num_classes=10), create_model("resnet8x4", num_classes=10).eval()
    images = torch.randn(4, 3, 32, 32) * 2 + 1  # far from the fresh running statistics (0, 1)
    reference = copy.deepcopy(teacher).train(mode == "train")
    with torch.no_grad():
        expected = FeatureExtractor(reference)(images)
    before = copy.deepcopy(teacher.state_dict())
    _, out, _ = forward_pair(FeatureExtractor(student), FeatureExtractor(teacher), images, teacher_mode=mode)
    assert not teacher.training and all(not m.training for m in teacher.modules())
    for ours, theirs in zip(out.preact, expected.preact):
        assert torch.equal(ours, theirs) and not ours.requires_grad
    after = teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in reference.state_dict().items())
    assert any(not torch.equal(after[k], v) for k, v in before.items()) == (mode == "train")


def test_ofd_trains_and_resumes_bit_exactly(tmp_path, teacher_weights):
    """The default, a training-mode teacher: its BatchNorm statistics move once per training step (not in
    evaluations) and are checkpointed, so a resumed run ends with the same ones."""
    method = assert_trains_and_resumes(tmp_path, teacher_weights, {"name": "ofd"})
    assert set(method) >= {"connectors.2.0.weight", "connectors.0.1.running_mean", "margin0", "margin2"}
    teacher = torch.load(teacher_weights)["model"]  # cnn_w4: stage k's BatchNorm is stages.k.1
    for i in range(3):
        expected = gaussian_margin(teacher[f"stages.{i + 1}.1.weight"], teacher[f"stages.{i + 1}.1.bias"])
        assert torch.equal(method[f"margin{i}"], expected)
    teacher_state = torch.load(teacher_weights)["model"]
    moved = torch.load(tmp_path / "a" / "runs" / "tiny" / "seed3" / "last.pt")["teacher_buffers"]
    assert set(moved) == {k for k in teacher_state if "running" in k or "num_batches" in k}
    steps = 2 * 160 // 32  # two epochs of the tiny synthetic run
    assert int(moved["stages.1.1.num_batches_tracked"]) == int(teacher_state["stages.1.1.num_batches_tracked"]) + steps
    assert not torch.equal(moved["stages.1.1.running_mean"], teacher_state["stages.1.1.running_mean"])


def test_ofd_with_an_eval_mode_teacher_trains_and_resumes_bit_exactly(tmp_path, teacher_weights):
    assert_trains_and_resumes(tmp_path, teacher_weights, {"name": "ofd", "teacher_mode": "eval"})
    assert "teacher_buffers" not in torch.load(tmp_path / "a" / "runs" / "tiny" / "seed3" / "last.pt")
