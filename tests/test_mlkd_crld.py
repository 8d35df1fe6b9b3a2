"""The two-view methods mlkd, deepkd_mlkd, crld and deepkd_crld against the pseudo-code of
MLKD_CRLD.md (sections 1.1, 1.2, 2.1, 2.2) written out literally below, plus the checks of its
section 6.1 and the options of section 6.2."""
import numpy as np
import pytest
import torch
from conftest import assert_same

from deepkd.losses import METHODS, build_method, stream_losses, total_loss
from deepkd.losses import multiview as V
from deepkd.losses.crld import crld_masks
from deepkd.losses.mlkd import mlkd_masks

NAMES = ["mlkd", "deepkd_mlkd", "crld", "deepkd_crld"]

# ----------------------------------------------------------------------------------------------
# Literal reference formulas (float64): explicit softmaxes, KL sums, Gram matrices, numpy medians.
# ----------------------------------------------------------------------------------------------


def ref_kl_rows(student, teacher, temperature):
    """T^2 KL(softmax(t/T) || softmax(s/T)) per row."""
    log_t = torch.log_softmax(teacher / temperature, dim=1)
    log_s = torch.log_softmax(student / temperature, dim=1)
    return temperature ** 2 * (log_t.exp() * (log_t - log_s)).sum(1)


def ref_binary(logits, target, temperature):
    p = torch.softmax(logits / temperature, dim=1)
    p_target = p.gather(1, target[:, None]).squeeze(1)
    return torch.stack([p_target, p.sum(1) - p_target], dim=1)


def ref_tckd_rows(student, teacher, target, temperature):
    b_t, b_s = ref_binary(teacher, target, temperature), ref_binary(student, target, temperature)
    return temperature ** 2 * (b_t * (b_t.log() - b_s.log())).sum(1)


def ref_nckd_rows(student, teacher, target, temperature, dropped=None):
    removed = torch.zeros_like(teacher).scatter_(1, target[:, None], 1.0)
    if dropped is not None:
        removed = torch.clamp(removed + dropped, max=1.0)
    log_t = torch.log_softmax(teacher / temperature - 1000.0 * removed, dim=1)
    log_s = torch.log_softmax(student / temperature - 1000.0 * removed, dim=1)
    return temperature ** 2 * (log_t.exp() * (log_t - log_s)).sum(1)


def ref_dropped(teacher, target, k):
    """1.0 where the DTM drops a class: the teacher's top K non-target classes are kept."""
    onehot = torch.zeros_like(teacher).scatter_(1, target[:, None], 1.0)
    chosen = (teacher - 1e9 * onehot).topk(k, dim=1).indices
    return 1.0 - torch.zeros_like(teacher).scatter_(1, chosen, 1.0)


def ref_cc(student, teacher, temperature, reduce=True):
    ps, pt = torch.softmax(student / temperature, 1), torch.softmax(teacher / temperature, 1)
    squared = (torch.einsum("bi,bj->ij", pt, pt) - torch.einsum("bi,bj->ij", ps, ps)) ** 2 / student.shape[1]
    return squared.sum() if reduce else squared


def ref_bc(student, teacher, temperature, reduce=True):
    ps, pt = torch.softmax(student / temperature, 1), torch.softmax(teacher / temperature, 1)
    squared = (torch.einsum("ac,bc->ab", pt, pt) - torch.einsum("ac,bc->ab", ps, ps)) ** 2 / student.shape[0]
    return squared.sum() if reduce else squared


def ref_ce(student, target):
    return -torch.log_softmax(student, dim=1).gather(1, target[:, None]).mean()


def ref_mlkd_masks(teacher_weak):
    p = torch.softmax(teacher_weak.detach(), dim=1).numpy()
    confidence, class_confidence = p.max(1), p.sum(0)
    sample = confidence <= np.percentile(confidence, 50)
    classes = class_confidence <= np.percentile(class_confidence, 50)
    return torch.from_numpy(sample).double(), torch.from_numpy(classes).double()


