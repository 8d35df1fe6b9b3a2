"""CRD (Tian et al., ICLR 2020): loss and gradients equal to mdistiller's formula, its memory update and Z,
negatives drawn as mdistiller's CIFAR100InstanceSample draws them, trains and resumes bit-exactly."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepkd.errors import ConfigError
from deepkd.features import FeatureInfo
from deepkd.losses import build_method
from deepkd.models import create_model
from deepkd.models.features import FeatureExtractor, feature_info
from tests.conftest import assert_trains_and_resumes, trained_teacher

N, CLASSES, K = 40, 10, 16
LABELS = torch.arange(N) % CLASSES


def _pair(seed=0):
    torch.manual_seed(seed)
    s, t = create_model("resnet8x4", num_classes=CLASSES).double(), create_model("resnet32x4", num_classes=CLASSES)
    t = t.double().eval()
    return s, t, feature_info(s, (3, 32, 32)), feature_info(t, (3, 32, 32))


def _method(s_info, t_info, labels=LABELS, **changes):
    arguments = {"nce_k": K, "feat_dim": 16, **changes}
    return build_method("crd", student_info=s_info, teacher_info=t_info, num_samples=len(labels),
                        train_labels=labels, **arguments)


def _info(pooled=8):
    return FeatureInfo(channels=[4, 8], sizes=[(8, 8), (4, 4)], pooled=pooled, preact=False)


def _reference(pooled_s, pooled_t, method, memory_s, memory_t, index, contrast, z=None):
    """mdistiller's CRD written out: embeddings, scores, Z, NCE loss; and the banks after the update."""
    def embed(x, linear):
        h = x @ linear.weight.T + linear.bias
        return h / torch.sqrt((h * h).sum(1, keepdim=True))

    v_s, v_t = embed(pooled_s, method.embed_s.linear), embed(pooled_t, method.embed_t.linear)
    out_s = torch.exp(torch.einsum("bkd,bd->bk", memory_t[contrast], v_s) / 0.07)
    out_t = torch.exp(torch.einsum("bkd,bd->bk", memory_s[contrast], v_t) / 0.07)
    if z is None:
        z = (out_s.detach().mean() * N, out_t.detach().mean() * N)
    c = contrast.shape[1] - 1
    noise = c / N

    def nce(p):
        first = torch.log(p[:, 0] / (p[:, 0] + noise + 1e-7)).sum()
        rest = torch.log(noise / (p[:, 1:] + noise + 1e-7)).sum()
        return -(first + rest) / p.shape[0]

    loss = nce(out_s / z[0]) + nce(out_t / z[1])
    new_s, new_t = memory_s.clone(), memory_t.clone()
    for bank, v in ((new_s, v_s.detach()), (new_t, v_t.detach())):
        row = 0.5 * bank[index] + 0.5 * v
        bank[index] = row / row.norm(dim=1, keepdim=True)
    return loss, z, new_s, new_t


