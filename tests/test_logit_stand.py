"""Logit standardisation (Sun et al., CVPR 2024): ``F.standardize`` and every logit method's
``logit_stand`` option (off: the method as before; on: the method on z-scored logits, CE on raw ones)."""
import math

import pytest
import torch

from deepkd.losses import build_method, total_loss
from deepkd.losses import crld as crld_module
from deepkd.losses import functional as F
from deepkd.losses import mlkd as mlkd_module

ONE_VIEW = ["kd", "dkd", "dtkd", "dtkd_dkd", "deepkd_kd", "deepkd_dkd", "deepkd_dtkd", "deepkd"]
TWO_VIEW = ["mlkd", "deepkd_mlkd", "crld", "deepkd_crld"]
TOPK = {"topk": True, "topk_ramp_end": 150}


def inputs(views=1, batch=8, classes=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lead = (2, batch) if views == 2 else (batch,)
    student = torch.randn(*lead, classes, generator=generator, dtype=torch.float64) * 2 + 1.5
    teacher = torch.randn(*lead, classes, generator=generator, dtype=torch.float64) * 3 + 2.0
    target = torch.randint(0, classes, (batch,), generator=generator)
    return student.requires_grad_(True), teacher, target


def test_standardize_is_the_z_score_with_the_unbiased_deviation():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]], dtype=torch.float64)
    # row 1: mean 2, unbiased variance (1 + 0 + 1) / 2 = 1; row 2: mean 2, variance (4 + 4 + 16) / 2 = 12
    std = [1.0, math.sqrt(12.0)]
    expected = torch.tensor([[-1.0 / (std[0] + 1e-7), 0.0, 1.0 / (std[0] + 1e-7)],
                             [-2.0 / (std[1] + 1e-7), -2.0 / (std[1] + 1e-7), 4.0 / (std[1] + 1e-7)]],
                            dtype=torch.float64)
    torch.testing.assert_close(F.standardize(z), expected, rtol=1e-15, atol=0)
    assert F.standardize(z.half()).dtype == torch.float32  # half computed in float32
    with pytest.raises(ValueError, match="C >= 2"):
        F.standardize(torch.ones(4, 1))