def ref_mlkd(s, t, y, T0=4.0, ce_w=0.1, kd_w=0.9, strong_t26="weak", per_sample=False):
    """Section 1.1; ``per_sample``: the un-reduced reading of section 6.2 M1."""
    temperatures = [T0, 3.0, 5.0, 2.0, 6.0]
    mask_s, mask_c = ref_mlkd_masks(t[0])
    t26 = 0 if strong_t26 == "weak" else 1
    weak = strong = cc = bc = 0.0
    for T in temperatures:
        if per_sample:
            weak = weak + (ref_kl_rows(s[0], t[0], T) * mask_s).mean()
            cc = cc + (ref_cc(s[0], t[0], T, reduce=False) * mask_c).mean()
            bc = bc + (ref_bc(s[0], t[0], T, reduce=False) * mask_s).mean()
        else:  # the reference: a batch mean times the mask, then .mean()
            weak = weak + (ref_kl_rows(s[0], t[0], T).mean() * mask_s).mean()
            cc = cc + (ref_cc(s[0], t[0], T) * mask_c).mean()
            bc = bc + (ref_bc(s[0], t[0], T) * mask_s).mean()
    for T in temperatures[:3]:
        strong = strong + ref_kl_rows(s[1], t[1], T).mean()
    for T in temperatures[3:]:
        strong = strong + ref_kl_rows(s[t26], t[t26], T).mean()
    return {"ce": ce_w * (ref_ce(s[0], y) + ref_ce(s[1], y)), "kd": kd_w * (weak + strong),
            "cc": kd_w * cc, "bc": kd_w * bc}


def ref_deepkd_mlkd(s, t, y, epoch, T0=4.0, ce_w=0.1, kd_w=0.9, alpha=1.0, beta=8.0, warmup=20,
                    strong_t26="strong", dropped=(None, None)):
    """Section 1.2 (TOG, TCG, NCG); ``dropped``: the DTM's dropped classes per teacher view."""
    temperatures = [T0, 3.0, 5.0, 2.0, 6.0]
    mask_s, _ = ref_mlkd_masks(t[0])
    w = min(epoch / warmup, 1.0)
    tcg = ncg = 0.0
    for i, T in enumerate(temperatures):
        view = 1 if strong_t26 == "strong" or i < 3 else 0
        tcg = tcg + (alpha * w * ref_tckd_rows(s[0], t[0], y, T).mean() * mask_s).mean()
        tcg = tcg + alpha * w * ref_tckd_rows(s[view], t[view], y, T).mean()
        ncg = ncg + (beta * w * ref_nckd_rows(s[0], t[0], y, T, dropped[0]).mean() * mask_s).mean()
        ncg = ncg + beta * w * ref_nckd_rows(s[view], t[view], y, T, dropped[view]).mean()
    plain = ref_mlkd(s, t, y, T0, ce_w, kd_w)
    return {"ce": plain["ce"], "cc": plain["cc"], "bc": plain["bc"], "tckd": kd_w * tcg, "nckd": kd_w * ncg}


def ref_crld_masks(t, tau_w, tau_s):
    conf_w = torch.softmax(t[0].detach(), 1).max(1).values
    conf_s = torch.softmax(t[1].detach(), 1).max(1).values
    return (conf_w >= tau_w).double(), (conf_s >= tau_s).double()


def ref_crld(s, t, y, ce_w=1.0, wv=2.0, cv=0.5, T=4.0, tau_w=0.9, tau_s=0.2, fraction=False):
    """Section 2.1 (``fraction``: the batch-fraction masking of section 2.2 applied to KD)."""
    mask_w, mask_s = ref_crld_masks(t, tau_w, tau_s)
    within = ref_kl_rows(s[0], t[0], T) + ref_kl_rows(s[1], t[1], T)
    cross = ref_kl_rows(s[1], t[0], T) + ref_kl_rows(s[0], t[1], T)
    if fraction:
        kd_wv, kd_cv = wv * mask_w.mean() * within.mean(), cv * mask_s.mean() * cross.mean()
    else:
        kd_wv, kd_cv = wv * (mask_w * within).mean(), cv * (mask_s * cross).mean()
    return {"ce": ce_w * (ref_ce(s[0], y) + ref_ce(s[1], y)), "kd_wv": kd_wv, "kd_cv": kd_cv}


def ref_deepkd_crld(s, t, y, epoch, ce_w=1.0, wv=2.0, cv=0.5, T=4.0, tau_w=0.9, tau_s=0.2, alpha=1.0,
                    beta=8.0, warmup=20, per_sample=False, dropped=(None, None)):
    """Section 2.2 (``per_sample``: the masks of section 2.1 instead of the fractions)."""
    mask_w, mask_s = ref_crld_masks(t, tau_w, tau_s)
    w = min(epoch / warmup, 1.0)

    def pair(rows, mask):  # rows of (a, b) pairs, summed per sample
        return (mask * rows).mean() if per_sample else mask.mean() * rows.mean()

    tc = {(a, b): ref_tckd_rows(s[a], t[b], y, T) for a in (0, 1) for b in (0, 1)}
    nc = {(a, b): ref_nckd_rows(s[a], t[b], y, T, dropped[b]) for a in (0, 1) for b in (0, 1)}
    tcg = wv * pair(tc[0, 0] + tc[1, 1], mask_w) + cv * pair(tc[1, 0] + tc[0, 1], mask_s)
    ncg = wv * pair(nc[0, 0] + nc[1, 1], mask_w) + cv * pair(nc[1, 0] + nc[0, 1], mask_s)
    return {"ce": ce_w * (ref_ce(s[0], y) + ref_ce(s[1], y)), "tckd": alpha * w * tcg, "nckd": beta * w * ncg}


