"""The parameter-free feature methods AT, NST, SP and KD-SVD: each equal (float64, values and gradients) to
its reference formula written out here with plain torch ops on a real zoo pair, trained and resumed
bit-exactly on the synthetic set, and refusing in one sentence what cannot work with the models."""
from __future__ import annotations

import functools

import pytest
import torch

from deepkd.errors import ConfigError
from deepkd.features import FeatureInfo, Features
from deepkd.losses import build_method
from deepkd.models import create_model
from deepkd.models.features import FeatureExtractor, feature_info
from tests.conftest import assert_trains_and_resumes, trained_teacher


@functools.lru_cache(maxsize=None)
def _features(name):
    """One float64 batch of 4 through zoo model ``name`` (seeded; train mode), computed once per session:
    its Features with their graph, and its FeatureInfo."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).double()
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return FeatureExtractor(model)(images), feature_info(model, (3, 32, 32))


def _run(student_name, teacher_name):
    """Student features (with graph), teacher features (detached: no graph), a target, and both infos."""
    (fs, s_info), (ft, t_info) = _features(student_name), _features(teacher_name)
    teacher = Features(ft.logits.detach(), [f.detach() for f in ft.stages])
    return fs, teacher, torch.tensor([0, 3, 7, 9]), s_info, t_info


def _assert_parity(ours, reference, inputs, rtol=1e-10):
    torch.testing.assert_close(ours, reference, rtol=rtol, atol=0)
    grads = torch.autograd.grad(ours, inputs, retain_graph=True)
    expected = torch.autograd.grad(reference, inputs, retain_graph=True)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


def _pool_to(f, size):
    """Average-pool by an integer factor (what adaptive pooling does when the sizes divide)."""
    b, c, h, w = f.shape
    return f.reshape(b, c, size, h // size, size, w // size).mean((3, 5))


def _same_size(f_s, f_t):
    size = min(f_s.shape[2], f_t.shape[2])
    return _pool_to(f_s, size), _pool_to(f_t, size)


def _check_terms(terms, name, fs, target):
    assert set(terms) == {"ce", name} and terms[name].stream == "target" and terms["ce"].stream == "task"
    torch.testing.assert_close(terms["ce"].value, torch.nn.functional.cross_entropy(fs.logits, target))


# ---------------------------------------------------------------- AT

def reference_at(student_stages, teacher_stages, p=2):
    """sum_stages mean_{b,x} (a_s - a_t)^2, a = A / ||A||_2 per sample, A(x) = (1/C) sum_c f_c(x)^p."""
    total = 0
    for f_s, f_t in zip(student_stages, teacher_stages):
        f_s, f_t = _same_size(f_s, f_t)
        maps = []
        for f in (f_s, f_t):
            a = (f ** p).sum(1).reshape(f.shape[0], -1) / f.shape[1]
            maps.append(a / torch.sqrt((a * a).sum(1, keepdim=True)).clamp_min(1e-12))
        total = total + ((maps[0] - maps[1]) ** 2).sum() / maps[0].numel()
    return total


@pytest.mark.parametrize("student_name, teacher_name", [("resnet8x4", "resnet32x4"),  # same sizes
                                                        ("ShuffleV1", "resnet32x4"),  # teacher pooled
                                                        ("resnet8x4", "ShuffleV1")])  # student pooled
def test_at_equals_the_reference_formula_in_float64(student_name, teacher_name):
    fs, ft, target, s_info, t_info = _run(student_name, teacher_name)
    method = build_method("at", student_info=s_info, teacher_info=t_info)
    assert (method.p, method.feat_weight, method.ce_weight) == (2.0, 1000.0, 1.0)
    assert method.pairs == [(1, 1), (2, 2), (3, 3)]
    terms = method(fs, ft, target, epoch=1)
    _check_terms(terms, "at", fs, target)
    _assert_parity(terms["at"].value, 1000.0 * reference_at(fs.stages[1:], ft.stages[1:]), fs.stages[1:])


def test_at_with_another_p_and_chosen_stages():
    fs, ft, target, s_info, t_info = _run("resnet8x4", "resnet32x4")
    method = build_method("at", student_info=s_info, teacher_info=t_info, p=3, stages=[2, -1], feat_weight=10.0)
    reference = 10.0 * reference_at(fs.stages[2:], ft.stages[2:], p=3)
    _assert_parity(method(fs, ft, target, epoch=1)["at"].value, reference, fs.stages[2:])


# ---------------------------------------------------------------- NST

def reference_nst(student_stages, teacher_stages):
    """sum_stages MMD^2 with k(x, y) = (x . y)^2 between unit-norm channel maps (an all-zero channel stays 0:
    the norm is clamped at 1e-12), averaged over the batch."""
    def k_mean(a, b):
        return (torch.einsum("nix,njx->nij", a, b) ** 2).mean()

    total = 0
    for f_s, f_t in zip(student_stages, teacher_stages):
        f_s, f_t = _same_size(f_s, f_t)
        a, b = f_s.flatten(2), f_t.flatten(2)
        a, b = a / a.norm(dim=2, keepdim=True).clamp_min(1e-12), b / b.norm(dim=2, keepdim=True).clamp_min(1e-12)
        total = total + k_mean(b, b) + k_mean(a, a) - 2 * k_mean(a, b)
    return total


@pytest.mark.parametrize("student_name, teacher_name", [("resnet8x4", "resnet32x4"), ("ShuffleV1", "resnet32x4"),
                                                        ("resnet8x4", "ShuffleV1")])
def test_nst_equals_the_reference_formula_in_float64(student_name, teacher_name):
    fs, ft, target, s_info, t_info = _run(student_name, teacher_name)
    method = build_method("nst", student_info=s_info, teacher_info=t_info)
    assert (method.feat_weight, method.pairs) == (50.0, [(1, 1), (2, 2), (3, 3)])
    terms = method(fs, ft, target, epoch=1)
    _check_terms(terms, "nst", fs, target)
    _assert_parity(terms["nst"].value, 50.0 * reference_nst(fs.stages[1:], ft.stages[1:]), fs.stages[1:])


# ---------------------------------------------------------------- SP

def reference_sp(student_stages, teacher_stages):
    """sum_stages ||G_t - G_s||_F^2 / B^2, G = Q Q^T with rows scaled to unit L2 norm."""
    total = 0
    for f_s, f_t in zip(student_stages, teacher_stages):
        grams = []
        for f in (f_s, f_t):
            q = f.reshape(f.shape[0], -1)
            g = torch.einsum("id,jd->ij", q, q)
            grams.append(g / torch.sqrt((g * g).sum(1, keepdim=True)).clamp_min(1e-12))
        total = total + ((grams[1] - grams[0]) ** 2).sum() / f_s.shape[0] ** 2
    return total


@pytest.mark.parametrize("student_name, teacher_name", [("resnet8x4", "resnet32x4"), ("ShuffleV1", "vgg8")])
def test_sp_equals_the_reference_formula_in_float64(student_name, teacher_name):
    fs, ft, target, s_info, t_info = _run(student_name, teacher_name)
    method = build_method("sp", student_info=s_info, teacher_info=t_info)  # mdistiller: the last stage only
    last_s, last_t = len(s_info.channels) - 1, len(t_info.channels) - 1
    assert (method.feat_weight, method.pairs) == (3000.0, [(last_s, last_t)])
    terms = method(fs, ft, target, epoch=1)
    _check_terms(terms, "sp", fs, target)
    reference = 3000.0 * reference_sp(fs.stages[-1:], ft.stages[-1:])
    _assert_parity(terms["sp"].value, reference, fs.stages[-1:])


def test_sp_on_several_stages_sums_them():
    fs, ft, target, s_info, t_info = _run("resnet8x4", "resnet32x4")
    method = build_method("sp", student_info=s_info, teacher_info=t_info, stages=[1, 2, 3])
    reference = 3000.0 * reference_sp(fs.stages[1:], ft.stages[1:])
    _assert_parity(method(fs, ft, target, epoch=1)["sp"].value, reference, fs.stages[1:])


# ---------------------------------------------------------------- KD-SVD

def _leading(f, n):
    """Per sample (a loop, float64): unit-norm top-n singular values and right singular vectors of [CH, W]."""
    values, vectors = [], []
    for x in f:
        _, s, vh = torch.linalg.svd(x.reshape(-1, x.shape[-1]), full_matrices=False)
        s, v = s[:n], vh[:n].t()
        values.append(s / s.norm())
        vectors.append(v / v.norm(dim=0, keepdim=True))
    return torch.stack(values), torch.stack(vectors)


def _aligned(v_s, v_t):
    """Per sample and teacher vector: the student vector of largest |cosine|, with the cosine's sign."""
    out = []
    for a, b in zip(v_s, v_t):
        cosine = (a.t() @ b).detach()
        best = cosine.abs().argmax(0)
        out.append(torch.stack([a[:, best[j]] * torch.sign(cosine[best[j], j]) for j in range(b.shape[1])], 1))
    return torch.stack(out)