def test_kd_with_logit_stand_on_hand_computed_numbers():
    student = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]], dtype=torch.float64)
    teacher = torch.tensor([[3.0, 1.0, 2.0], [4.0, 1.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([2, 0])
    r3, eps = math.sqrt(3.0), 1e-7
    # z-scores by hand (mean 2 in every row): unbiased deviations 1, 2 sqrt(3) (student) and 1, sqrt(3) (teacher)
    zs = [[-1 / (1 + eps), 0.0, 1 / (1 + eps)], [-2 / (2 * r3 + eps), -2 / (2 * r3 + eps), 4 / (2 * r3 + eps)]]
    zt = [[1 / (1 + eps), -1 / (1 + eps), 0.0], [2 / (r3 + eps), -1 / (r3 + eps), -1 / (r3 + eps)]]
    temperature, kd_weight, ce_weight = 2.0, 9.0, 0.1

    def log_softmax(row):
        norm = math.log(sum(math.exp(v / temperature) for v in row))
        return [v / temperature - norm for v in row]

    kl = [sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_softmax(t), log_softmax(s))) for s, t in zip(zs, zt)]
    expected_kd = kd_weight * temperature ** 2 * sum(kl) / 2
    raw_ce = [-(student[0, 2] - torch.logsumexp(student[0], 0)), -(student[1, 0] - torch.logsumexp(student[1], 0))]
    expected_ce = ce_weight * sum(float(v) for v in raw_ce) / 2
    method = build_method("kd", temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight, logit_stand=True)
    terms = method(student, teacher, target, epoch=1)
    assert terms["kd"].value.item() == pytest.approx(expected_kd, rel=1e-12)
    assert terms["ce"].value.item() == pytest.approx(expected_ce, rel=1e-12)


def _values_and_grad(method, student, teacher, target, epoch=30):
    terms = method(student, teacher, target, epoch=epoch)
    grad, = torch.autograd.grad(total_loss(terms), student)
    return {k: t.value.detach() for k, t in terms.items()}, {k: t.stream for k, t in terms.items()}, grad


@pytest.mark.parametrize("name", ONE_VIEW + TWO_VIEW)
@pytest.mark.parametrize("extra", [{}, TOPK], ids=["plain", "topk"])
def test_off_leaves_every_method_bit_identical(name, extra):
    if extra and name in ("kd", "dtkd", "mlkd", "crld"):
        pytest.skip("no dynamic top-k mask")
    student, teacher, target = inputs(views=2 if name in TWO_VIEW else 1)
    before = _values_and_grad(build_method(name, **extra), student, teacher, target)
    off = _values_and_grad(build_method(name, logit_stand=False, **extra), student, teacher, target)
    assert before[0].keys() == off[0].keys() and before[1] == off[1]
    for key in before[0]:
        assert torch.equal(before[0][key], off[0][key]), key
    assert torch.equal(before[2], off[2])


@pytest.mark.parametrize("name", ONE_VIEW)
@pytest.mark.parametrize("extra", [{}, TOPK], ids=["plain", "topk"])
def test_on_is_the_method_on_standardised_logits_with_ce_on_raw_ones(name, extra):
    if extra and name in ("kd", "dtkd"):
        pytest.skip("no dynamic top-k mask")
    student, teacher, target = inputs(seed=1)
    on = build_method(name, logit_stand=True, **extra)(student, teacher, target, epoch=30)
    standardised = build_method(name, **extra)(F.standardize(student), F.standardize(teacher), target, epoch=30)
    raw = build_method(name, **extra)(student, teacher, target, epoch=30)
    assert on.keys() == standardised.keys()
    for key, term in on.items():
        expected = raw[key] if key == "ce" else standardised[key]
        assert term.stream == expected.stream
        assert torch.equal(term.value, expected.value), key
    assert (on["ce"].value - standardised["ce"].value).abs() > 1e-3  # the CE really is on the raw logits
    ours, = torch.autograd.grad(total_loss(on), student)
    theirs, = torch.autograd.grad(raw["ce"].value + sum(t.value for k, t in standardised.items() if k != "ce"),
                                  student)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", TWO_VIEW)
@pytest.mark.parametrize("extra", [{}, TOPK], ids=["plain", "topk"])
def test_two_view_methods_standardise_the_instance_terms_only(name, extra, monkeypatch):
    """MLKD as the reference code: the instance KD (TCKD, NCKD) terms on z-scored logits; CE, CC, BC and
    the teacher-confidence masks on the raw ones. CRLD likewise (its masks: the raw teacher's)."""
    if extra and name in ("mlkd", "crld"):
        pytest.skip("no dynamic top-k mask")
    student, teacher, target = inputs(views=2, seed=2)
    on = build_method(name, logit_stand=True, **extra)(student, teacher, target, epoch=30)
    raw = build_method(name, **extra)(student, teacher, target, epoch=30)
    masks = (mlkd_module.mlkd_masks(teacher[0]) if "mlkd" in name else crld_module.crld_masks(teacher, 0.9, 0.2))
    if "mlkd" in name:  # the masks of the raw teacher, whatever logits the method is given
        monkeypatch.setattr(mlkd_module, "mlkd_masks", lambda _: masks)
    else:
        monkeypatch.setattr(crld_module, "crld_masks", lambda *_: masks)
    standardised = build_method(name, **extra)(F.standardize(student), F.standardize(teacher), target, epoch=30)
    for key, term in on.items():
        expected = raw[key] if key in ("ce", "cc", "bc") else standardised[key]
        assert term.stream == expected.stream
        torch.testing.assert_close(term.value, expected.value, rtol=1e-13, atol=0)
    distilled = [k for k in on if k not in ("ce", "cc", "bc")]
    assert all((on[k].value - raw[k].value).abs() > 1e-6 for k in distilled)


def test_standardised_kd_ignores_each_samples_logit_scale_and_shift():
    """The point of the paper: the student need not match the teacher's logit range."""
    student, teacher, target = inputs(seed=3)
    method = build_method("kd", logit_stand=True)
    scale = torch.linspace(0.5, 4.0, 8, dtype=torch.float64)[:, None]
    base = method(student, teacher, target, epoch=1)["kd"].value
    moved = method(student * scale + 7.0, teacher * 3.0 - 1.0, target, epoch=1)["kd"].value
    torch.testing.assert_close(moved, base, rtol=1e-6, atol=0)
    assert (build_method("kd")(student * scale, teacher, target, epoch=1)["kd"].value - base).abs() > 1e-2


@pytest.mark.parametrize("name", ONE_VIEW + TWO_VIEW)
def test_teacher_gets_no_gradient_and_float32_terms(name):
    views = 2 if name in TWO_VIEW else 1
    student, teacher, target = (x.float() if x.is_floating_point() else x for x in inputs(views=views, seed=4))
    student, teacher = student.detach().requires_grad_(True), teacher.requires_grad_(True)
    terms = build_method(name, logit_stand=True)(student, teacher, target, epoch=30)
    total_loss(terms).backward()
    assert teacher.grad is None and torch.isfinite(student.grad).all()
    assert all(t.value.dtype == torch.float32 and t.value.dim() == 0 for t in terms.values())