def test_crd_equals_the_reference_formula_in_float64():
    student, teacher, s_info, t_info = _pair()
    method = _method(s_info, t_info, feat_dim=128).double()
    images, index = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.tensor([3, 17, 0, 38, 21, 9])
    fs, ft = FeatureExtractor(student)(images), FeatureExtractor(teacher)(images)
    contrast = method.sample_contrast(index)
    memory_s, memory_t = method.memory_s.clone(), method.memory_t.clone()
    loss = method.contrast_loss(fs.pooled, ft.pooled, index, contrast)
    reference, z, new_s, new_t = _reference(fs.pooled, ft.pooled, method, memory_s, memory_t, index, contrast)
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=0)
    weights = [fs.pooled, method.embed_s.linear.weight, method.embed_s.linear.bias, method.embed_t.linear.weight]
    ours = torch.autograd.grad(loss, weights, retain_graph=True)
    theirs = torch.autograd.grad(reference, weights)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    # Z is set from the first batch and kept; the banks' rows of the batch moved, the others did not
    torch.testing.assert_close(method.z, torch.stack(z), rtol=1e-12, atol=0)
    torch.testing.assert_close(method.memory_s, new_s, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(method.memory_t, new_t, rtol=1e-12, atol=1e-15)
    # a second batch divides by the stored Z and reads the updated banks
    index2 = torch.tensor([1, 2, 4, 5])
    contrast2 = method.sample_contrast(index2)
    loss2 = method.contrast_loss(fs.pooled[:4], ft.pooled[:4], index2, contrast2)
    reference2, *_ = _reference(fs.pooled[:4], ft.pooled[:4], method, new_s, new_t, index2, contrast2, z=z)
    torch.testing.assert_close(loss2, reference2, rtol=1e-10, atol=0)


def test_forward_terms_are_ce_and_the_weighted_crd_on_the_sampled_rows():
    student, teacher, s_info, t_info = _pair(1)
    method = _method(s_info, t_info).double()
    images, index = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([5, 11, 30, 2])
    fs, ft = FeatureExtractor(student)(images), FeatureExtractor(teacher)(images)
    target = LABELS[index]
    memory_s, memory_t = method.memory_s.clone(), method.memory_t.clone()
    torch.manual_seed(7)
    terms = method(fs, ft, target, epoch=1, index=index)
    torch.manual_seed(7)
    contrast = method.sample_contrast(index)
    reference, *_ = _reference(fs.pooled, ft.pooled, method, memory_s, memory_t, index, contrast)
    torch.testing.assert_close(terms["crd"].value, 0.8 * reference, rtol=1e-10, atol=0)
    torch.testing.assert_close(terms["ce"].value, F.cross_entropy(fs.logits, target))
    assert terms["crd"].stream == "target" and terms["ce"].stream == "task"


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_negatives_are_distinct_samples_of_other_classes(mode):
    labels = torch.tensor([0] * 9 + [1] * 2 + [2] * 5 + [3] * 4)  # uneven classes: 20 samples
    method = _method(_info(), _info(), labels=labels, mode=mode, nce_k=11)  # 20 - 9: all of class 0's negatives
    index = torch.arange(20)
    torch.manual_seed(0)
    contrast = method.sample_contrast(index)
    assert contrast.shape == (20, 12)
    negatives = contrast[:, 1:]
    assert (labels[negatives] != labels[index][:, None]).all()
    assert all(len(set(row.tolist())) == 11 for row in negatives)
    assert set(negatives[0].tolist()) == set(range(9, 20))  # class 0: every negative once
    if mode == "exact":
        assert torch.equal(contrast[:, 0], index)
    else:
        assert torch.equal(labels[contrast[:, 0]], labels[index])
    torch.manual_seed(0)
    assert torch.equal(method.sample_contrast(index), contrast)  # the seed fixes the draw


def test_negatives_and_relaxed_positives_are_uniform():
    labels = torch.tensor([0] * 4 + [1] * 12)
    method = _method(_info(), _info(), labels=labels, mode="relax", nce_k=3)
    torch.manual_seed(0)
    contrast = method.sample_contrast(torch.zeros(3000, dtype=torch.long))  # sample 0, class 0, 3000 times
    negatives = torch.bincount(contrast[:, 1:].reshape(-1), minlength=16)
    assert negatives[:4].sum() == 0
    expected = 3000 * 3 / 12
    assert ((negatives[4:] - expected).abs() < 0.1 * expected).all(), negatives
    positives = torch.bincount(contrast[:, 0], minlength=16)
    assert positives[4:].sum() == 0 and ((positives[:4] - 750).abs() < 75).all(), positives


def test_banks_start_uniform_in_mdistillers_range_and_z_unset():
    method = _method(_info(), _info(12), feat_dim=27)
    bound = 1.0 / math.sqrt(27 / 3)
    for bank in (method.memory_s, method.memory_t):
        assert bank.shape == (N, 27) and bank.abs().max() <= bound and bank.abs().max() > 0.9 * bound
    assert not torch.equal(method.memory_s, method.memory_t)
    assert method.z.tolist() == [-1.0, -1.0]
    assert method.embed_t.linear.in_features == 12 and method.embed_s.linear.out_features == 27
    assert set(method.state_dict()) == {"embed_s.linear.weight", "embed_s.linear.bias", "embed_t.linear.weight",
                                        "embed_t.linear.bias", "memory_s", "memory_t", "z"}


def test_what_cannot_work_is_refused_in_one_sentence():
    with pytest.raises(ConfigError, match="nce_k=37 exceeds the 36 samples outside the largest class"):
        _method(_info(), _info(), nce_k=37)
    with pytest.raises(ConfigError, match="crd mode 'loose' is not one of exact, relax"):
        _method(_info(), _info(), mode="loose")
    with pytest.raises(ConfigError, match="crd needs the pooled features"):
        _method(_info(None), _info())
    with pytest.raises(ConfigError, match="40 samples but labels of shape"):
        build_method("crd", student_info=_info(), teacher_info=_info(), num_samples=40, train_labels=LABELS[:30])


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    return trained_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_crd_trains_and_resumes_bit_exactly(tmp_path, teacher_weights, mode):
    method = assert_trains_and_resumes(tmp_path, teacher_weights, {"name": "crd", "nce_k": 64, "mode": mode})
    assert set(method) == {"embed_s.linear.weight", "embed_s.linear.bias", "embed_t.linear.weight",
                           "embed_t.linear.bias", "memory_s", "memory_t", "z"}
    assert method["memory_s"].shape == (160, 128) and (method["z"] > 0).all()
    # every sample was seen: its rows were written back onto the unit sphere
    torch.testing.assert_close(method["memory_t"].norm(dim=1), torch.ones(160))


def test_a_too_large_nce_k_for_the_synthetic_set_is_refused(tmp_path, teacher_weights):
    from deepkd.train.loop import train
    from tests.conftest import feature_run

    with pytest.raises(ConfigError, match="lower method.nce_k"):
        train(feature_run(tmp_path, teacher_weights, {"name": "crd", "nce_k": 16384}))


def test_crd_on_a_streaming_image_folder_trains_and_resumes_bit_exactly(tmp_path, colour_run):
    """ImageNet's path: the image folder streamed through DataLoader workers' loader (in_memory: off), 24
    images in batches of 4, so the stop at step 7 resumes epoch 2 at its batch 1."""
    data = {"dataset": "imagefolder", "root": str(colour_run.parents[2] / "data"), "image_size": 32,
            "crop": "pad_crop", "batch_size": 4, "eval_batch_size": 33, "num_workers": 0, "in_memory": "off"}
    method = assert_trains_and_resumes(tmp_path, str(colour_run / "best.pt"), {"name": "crd", "nce_k": 12},
                                       data=data)
    assert method["memory_s"].shape == (24, 128) and (method["z"] > 0).all()
    torch.testing.assert_close(method["memory_t"].norm(dim=1), torch.ones(24))  # every sample's row was written


def test_a_loader_without_sample_indices_is_refused_by_name(tmp_path):
    from types import SimpleNamespace

    from deepkd.train.build import build_method as build_from_config
    from tests.conftest import feature_run

    cfg = feature_run(tmp_path, "teacher.pt", {"name": "crd"}).method
    with pytest.raises(ConfigError, match=r"method 'crd' needs each training sample's index, which this dataset's "
                                          r"training loader \(list\) does not give"):
        build_from_config(cfg, data=SimpleNamespace(train=[]))
