"""``rkd`` (Park et al., CVPR 2019): equal to mdistiller's RKD formula in float64, trains and resumes
bit-exactly, refuses what cannot work in one sentence."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepkd.errors import ConfigError
from deepkd.features import FeatureInfo
from deepkd.losses import build_method
from tests.conftest import assert_trains_and_resumes, trained_teacher
from tests.conftest import pair_features as _features


def _huber(a, b):
    diff = (a - b).abs()
    return torch.where(diff < 1.0, 0.5 * diff ** 2, diff - 0.5).mean()


def _distances(f, squared):
    """Distances of distinct rows by direct differences (0 on the diagonal), over their mean."""
    n = f.shape[0]
    off = 1.0 - torch.eye(n, dtype=f.dtype)
    square = ((f[:, None, :] - f[None, :, :]) ** 2).sum(-1)
    dist = (square if squared else torch.sqrt(square + torch.eye(n, dtype=f.dtype))) * off
    return dist / (dist.sum() / (n * (n - 1)))


def _angles(f):
    """cos of the angle at i between j and k, over all B^3 triplets (0 where j = i or k = i)."""
    diff = f[None, :, :] - f[:, None, :]  # [i, j] = f_j - f_i
    eye = torch.eye(f.shape[0], dtype=f.dtype)[:, :, None]
    unit = diff / torch.sqrt((diff ** 2).sum(-1, keepdim=True) + eye)  # the zero differences stay 0
    return torch.einsum("ijd,ikd->ijk", unit, unit)


def _reference(f_s, f_t, squared=False, distance=25.0, angle=50.0):
    return (distance * _huber(_distances(f_s, squared), _distances(f_t, squared))
            + angle * _huber(_angles(f_s), _angles(f_t)))


@pytest.mark.parametrize("squared", [False, True])
def test_rkd_equals_the_reference_formula_in_float64(squared):
    fs, ft, target, s_info, t_info = _features()
    method = build_method("rkd", student_info=s_info, teacher_info=t_info, pdist_squared=squared).double()
    terms = method(fs, ft, target, epoch=1)
    reference = 1.0 * _reference(fs.pooled, ft.pooled, squared)  # mdistiller's CIFAR-100: 25, 50, feat 1
    torch.testing.assert_close(terms["rkd"].value, reference, rtol=1e-10, atol=0)
    ours, = torch.autograd.grad(terms["rkd"].value, fs.pooled, retain_graph=True)
    theirs, = torch.autograd.grad(reference, fs.pooled)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-13)
    assert ours.abs().sum() > 0 and torch.isfinite(ours).all()
    assert terms["rkd"].stream == "target" and terms["ce"].stream == "task"
    torch.testing.assert_close(terms["ce"].value, F.cross_entropy(fs.logits, target), rtol=1e-12, atol=0)
    assert not list(method.parameters()) and not method.state_dict()


def test_rkd_weights_scale_each_part():
    fs, ft, target, s_info, t_info = _features(student="resnet20", batch=4)  # 64 against 256 channels
    parts = {}
    for name, weights in {"distance": (1.0, 0.0), "angle": (0.0, 1.0)}.items():
        method = build_method("rkd", student_info=s_info, teacher_info=t_info, feat_weight=2.0,
                              distance_weight=weights[0], angle_weight=weights[1]).double()
        parts[name] = method(fs, ft, target, epoch=1)["rkd"].value
    torch.testing.assert_close(parts["distance"], 2.0 * _huber(_distances(fs.pooled, False),
                                                               _distances(ft.pooled, False)), rtol=1e-10, atol=0)
    torch.testing.assert_close(parts["angle"], 2.0 * _huber(_angles(fs.pooled), _angles(ft.pooled)),
                               rtol=1e-10, atol=0)


def test_rkd_refuses_what_cannot_work_in_one_sentence():
    info = FeatureInfo([8, 16], [(32, 32), (16, 16)], None, False)
    pooled = FeatureInfo([8, 16], [(32, 32), (16, 16)], 16, False)
    with pytest.raises(ConfigError, match="rkd reads the student's pooled feature"):
        build_method("rkd", student_info=info, teacher_info=pooled)
    with pytest.raises(ConfigError, match="rkd reads the teacher's pooled feature"):
        build_method("rkd", student_info=pooled, teacher_info=info)
    with pytest.raises(ConfigError, match="pdist_eps must be positive when pdist_squared is false"):
        build_method("rkd", student_info=pooled, teacher_info=pooled, pdist_eps=0.0)
    build_method("rkd", student_info=pooled, teacher_info=pooled, pdist_eps=0.0, pdist_squared=True)


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    return trained_teacher(tmp_path_factory.mktemp("teacher"))


def test_rkd_trains_and_resumes_bit_exactly(tmp_path, teacher_weights):
    assert assert_trains_and_resumes(tmp_path, teacher_weights, {"name": "rkd"}) == {}