def reference_kdsvd(student_stages, teacher_stages, k=1):
    """sum_i sum_{b,a,c,m} (R_s - R_t)^2 / B, R[b,a,c,m] = exp(-(v^i[b,a,m] - v^{i-1}[b,c,m])^2 / 8)."""
    total, previous = 0, None
    for f_s, f_t in zip(student_stages, teacher_stages):
        s_t, v_t = _leading(f_t, k)
        v_s = _aligned(_leading(f_s, k + 3)[1], v_t) * s_t[:, None, :]
        v_t = v_t * s_t[:, None, :]
        if previous is not None:
            r_s = torch.exp(-(v_s[:, :, None, :] - previous[0][:, None, :, :]) ** 2 / 8)
            r_t = torch.exp(-(v_t[:, :, None, :] - previous[1][:, None, :, :]) ** 2 / 8)
            total = total + ((r_s - r_t) ** 2).sum() / f_s.shape[0]
        previous = (v_s, v_t)
    return total


@pytest.mark.parametrize("student_name, teacher_name", [("resnet8x4", "resnet32x4"), ("wrn_16_2", "wrn_40_2")])
def test_kdsvd_equals_the_reference_formula_in_float64(student_name, teacher_name):
    fs, ft, target, s_info, t_info = _run(student_name, teacher_name)
    method = build_method("kdsvd", student_info=s_info, teacher_info=t_info)
    assert (method.k, method.feat_weight, method.pairs) == (1, 1.0, [(1, 1), (2, 2), (3, 3)])
    terms = method(fs, ft, target, epoch=1)
    _check_terms(terms, "kdsvd", fs, target)
    assert terms["kdsvd"].value.dtype == torch.float64  # float32 features decompose in float32, as mdistiller's
    # the reference also decomposes with torch.linalg.svd (float64, one matrix at a time); both agree to 1e-10
    _assert_parity(terms["kdsvd"].value, reference_kdsvd(fs.stages[1:], ft.stages[1:]), fs.stages[1:])