# ----------------------------------------------------------------------------------------------


def views(batch=16, classes=10, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(2, batch, classes, generator=generator, dtype=dtype) * 2
    teacher = torch.randn(2, batch, classes, generator=generator, dtype=dtype) * 3
    target = torch.randint(0, classes, (batch,), generator=generator)
    return student.requires_grad_(True), teacher, target


def assert_terms(terms, reference, student, streams):
    assert {name: term.stream for name, term in terms.items()} == streams
    for name, term in terms.items():
        assert_same(term.value, reference[name], student)


def streams_of(reference, streams):
    out = {}
    for name, value in reference.items():
        out[streams[name]] = out[streams[name]] + value if streams[name] in out else value
    return out


MLKD_STREAMS = {"ce": "task", "kd": "target", "cc": "task", "bc": "task"}
DEEPKD_MLKD_STREAMS = {"ce": "task", "cc": "task", "bc": "task", "tckd": "target", "nckd": "non_target"}
CRLD_STREAMS = {"ce": "task", "kd_wv": "target", "kd_cv": "target"}
DEEPKD_CRLD_STREAMS = {"ce": "task", "tckd": "target", "nckd": "non_target"}
# CRLD's weak threshold lowered so that both masks are mixed on the test tensors.
CRLD_THRESHOLDS = {"weak_threshold": 0.5, "strong_threshold": 0.45}


def test_test_tensors_give_mixed_crld_masks():
    _, teacher, _ = views()
    mask_w, mask_s = ref_crld_masks(teacher, 0.5, 0.45)
    assert 0 < mask_w.sum() < 16 and 0 < mask_s.sum() < 16 and not torch.equal(mask_w, mask_s)


# ---------------------------------------------------------------- equality with sections 1-2


@pytest.mark.parametrize("kwargs", [{}, {"strong_t26": "strong"}, {"temperature": 1.0, "ce_weight": 0.5,
                                                                      "kd_weight": 0.5}])
def test_mlkd_matches_section_1_1(kwargs):
    student, teacher, target = views()
    terms = build_method("mlkd", **kwargs)(student, teacher, target, epoch=7)
    reference = ref_mlkd(student, teacher, target, T0=kwargs.get("temperature", 4.0),
                         ce_w=kwargs.get("ce_weight", 0.1), kd_w=kwargs.get("kd_weight", 0.9),
                         strong_t26=kwargs.get("strong_t26", "weak"))
    assert_terms(terms, reference, student, MLKD_STREAMS)


@pytest.mark.parametrize("epoch,kwargs", [
    (5, {"ce_weight": 0.5, "kd_weight": 0.5, "beta": 2.0}),  # the spec's own check
    (30, {}),
    (3, {"strong_t26": "weak", "alpha": 1.5, "warmup_epochs": 10}),
])
def test_deepkd_mlkd_matches_section_1_2(epoch, kwargs):
    student, teacher, target = views(seed=1)
    terms = build_method("deepkd_mlkd", **kwargs)(student, teacher, target, epoch=epoch)
    reference = ref_deepkd_mlkd(student, teacher, target, epoch, ce_w=kwargs.get("ce_weight", 0.1),
                                kd_w=kwargs.get("kd_weight", 0.9), alpha=kwargs.get("alpha", 1.0),
                                beta=kwargs.get("beta", 8.0), warmup=kwargs.get("warmup_epochs", 20),
                                strong_t26=kwargs.get("strong_t26", "strong"))
    assert_terms(terms, reference, student, DEEPKD_MLKD_STREAMS)
    ours = stream_losses(terms)
    for stream, value in streams_of(reference, DEEPKD_MLKD_STREAMS).items():
        assert_same(ours[stream], value, student)


@pytest.mark.parametrize("kwargs", [CRLD_THRESHOLDS, {**CRLD_THRESHOLDS, "temperature": 1.0, "ce_weight": 2.0,
                                                      "within_view_weight": 1.0, "cross_view_weight": 0.7}])
def test_crld_matches_section_2_1(kwargs):
    student, teacher, target = views(seed=2)
    student.data[:, :4] *= 4  # some confident students: per-sample masks must still come from the teacher
    terms = build_method("crld", **kwargs)(student, teacher, target, epoch=3)
    reference = ref_crld(student, teacher, target, ce_w=kwargs.get("ce_weight", 1.0),
                         wv=kwargs.get("within_view_weight", 2.0), cv=kwargs.get("cross_view_weight", 0.5),
                         T=kwargs.get("temperature", 4.0), tau_w=0.5, tau_s=0.45)
    assert_terms(terms, reference, student, CRLD_STREAMS)


@pytest.mark.parametrize("epoch,kwargs", [(5, {"beta": 2.0}), (40, {"within_view_weight": 0.5, "alpha": 2.0}),
                                          (2, {"beta": 0.5, "mask": "per_sample"})])
def test_deepkd_crld_matches_section_2_2(epoch, kwargs):
    student, teacher, target = views(seed=3)
    method = build_method("deepkd_crld", **CRLD_THRESHOLDS, **kwargs)
    terms = method(student, teacher, target, epoch=epoch)
    reference = ref_deepkd_crld(student, teacher, target, epoch, tau_w=0.5, tau_s=0.45,
                                wv=kwargs.get("within_view_weight", 2.0), alpha=kwargs.get("alpha", 1.0),
                                beta=kwargs.get("beta", 8.0), per_sample=kwargs.get("mask") == "per_sample")
    assert_terms(terms, reference, student, DEEPKD_CRLD_STREAMS)
    assert_same(total_loss(terms), sum(reference.values()), student)


def test_defaults_without_thresholds_match_the_reference():
    student, teacher, target = views(seed=4)
    assert_terms(build_method("crld")(student, teacher, target, epoch=1), ref_crld(student, teacher, target),
                 student, CRLD_STREAMS)
    assert_terms(build_method("deepkd_crld")(student, teacher, target, epoch=9),
                 ref_deepkd_crld(student, teacher, target, 9), student, DEEPKD_CRLD_STREAMS)


# ---------------------------------------------------------------- 6.1.2 mask arithmetic


@pytest.mark.parametrize("size", [15, 16, 63, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_median_is_numpys_linear_percentile(size, dtype):
    values = torch.rand(size, generator=torch.Generator().manual_seed(size), dtype=dtype)
    expected = np.percentile(values.numpy(), 50)
    torch.testing.assert_close(torch.quantile(values, 0.5).item(), float(expected), rtol=1e-6, atol=0)
    assert torch.equal(V.median_mask(values), torch.from_numpy(values.numpy() <= expected))


@pytest.mark.parametrize("batch", [16, 64, 15, 63])
def test_sample_fraction_is_a_half_or_b_plus_one_over_2b(batch):
    _, teacher, _ = views(batch=batch, seed=5)
    sample, _ = mlkd_masks(teacher[0])
    expected = 0.5 if batch % 2 == 0 else (batch + 1) / (2 * batch)
    assert sample.double().mean().item() == expected


def test_ties_at_the_maximum_give_sample_fraction_one():
    _, teacher, _ = views(seed=6)
    weak = teacher[0].clone()
    weak[:9] = 0.0
    weak[:9, 3] = 100.0  # nine rows tied at the maximum confidence (softmax saturates to 1.0)
    sample, _ = mlkd_masks(weak)
    assert sample.all()
    distinct, _ = mlkd_masks(teacher[0])
    assert distinct.double().mean().item() == 0.5


def test_class_fraction_is_a_half_at_100_classes():
    _, teacher, _ = views(batch=64, classes=100, seed=7)
    sample, classes = mlkd_masks(teacher[0])
    assert classes.shape == (100,) and classes.double().mean().item() == 0.5
    reference_sample, reference_classes = ref_mlkd_masks(teacher[0])
    assert torch.equal(sample.double(), reference_sample) and torch.equal(classes.double(), reference_classes)


def test_masks_carry_no_gradient_and_read_the_right_teacher_view():
    _, teacher, _ = views(seed=8)
    teacher = teacher.clone().requires_grad_(True)
    masks = [*mlkd_masks(teacher[0]), *crld_masks(teacher, 0.5, 0.45)]
    assert all(mask.dtype == torch.bool and not mask.requires_grad for mask in masks)
    confident_strong = torch.stack([teacher[0].detach(), teacher[1].detach() * 50])
    mask_w, mask_s = crld_masks(confident_strong, 0.5, 0.45)
    assert torch.equal(mask_w, masks[2]) and mask_s.all() and not masks[3].all()
    uniform = torch.zeros(2, 4, 10, dtype=torch.float64)  # confidence exactly 0.1: the comparison is inclusive
    assert all(mask.all() for mask in crld_masks(uniform, 0.1, 0.1))


def test_mlkd_fractions_come_from_the_teacher_not_the_student():
    student, teacher, target = views(seed=9)
    teacher = teacher.clone()
    teacher[0, :9] = 0.0
    teacher[0, :9, 3] = 100.0  # teacher: f_s = 1; the student's own confidences would give 0.5
    terms = build_method("mlkd")(student, teacher, target, epoch=1)
    raw_bc = sum(ref_bc(student[0], teacher[0], T) for T in (4.0, 3.0, 5.0, 2.0, 6.0))
    assert_same(terms["bc"].value, 0.9 * raw_bc, student)
    assert not torch.allclose(terms["bc"].value, 0.45 * raw_bc)
    assert_terms(terms, ref_mlkd(student, teacher, target), student, MLKD_STREAMS)


def test_crld_masks_come_from_the_teacher_not_the_student():
    student, teacher, target = views(seed=10)
    student = (teacher.flip(1) * 2).requires_grad_(True)  # confident students, paired with other samples
    terms = build_method("crld", **CRLD_THRESHOLDS)(student, teacher, target, epoch=1)
    assert_same(terms["kd_wv"].value, ref_crld(student, teacher, target, tau_w=0.5, tau_s=0.45)["kd_wv"], student)
    student_mask, _ = ref_crld_masks(student.detach(), 0.5, 0.45)
    assert not torch.equal(student_mask, ref_crld_masks(teacher, 0.5, 0.45)[0])
    within = ref_kl_rows(student[0], teacher[0], 4.0) + ref_kl_rows(student[1], teacher[1], 4.0)
    assert not torch.allclose(terms["kd_wv"].value, 2.0 * (student_mask * within).mean())


# ---------------------------------------------------------------- 6.1.3 collapse identities


def test_mlkd_masks_act_as_fractions_unless_per_sample():
    student, teacher, target = views(seed=11)
    fraction = build_method("mlkd")(student, teacher, target, epoch=1)
    per_sample = build_method("mlkd", mask="per_sample")(student, teacher, target, epoch=1)
    assert_terms(per_sample, ref_mlkd(student, teacher, target, per_sample=True), student, MLKD_STREAMS)
    raw_kd = sum(ref_kl_rows(student[0], teacher[0], T).mean() for T in (4.0, 3.0, 5.0, 2.0, 6.0))
    mask_s, _ = ref_mlkd_masks(teacher[0])
    torch.testing.assert_close((raw_kd * mask_s).mean(), raw_kd * mask_s.mean())  # the collapse itself
    for name in ("kd", "cc", "bc"):
        assert not torch.allclose(fraction[name].value, per_sample[name].value)


@pytest.mark.parametrize("name", ["crld", "deepkd_crld"])
@pytest.mark.parametrize("threshold", [0.0, 1.5])
def test_crld_per_sample_equals_fraction_when_the_mask_is_uniform(name, threshold):
    student, teacher, target = views(seed=12)
    uniform = {"weak_threshold": threshold, "strong_threshold": threshold}
    per_sample = build_method(name, mask="per_sample", **uniform)(student, teacher, target, epoch=30)
    fraction = build_method(name, mask="fraction", **uniform)(student, teacher, target, epoch=30)
    for key, term in per_sample.items():
        assert_same(term.value, fraction[key].value, student)
    mixed_a = build_method(name, mask="per_sample", **CRLD_THRESHOLDS)(student, teacher, target, epoch=30)
    mixed_b = build_method(name, mask="fraction", **CRLD_THRESHOLDS)(student, teacher, target, epoch=30)
    assert not torch.allclose(total_loss(mixed_a), total_loss(mixed_b))
    if threshold > 1:
        assert total_loss(per_sample).item() == pytest.approx(per_sample["ce"].value.item())


def test_crld_fraction_option_matches_the_fraction_formula():
    student, teacher, target = views(seed=13)
    terms = build_method("crld", mask="fraction", **CRLD_THRESHOLDS)(student, teacher, target, epoch=1)
    assert_terms(terms, ref_crld(student, teacher, target, tau_w=0.5, tau_s=0.45, fraction=True), student,
                 CRLD_STREAMS)


# ---------------------------------------------------------------- 6.1.4 correlation terms


def test_correlation_terms_match_the_formulas_and_vanish_for_equal_logits():
    student, teacher, _ = views(seed=14)
    s, t = student[0], teacher[0]
    for T in (1.0, 4.0):
        assert_same(V.class_correlation(s, t, [T]), ref_cc(s, t, T), student)
        assert_same(V.batch_correlation(s, t, [T]), ref_bc(s, t, T), student)
        assert V.class_correlation(t, t, [T]).item() == pytest.approx(0.0, abs=1e-15)
        assert V.batch_correlation(t, t, [T]).item() == pytest.approx(0.0, abs=1e-15)
    total = V.class_correlation(s, t, [4.0, 2.0])
    torch.testing.assert_close(total, ref_cc(s, t, 4.0) + ref_cc(s, t, 2.0))
    for term in (V.class_correlation, V.batch_correlation):  # P -> uniform as T grows
        assert term(s, t, [1e5]).item() < 1e-8 * term(s, t, [4.0]).item()


def test_correlation_terms_are_non_negative_and_symmetric():
    student, teacher, _ = views(seed=15)
    s, t = student[0].detach(), teacher[0]
    for term in (V.class_correlation, V.batch_correlation):
        assert term(s, t, [2.0]).item() > 0
        torch.testing.assert_close(term(s, t, [2.0]), term(t, s, [2.0]))


def test_cc_ignores_the_batch_pairing_and_bc_ignores_class_identity():
    student, teacher, _ = views(seed=16)
    s, t = student[0].detach(), teacher[0]
    rows, columns = torch.randperm(16, generator=torch.Generator().manual_seed(0)), torch.arange(9, -1, -1)
    torch.testing.assert_close(V.class_correlation(s[rows], t, [4.0]), V.class_correlation(s, t, [4.0]))
    torch.testing.assert_close(V.batch_correlation(s[:, columns], t, [4.0]), V.batch_correlation(s, t, [4.0]))
    assert not torch.allclose(V.batch_correlation(s[rows], t, [4.0]), V.batch_correlation(s, t, [4.0]))
    assert not torch.allclose(V.class_correlation(s[:, columns], t, [4.0]), V.class_correlation(s, t, [4.0]))


def test_bc_of_one_sample_is_the_squared_difference_of_norms():
    student, teacher, _ = views(batch=1, seed=17)
    s, t = student[0].detach(), teacher[0]
    ps, pt = torch.softmax(s / 4.0, 1), torch.softmax(t / 4.0, 1)
    expected = (pt.square().sum() - ps.square().sum()) ** 2
    torch.testing.assert_close(V.batch_correlation(s, t, [4.0]), expected)


def test_per_sample_correlation_reading_scales_columns():
    student, teacher, _ = views(seed=18)
    s, t = student[0].detach(), teacher[0]
    mask = torch.arange(10) % 3 == 0
    expected = (ref_cc(s, t, 4.0, reduce=False) * mask.double()).mean()
    torch.testing.assert_close(V.class_correlation(s, t, [4.0], mask), expected)
    assert not torch.allclose(V.class_correlation(s, t, [4.0], mask), V.class_correlation(s, t, [4.0], ~mask))


# ---------------------------------------------------------------- 6.1.5 decomposition


def test_kd_decomposes_per_sample_and_the_stacked_temperatures_sum():
    student, teacher, target = views(seed=19)
    s, t = student[0], teacher[0]
    for T in (4.0, 3.0, 5.0, 2.0, 6.0):
        p_target = torch.softmax(t / T, 1).gather(1, target[:, None]).squeeze(1)
        decomposed = ref_tckd_rows(s, t, target, T) + (1 - p_target) * ref_nckd_rows(s, t, target, T)
        torch.testing.assert_close(ref_kl_rows(s, t, T), decomposed, rtol=1e-10, atol=1e-12)
    tckd, nckd = V.decoupled_sum(s, t, target, [4.0, 3.0, 2.0], None)
    assert_same(tckd, sum(ref_tckd_rows(s, t, target, T).mean() for T in (4.0, 3.0, 2.0)), student)
    assert_same(nckd, sum(ref_nckd_rows(s, t, target, T).mean() for T in (4.0, 3.0, 2.0)), student)


# ---------------------------------------------------------------- 6.1.6 stream routing


def test_cc_and_bc_ride_the_task_stream_only():
    student, teacher, target = views(seed=20)
    terms = build_method("deepkd_mlkd")(student, teacher, target, epoch=30)
    reference = ref_deepkd_mlkd(student, teacher, target, 30)
    streams = stream_losses(terms)
    assert_same(total_loss(terms), sum(reference.values()), student)
    assert_same(streams["target"], reference["tckd"], student)
    assert_same(streams["non_target"], reference["nckd"], student)
    with_correlations, = torch.autograd.grad(reference["tckd"] + reference["cc"] + reference["bc"], student,
                                             retain_graph=True)
    target_grad, = torch.autograd.grad(streams["target"], student, retain_graph=True)
    assert not torch.allclose(target_grad, with_correlations)


@pytest.mark.parametrize("name", ["mlkd", "deepkd_mlkd"])
def test_no_strong_view_correlation_terms(name):
    student, teacher, target = views(seed=21)
    terms = build_method(name)(student, teacher, target, epoch=30)
    for key in ("cc", "bc"):
        grad, = torch.autograd.grad(terms[key].value, student, retain_graph=True)
        assert torch.equal(grad[1], torch.zeros_like(grad[1])) and grad[0].abs().sum() > 0
    task, = torch.autograd.grad(stream_losses(terms)["task"], student, retain_graph=True)
    ce, = torch.autograd.grad(terms["ce"].value, student)
    torch.testing.assert_close(task[1], ce[1])


# ---------------------------------------------------------------- options


def test_strong_t26_changes_the_instance_terms_only():
    student, teacher, target = views(seed=22)
    for name, key in (("mlkd", "kd"), ("deepkd_mlkd", "nckd")):
        weak = build_method(name, strong_t26="weak")(student, teacher, target, epoch=30)
        strong = build_method(name, strong_t26="strong")(student, teacher, target, epoch=30)
        assert not torch.allclose(weak[key].value, strong[key].value)
        torch.testing.assert_close(weak["cc"].value, strong["cc"].value)


@pytest.mark.parametrize("name", NAMES)
def test_group_size_of_the_batch_is_the_whole_batch(name):
    student, teacher, target = views(seed=23)
    whole = build_method(name, correlation_group_size=None)(student, teacher, target, epoch=30)
    for size in (16, 40):
        grouped = build_method(name, correlation_group_size=size)(student, teacher, target, epoch=30)
        for key, term in whole.items():
            assert torch.equal(grouped[key].value, term.value)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size,bounds", [(8, [0, 8, 16]), (6, [0, 6, 12, 16])])
def test_groups_are_averaged_like_replicas(name, size, bounds):
    student, teacher, target = views(seed=24)
    kwargs = {**CRLD_THRESHOLDS, "mask": "fraction"} if "crld" in name else {}
    grouped = build_method(name, correlation_group_size=size, **kwargs)(student, teacher, target, epoch=30)
    whole = build_method(name, **kwargs)
    parts = [whole(student[:, a:b], teacher[:, a:b], target[a:b], epoch=30) for a, b in zip(bounds, bounds[1:])]
    for key, term in grouped.items():
        assert_same(term.value, torch.stack([part[key].value for part in parts]).mean(), student)
    unsplit = whole(student, teacher, target, epoch=30)
    assert not torch.allclose(total_loss(grouped), total_loss(unsplit))


def test_per_sample_crld_does_not_depend_on_equal_groups():
    student, teacher, target = views(seed=24)
    grouped = build_method("crld", correlation_group_size=8, **CRLD_THRESHOLDS)(student, teacher, target, epoch=3)
    whole = build_method("crld", **CRLD_THRESHOLDS)(student, teacher, target, epoch=3)
    for key, term in whole.items():
        assert_same(grouped[key].value, term.value, student)


@pytest.mark.parametrize("name", ["deepkd_mlkd", "deepkd_crld"])
def test_dynamic_topk_masks_nckd_by_each_parts_teacher_view(name):
    student, teacher, target = views(classes=40, seed=25)
    plain = build_method(name, warmup_epochs=20)
    masked = build_method(name, warmup_epochs=20, topk=True, topk_ramp_end=150)
    assert masked.topk(5) is None  # C unknown before the first batch
    early_plain, early = plain(student, teacher, target, epoch=5), masked(student, teacher, target, epoch=5)
    assert masked.topk(5) == 2 and masked.topk(150) == 40 and plain.topk(5) is None
    for key in early:
        if key != "nckd":
            torch.testing.assert_close(early[key].value, early_plain[key].value)
    dropped = tuple(ref_dropped(teacher[v], target, 2) for v in (0, 1))
    if name == "deepkd_mlkd":
        reference = ref_deepkd_mlkd(student, teacher, target, 5, dropped=dropped)
        swapped = ref_deepkd_mlkd(student, teacher, target, 5, dropped=dropped[::-1])
    else:
        reference = ref_deepkd_crld(student, teacher, target, 5, dropped=dropped)
        swapped = ref_deepkd_crld(student, teacher, target, 5, dropped=dropped[::-1])
    assert_same(early["nckd"].value, reference["nckd"], student)
    assert not torch.allclose(early["nckd"].value, swapped["nckd"])
    late_plain, late = plain(student, teacher, target, epoch=150), masked(student, teacher, target, epoch=150)
    torch.testing.assert_close(late["nckd"].value, late_plain["nckd"].value)


# ---------------------------------------------------------------- builders, shapes and precision


def test_builders_give_the_reference_defaults():
    mlkd, deep_mlkd = METHODS.build("mlkd"), METHODS.build("deepkd_mlkd")
    crld, deep_crld = METHODS.build("crld"), METHODS.build("deepkd_crld")
    assert (mlkd.temperature, mlkd.ce_weight, mlkd.kd_weight, mlkd.warmup_epochs) == (4.0, 0.1, 0.9, 0)
    assert mlkd.temperatures == (4.0, 3.0, 5.0, 2.0, 6.0)
    assert (mlkd.mask, mlkd.strong_t26, mlkd.correlation_group_size) == ("fraction", "weak", None)
    assert (deep_mlkd.alpha, deep_mlkd.beta, deep_mlkd.warmup_epochs, deep_mlkd.ce_weight) == (1.0, 8.0, 20, 0.1)
    assert (deep_mlkd.mask, deep_mlkd.strong_t26, deep_mlkd.dtm.enabled) == ("fraction", "strong", False)
    assert (crld.ce_weight, crld.within_view_weight, crld.cross_view_weight, crld.temperature) == (1.0, 2.0, 0.5, 4.0)
    assert (crld.weak_threshold, crld.strong_threshold, crld.mask, crld.warmup_epochs) == (0.9, 0.2, "per_sample", 0)
    assert (deep_crld.alpha, deep_crld.beta, deep_crld.warmup_epochs, deep_crld.mask) == (1.0, 8.0, 20, "fraction")
    assert (deep_crld.weak_threshold, deep_crld.within_view_weight, deep_crld.dtm.enabled) == (0.9, 2.0, False)
    assert all(method.views == 2 for method in (mlkd, deep_mlkd, crld, deep_crld))
    assert METHODS.info("deepkd_mlkd")["base"] == "mlkd" and METHODS.info("deepkd_crld")["base"] == "crld"


@pytest.mark.parametrize("name", NAMES)
def test_wrong_shapes_raise(name):
    student, teacher, target = views()
    method = build_method(name)
    with pytest.raises(ValueError, match=r"\[2, B, C\]"):
        method(student[0], teacher[0], target, epoch=1)
    with pytest.raises(ValueError, match=r"\[2, B, C\]"):
        method(torch.cat([student, student[:1]]), torch.cat([teacher, teacher[:1]]), target, epoch=1)
    with pytest.raises(ValueError, match="teacher logits"):
        method(student, teacher[:, :8], target, epoch=1)
    with pytest.raises(ValueError, match="teacher logits"):
        method(student, None, target, epoch=1)
    with pytest.raises(ValueError, match="target of shape"):
        method(student, teacher, target[:8], epoch=1)


@pytest.mark.parametrize("name,kwargs,match", [
    ("mlkd", {"mask": "sample"}, "mask must be one of"),
    ("deepkd_mlkd", {"strong_t26": "both"}, "strong_t26 must be one of"),
    ("crld", {"correlation_group_size": 0}, "correlation_group_size"),
    ("deepkd_crld", {"correlation_group_size": 2.5}, "correlation_group_size"),
    ("mlkd", {"correlation_group_size": True}, "correlation_group_size"),
    ("crld", {"temperature": 0.0}, "temperature must be positive"),
    ("deepkd_mlkd", {"topk": True}, "topk_ramp_end must be set"),
])
def test_bad_options_raise(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_method(name, **kwargs)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_float32_terms_close_to_float32_inputs(name, dtype):
    student, teacher, target = views(seed=26, dtype=torch.float32)
    method = build_method(name, **(CRLD_THRESHOLDS if "crld" in name else {}))
    full = method(student, teacher, target, epoch=30)
    half = method(student.detach().to(dtype), teacher.to(dtype), target, epoch=30)
    for key, term in half.items():
        assert term.value.dtype == torch.float32
        torch.testing.assert_close(term.value, full[key].value.detach(), rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_only_the_student(name):
    student, teacher, target = views(seed=27)
    teacher = teacher.clone().requires_grad_(True)
    total_loss(build_method(name)(student, teacher, target, epoch=30)).backward()
    assert teacher.grad is None and torch.isfinite(student.grad).all() and student.grad[1].abs().sum() > 0
