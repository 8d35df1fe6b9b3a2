"""The trainer's feature-method path: Features in, connectors trained and checkpointed, never exported;
FitNet equal to mdistiller's formula. Each feature method's own parity test is in its test file."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepkd.errors import ConfigError
from deepkd.losses import build_method
from deepkd.models import create_model
from deepkd.models.features import FeatureExtractor, feature_info
from tests.conftest import assert_trains_and_resumes, feature_run, tiny_config, trained_teacher


def _pair(student="resnet8x4", teacher="resnet32x4", seed=0):
    torch.manual_seed(seed)
    s, t = create_model(student, num_classes=10).double(), create_model(teacher, num_classes=10).double().eval()
    return s, t, feature_info(s, (3, 32, 32)), feature_info(t, (3, 32, 32))


def test_fitnet_equals_the_reference_formula_in_float64():
    student, teacher, s_info, t_info = _pair()
    method = build_method("fitnet", student_info=s_info, teacher_info=t_info, hint_layer=2).double()
    images, target = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (6,))
    fs, ft = FeatureExtractor(student)(images), FeatureExtractor(teacher)(images)
    terms = method(fs, ft, target, epoch=1)
    conv, bn = method.regressor[0], method.regressor[1]
    assert (conv.stride, conv.kernel_size) == ((1, 1), (1, 1))  # resnet8x4 and 32x4 stage 2: same 16x16 size
    # mdistiller: 100 * mse(relu(bn(conv(f_s[2]))), f_t[2]) + ce, the BN in training mode
    h = F.conv2d(fs.stages[2], conv.weight, conv.bias)
    mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
    h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight[:, None, None] + bn.bias[:, None, None]
    reference = 100.0 * ((torch.relu(h) - ft.stages[2]) ** 2).mean()
    torch.testing.assert_close(terms["fitnet"].value, reference, rtol=1e-10, atol=0)
    ours = torch.autograd.grad(terms["fitnet"].value, [fs.stages[2], conv.weight], retain_graph=True)
    theirs = torch.autograd.grad(reference, [fs.stages[2], conv.weight])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)  # float64 summation order; the issue asks 1e-6
    assert terms["fitnet"].stream == "target" and terms["ce"].stream == "task"
    torch.testing.assert_close(terms["ce"].value, F.cross_entropy(fs.logits, target))


@pytest.mark.parametrize("student_stage, teacher_size, kind", [(1, 16, "stride 2"), (2, 32, "transposed")])
def test_fitnet_regressor_resamples_like_mdistiller(student_stage, teacher_size, kind):
    from deepkd.losses.feature.connectors import conv_regressor

    size = {1: 32, 2: 16}[student_stage]
    regressor = conv_regressor((8, size, size), (16, teacher_size, teacher_size))
    out = regressor(torch.randn(2, 8, size, size))
    assert out.shape == (2, 16, teacher_size, teacher_size)
    assert isinstance(regressor[0], torch.nn.ConvTranspose2d) == (kind == "transposed")
    with pytest.raises(ConfigError, match="no regressor maps a 4x4"):
        conv_regressor((8, 4, 4), (16, 16, 16))


def test_a_recipe_may_not_set_what_the_trainer_provides(tmp_path):
    with pytest.raises(ValueError, match="method.student_info is set by the trainer"):
        tiny_config(tmp_path, method={"name": "fitnet", "student_info": 1})


@pytest.mark.parametrize("key, value", [("train__teacher_cache", True), ("train__gsnr_every", 5),
                                        ("train__compile", True)])
def test_what_a_feature_method_cannot_use_is_refused_in_one_sentence(tmp_path, key, value):
    with pytest.raises(ValueError, match="does not work with feature method 'fitnet'"):
        tiny_config(tmp_path, method={"name": "fitnet"}, teacher={"name": "cnn_w4", "weights": "x.pt"},
                    **{key: value})


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    return trained_teacher(tmp_path_factory.mktemp("teacher"))


def test_fitnet_trains_and_resumes_bit_exactly(tmp_path, teacher_weights):
    method = assert_trains_and_resumes(tmp_path, teacher_weights, {"name": "fitnet", "hint_layer": 1})
    assert set(method) >= {"regressor.0.weight", "regressor.1.running_mean"}


def test_connectors_are_trained_with_the_student(tmp_path, teacher_weights):
    from deepkd.train.loop import setup_run, train_step

    cfg = feature_run(tmp_path, teacher_weights, {"name": "fitnet", "hint_layer": 1})
    run = setup_run(cfg, tmp_path / "run")
    connector = run.method.regressor[0].weight
    assert any(p is connector for p in run.params)
    assert len(run.params) == len(run.optimizer.param_groups[0]["params"])
    before = connector.detach().clone()
    images, targets = next(iter(run.data.train.iter_epoch(1)))
    terms, _ = train_step(run, images, targets, 1)
    assert set(terms) == {"ce", "fitnet"} and not torch.equal(before, connector.detach())
