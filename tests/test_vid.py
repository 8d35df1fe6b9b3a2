"""``vid`` (Ahn et al., CVPR 2019): equal to mdistiller's VID formula in float64 (its regressors, its
fixed variance, its pooling to the smaller map), trains and resumes bit-exactly, refuses what cannot work."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepkd.errors import ConfigError
from deepkd.features import FeatureInfo
from deepkd.losses import build_method
from tests.conftest import assert_trains_and_resumes, trained_teacher
from tests.conftest import pair_features as _features


def _shrink(x, size):
    """Average over r x r blocks (what adaptive pooling does when ``size`` divides the map)."""
    r = x.shape[2] // size
    return x.unflatten(3, (size, r)).unflatten(2, (size, r)).mean(dim=(3, 5))


def _reference(fs, ft, method, eps=1e-5):
    """mdistiller's vid_loss summed over feats[1:], written out with the method's own weights."""
    total = 0.0
    for k, head in enumerate(method.heads, start=1):
        s, t = fs.stages[k], ft.stages[k]
        size = min(s.shape[2], t.shape[2])
        s, t = _shrink(s, size), _shrink(t, size)
        w1, w2, w3 = (head.mean[i].weight for i in (0, 2, 4))
        mean = F.conv2d(torch.relu(F.conv2d(torch.relu(F.conv2d(s, w1)), w2)), w3)
        var = (F.softplus(head.log_scale) + eps)[None, :, None, None]
        total = total + (0.5 * (mean - t) ** 2 / var + 0.5 * torch.log(var)).mean()
    return total


@pytest.mark.parametrize("student, teacher", [("resnet8x4", "resnet32x4"),  # same sizes
                                              ("ShuffleV1", "resnet32x4"),  # the teacher's maps pooled
                                              ("resnet8x4", "vgg8")])  # the student's pooled; teacher has 5 stages
def test_vid_equals_the_reference_formula_in_float64(student, teacher):
    fs, ft, target, s_info, t_info = _features(student, teacher)
    method = build_method("vid", student_info=s_info, teacher_info=t_info).double()
    assert len(method.heads) == len(s_info.channels) - 1
    terms = method(fs, ft, target, epoch=1)
    reference = 1.0 * _reference(fs, ft, method)  # mdistiller's CIFAR-100 feat_weight 1
    torch.testing.assert_close(terms["vid"].value, reference, rtol=1e-10, atol=0)
    weights = [p for p in method.parameters()]
    assert len(weights) == 3 * len(method.heads)  # the conv weights only: the variance is not trained
    inputs = [*fs.stages[1:], *weights]
    ours = torch.autograd.grad(terms["vid"].value, inputs, retain_graph=True)
    theirs = torch.autograd.grad(reference, inputs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
        assert a.abs().sum() > 0
    assert terms["vid"].stream == "target" and terms["ce"].stream == "task"
    torch.testing.assert_close(terms["ce"].value, F.cross_entropy(fs.logits, target), rtol=1e-12, atol=0)


def test_vid_regressors_and_variance_have_mdistillers_layout():
    s_info = FeatureInfo([4, 8, 16], [(32, 32), (16, 16), (8, 8)], 16, True)
    t_info = FeatureInfo([6, 12, 24], [(32, 32), (16, 16), (8, 8)], 24, True)
    method = build_method("vid", student_info=s_info, teacher_info=t_info)
    for head, (c_s, c_t) in zip(method.heads, [(8, 12), (16, 24)]):
        convs = [head.mean[i] for i in (0, 2, 4)]
        assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == \
            [(c_s, c_t, (1, 1), None), (c_t, c_t, (1, 1), None), (c_t, c_t, (1, 1), None)]
        assert all(isinstance(head.mean[i], torch.nn.ReLU) for i in (1, 3)) and len(head.mean) == 5
        assert head.log_scale.shape == (c_t,) and not isinstance(head.log_scale, torch.nn.Parameter)
        expected = torch.full((c_t,), math.log(math.exp(5.0 - 1e-5) - 1.0))  # float32, as mdistiller's
        assert torch.equal(head.log_scale, expected)
        torch.testing.assert_close(head.variance(), torch.full((c_t,), 5.0), rtol=1e-6, atol=0)
    assert {"heads.0.log_scale", "heads.1.mean.4.weight"} <= set(method.state_dict())
    learned = build_method("vid", student_info=s_info, teacher_info=t_info, learn_variance=True, init_pred_var=2.0)
    assert isinstance(learned.heads[0].log_scale, torch.nn.Parameter)
    assert any(p is learned.heads[1].log_scale for p in learned.parameters())
    torch.testing.assert_close(learned.heads[0].variance(), torch.full((12,), 2.0), rtol=1e-6, atol=0)


def test_vid_refuses_what_cannot_work_in_one_sentence():
    three = FeatureInfo([4, 8, 16], [(32, 32), (16, 16), (8, 8)], 16, True)
    two = FeatureInfo([4, 8], [(32, 32), (16, 16)], 8, True)
    with pytest.raises(ConfigError, match="the student has 3 feature stages and the teacher only 2"):
        build_method("vid", student_info=three, teacher_info=two)
    with pytest.raises(ConfigError, match="vid distills the stages after the stem"):
        build_method("vid", student_info=FeatureInfo([4], [(32, 32)], 4, True), teacher_info=two)
    with pytest.raises(ConfigError, match="vid needs 0 <= eps < init_pred_var"):
        build_method("vid", student_info=three, teacher_info=three, init_pred_var=0.0)
    assert len(build_method("vid", student_info=two, teacher_info=three).heads) == 1  # a deeper teacher: first stages


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    return trained_teacher(tmp_path_factory.mktemp("teacher"))


def test_vid_trains_and_resumes_bit_exactly(tmp_path, teacher_weights):
    method = assert_trains_and_resumes(tmp_path, teacher_weights, {"name": "vid"})
    assert set(method) == {f"heads.{i}.{name}" for i in range(3)
                           for name in ("mean.0.weight", "mean.2.weight", "mean.4.weight", "log_scale")}
    for i in range(3):  # mdistiller never trains the variance: it stays at init_pred_var
        assert torch.equal(method[f"heads.{i}.log_scale"], torch.full_like(method[f"heads.{i}.log_scale"],
                                                                           math.log(math.exp(5.0 - 1e-5) - 1.0)))


def test_vid_regressors_are_trained_with_the_student(tmp_path, teacher_weights):
    from deepkd.train.loop import setup_run, train_step
    from tests.conftest import feature_run

    run = setup_run(feature_run(tmp_path, teacher_weights, {"name": "vid"}), tmp_path / "run")
    weight = run.method.heads[2].mean[4].weight
    assert any(p is weight for p in run.params)
    assert not any(p is run.method.heads[0].log_scale for p in run.params)
    before = weight.detach().clone()
    images, targets = next(iter(run.data.train.iter_epoch(1)))
    terms, _ = train_step(run, images, targets, 1)
    assert set(terms) == {"ce", "vid"} and not torch.equal(before, weight.detach())
