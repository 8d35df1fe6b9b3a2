"""``pkt`` (Passalis & Tefas, ECCV 2018): equal to mdistiller's PKT formula in float64, trains and resumes
bit-exactly, refuses a model without a pooled feature."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepkd.errors import ConfigError
from deepkd.features import FeatureInfo
from deepkd.losses import build_method
from tests.conftest import assert_trains_and_resumes, trained_teacher
from tests.conftest import pair_features as _features


def _reference(f_s, f_t, eps=1e-7):
    """mdistiller's pkt_loss written out: cosine kernel in [0, 1], row-normalised, KL(teacher || student)
    averaged over all B^2 entries with eps inside the log."""
    def probabilities(f):
        unit = f / (torch.sqrt((f * f).sum(1, keepdim=True)) + eps)
        kernel = 0.5 * (torch.einsum("id,jd->ij", unit, unit) + 1.0)
        return kernel / kernel.sum(1, keepdim=True)

    p, q = probabilities(f_s), probabilities(f_t)
    return (q * (torch.log(q + eps) - torch.log(p + eps))).sum() / p.numel()


def test_pkt_equals_the_reference_formula_in_float64():
    fs, ft, target, s_info, t_info = _features()
    method = build_method("pkt", student_info=s_info, teacher_info=t_info).double()
    terms = method(fs, ft, target, epoch=1)
    reference = 30000.0 * _reference(fs.pooled, ft.pooled)  # mdistiller's CIFAR-100 feat_weight
    torch.testing.assert_close(terms["pkt"].value, reference, rtol=1e-10, atol=0)
    ours, = torch.autograd.grad(terms["pkt"].value, fs.pooled, retain_graph=True)
    theirs, = torch.autograd.grad(reference, fs.pooled)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)
    assert ours.abs().sum() > 0
    assert terms["pkt"].stream == "target" and terms["ce"].stream == "task"
    torch.testing.assert_close(terms["ce"].value, F.cross_entropy(fs.logits, target), rtol=1e-12, atol=0)
    assert not list(method.parameters()) and not method.state_dict()


def test_pkt_compares_pooled_features_of_different_widths():
    fs, ft, target, s_info, t_info = _features(student="resnet20", batch=4)  # 64 against 256 channels
    method = build_method("pkt", student_info=s_info, teacher_info=t_info, feat_weight=1.0).double()
    torch.testing.assert_close(method(fs, ft, target, epoch=1)["pkt"].value, _reference(fs.pooled, ft.pooled),
                               rtol=1e-10, atol=0)


def test_pkt_refuses_a_model_without_a_pooled_feature_in_one_sentence():
    info = FeatureInfo([8, 16], [(32, 32), (16, 16)], None, False)
    pooled = FeatureInfo([8, 16], [(32, 32), (16, 16)], 16, False)
    with pytest.raises(ConfigError, match="pkt reads the teacher's pooled feature"):
        build_method("pkt", student_info=pooled, teacher_info=info)
    with pytest.raises(ConfigError, match="pkt reads the student's pooled feature"):
        build_method("pkt", student_info=info, teacher_info=pooled)
    with pytest.raises(ConfigError, match="pkt eps must be positive"):
        build_method("pkt", student_info=pooled, teacher_info=pooled, eps=0.0)


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    return trained_teacher(tmp_path_factory.mktemp("teacher"))


def test_pkt_trains_and_resumes_bit_exactly(tmp_path, teacher_weights):
    assert assert_trains_and_resumes(tmp_path, teacher_weights, {"name": "pkt"}) == {}