def test_kdsvd_gradient_matches_finite_differences():
    """The SVD's backward itself, checked against central differences (independent of torch's formula;
    fast mode: along a random direction)."""
    torch.manual_seed(0)
    info = FeatureInfo(channels=[2, 3, 4], sizes=[(6, 6), (6, 6), (5, 5)], pooled=None, preact=False)
    method = build_method("kdsvd", student_info=info, teacher_info=info, k=2)
    shapes = [(2, 2, 6, 6), (2, 3, 6, 6), (2, 4, 5, 5)]
    teacher = Features(torch.zeros(2, 3), [torch.rand(s, dtype=torch.float64) for s in shapes])
    student = [torch.rand(s, dtype=torch.float64, requires_grad=True) for s in shapes[1:]]
    logits, target = torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 1])

    def loss(*stages):
        return method(Features(logits, [teacher.stages[0], *stages]), teacher, target, epoch=1)["kdsvd"].value

    assert torch.autograd.gradcheck(loss, student, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# ---------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def infos():
    return {name: feature_info(create_model(name, num_classes=10), (3, 32, 32))
            for name in ("resnet8x4", "resnet32x4", "vgg8", "ShuffleV1")}


@pytest.mark.parametrize("name, student, teacher, arguments, message", [
    ("at", "resnet8x4", "resnet32x4", {"stages": [4]}, "at: stage 4 does not exist in the student, which has 4"),
    ("at", "resnet8x4", "vgg8", {}, "the student has 4 feature stages and the teacher 5, so name the stages"),
    ("at", "resnet8x4", "resnet32x4", {"stages": []}, "method.stages is empty"),
    ("at", "resnet8x4", "resnet32x4", {"p": 0}, "p must be positive"),
    ("nst", "vgg8", "resnet32x4", {}, "nst: the student has 5 feature stages and the teacher 4"),
    ("nst", "resnet8x4", "vgg8", {"stages": [-6]}, "stage -6 does not exist in the student"),
    ("sp", "vgg8", "resnet32x4", {"stages": [4]}, "sp: stage 4 does not exist in the teacher, which has 4"),
    ("kdsvd", "ShuffleV1", "resnet32x4", {}, "student stage 1 is 16 wide and teacher stage 1 32"),
    ("kdsvd", "resnet8x4", "resnet32x4", {"stages": [3]}, "needs at least two"),
    ("kdsvd", "resnet8x4", "resnet32x4", {"k": 0}, "must be at least 1, got 0"),
])
def test_arguments_that_cannot_work_are_refused_in_one_sentence(infos, name, student, teacher, arguments, message):
    with pytest.raises(ConfigError, match=message) as error:
        build_method(name, student_info=infos[student], teacher_info=infos[teacher], **arguments)
    assert "\n" not in str(error.value)


def test_what_mdistiller_would_silently_truncate_works_when_named(infos):
    """resnet8x4 (4 stages) -> vgg8 (5): mdistiller zips feats[1:]; here the pairing is named."""
    method = build_method("at", student_info=infos["resnet8x4"], teacher_info=infos["vgg8"], stages=[1, 2, 3])
    assert method.pairs == [(1, 1), (2, 2), (3, 3)]
    assert build_method("sp", student_info=infos["resnet8x4"], teacher_info=infos["vgg8"]).pairs == [(3, 4)]


# ---------------------------------------------------------------- training

@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    return trained_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.mark.parametrize("name", ["at", "nst", "sp", "kdsvd"])
def test_trains_and_resumes_bit_exactly(tmp_path, teacher_weights, name):
    # cnn_w4 -> cnn_w4: stages 32x32, 32x32, 16x16, 8x8 (4, 8, 16, 32 channels); mdistiller's defaults fit
    assert assert_trains_and_resumes(tmp_path, teacher_weights, {"name": name}) == {}  # no trainable state
