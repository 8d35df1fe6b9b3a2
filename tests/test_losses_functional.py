"""deepkd.losses.functional against literal float64 re-statements of the reference-code formulas,
plus the properties of DESIGN.md section 4 and every input error."""
import math

import pytest
import torch
import torch.nn.functional as torch_functional
from conftest import assert_same

from deepkd.losses import functional as F

# ----------------------------------------------------------------------------------------------
# Literal reference implementations (float64), written from the formulas of METHODS.md: the
# mdistiller-style masks, log of summed probabilities, "- 1000" target removal, undetached maxima.
# ----------------------------------------------------------------------------------------------


def ref_kd(student, teacher, temperature):
    log_student = torch_functional.log_softmax(student / temperature, dim=1)
    teacher_prob = torch_functional.softmax(teacher / temperature, dim=1)
    kl = torch_functional.kl_div(log_student, teacher_prob, reduction="none").sum(1)
    return kl.mean() * temperature ** 2


def ref_masks(logits, target):
    gt = torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1.0)
    return gt, 1.0 - gt


def ref_cat_mask(prob, gt, other):
    return torch.cat([(prob * gt).sum(1, keepdim=True), (prob * other).sum(1, keepdim=True)], dim=1)


def ref_tckd_rows(student, teacher, target, student_temperature, teacher_temperature):
    gt, other = ref_masks(student, target)
    student_binary = ref_cat_mask(torch_functional.softmax(student / student_temperature, dim=1), gt, other)
    teacher_binary = ref_cat_mask(torch_functional.softmax(teacher / teacher_temperature, dim=1), gt, other)
    return torch_functional.kl_div(torch.log(student_binary), teacher_binary, reduction="none").sum(1)


def ref_nckd_rows(student, teacher, target, student_temperature, teacher_temperature, dropped=None):
    gt, _ = ref_masks(student, target)
    removed = gt if dropped is None else torch.clamp(gt + dropped, max=1.0)
    log_teacher_part = torch_functional.log_softmax(teacher / teacher_temperature - 1000.0 * removed, dim=1)
    log_student_part = torch_functional.log_softmax(student / student_temperature - 1000.0 * removed, dim=1)
    # sum p (log p - log q) written out: kl_div's xlogy has a NaN derivative at p = 0, which
    # matters once the teacher temperature depends on the student (DTKD+DKD).
    return (log_teacher_part.exp() * (log_teacher_part - log_student_part)).sum(1)


def ref_dkd(student, teacher, target, alpha, beta, temperature):
    batch = target.shape[0]
    tckd = ref_tckd_rows(student, teacher, target, temperature, temperature).sum() * temperature ** 2 / batch
    nckd = ref_nckd_rows(student, teacher, target, temperature, temperature).sum() * temperature ** 2 / batch
    return alpha * tckd + beta * nckd


def ref_dynamic_temperatures(student, teacher, tau):
    student_max = student.max(dim=1, keepdim=True)[0]
    teacher_max = teacher.max(dim=1, keepdim=True)[0]
    student_temperature = 2 * student_max / (teacher_max + student_max) * tau
    teacher_temperature = 2 * teacher_max / (teacher_max + student_max) * tau
    return student_temperature, teacher_temperature


def ref_dtkd(student, teacher, tau, alpha, beta):
    student_temperature, teacher_temperature = ref_dynamic_temperatures(student, teacher, tau)
    kl = torch_functional.kl_div(torch_functional.log_softmax(student / student_temperature, dim=1),
                                 torch_functional.softmax(teacher / teacher_temperature, dim=1),
                                 reduction="none").sum(1, keepdim=True)
    dynamic = (kl * teacher_temperature * student_temperature).mean()
    return alpha * dynamic + beta * ref_kd(student, teacher, tau)


def ref_dropped(teacher, target, k, count_target):
    """1.0 where the DTM drops a class: rank teacher logits, keep the top K (target then removed)."""
    scores = teacher if count_target else teacher - 1e9 * ref_masks(teacher, target)[0]
    selected = torch.zeros_like(teacher).scatter_(1, scores.topk(k, dim=1).indices, 1.0)
    return 1.0 - selected


# ----------------------------------------------------------------------------------------------


def make_inputs(batch=16, classes=10, seed=0, dtype=torch.float64, positive_max=True):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator, dtype=dtype) * 2
    teacher = torch.randn(batch, classes, generator=generator, dtype=dtype) * 3
    if positive_max:  # DTKD's temperatures need maxima of the same sign
        student, teacher = student + 1.5, teacher + 2.0
    target = torch.randint(0, classes, (batch,), generator=generator)
    return student.requires_grad_(True), teacher, target


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_kd_dkd_match_reference(temperature, seed):
    student, teacher, target = make_inputs(seed=seed)
    batch = target.shape[0]
    assert_same(F.kd(student, teacher, temperature=temperature), ref_kd(student, teacher, temperature), student)
    tckd_ref = ref_tckd_rows(student, teacher, target, temperature, temperature).sum() * temperature ** 2 / batch
    nckd_ref = ref_nckd_rows(student, teacher, target, temperature, temperature).sum() * temperature ** 2 / batch
    assert_same(F.tckd(student, teacher, target, temperature=temperature), tckd_ref, student)
    assert_same(F.nckd(student, teacher, target, temperature=temperature), nckd_ref, student)
    assert_same(F.dkd(student, teacher, target, alpha=2.0, beta=6.0, temperature=temperature),
                ref_dkd(student, teacher, target, 2.0, 6.0, temperature), student)


@pytest.mark.parametrize("alpha,beta", [(3.0, 1.0), (1.0, 0.5)])
def test_dtkd_matches_reference(alpha, beta):
    student, teacher, _ = make_inputs(seed=3)
    assert_same(F.dtkd(student, teacher, temperature=4.0, alpha=alpha, beta=beta),
                ref_dtkd(student, teacher, 4.0, alpha, beta), student)
    ours = F.dynamic_temperatures(student, teacher, temperature=4.0)
    theirs = ref_dynamic_temperatures(student, teacher, 4.0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_dtkd_student_max_is_not_detached():
    student, teacher, _ = make_inputs(seed=4)
    student_temperature, teacher_temperature = ref_dynamic_temperatures(student.detach(), teacher, 4.0)
    kl = torch_functional.kl_div(torch_functional.log_softmax(student / student_temperature, dim=1),
                                 torch_functional.softmax(teacher / teacher_temperature, dim=1),
                                 reduction="none").sum(1, keepdim=True)
    with_detached_max = 3 * (kl * teacher_temperature * student_temperature).mean() + ref_kd(student, teacher, 4.0)
    detached, = torch.autograd.grad(with_detached_max, student)
    ours, = torch.autograd.grad(F.dtkd(student, teacher), student)
    assert (ours - detached).abs().max() > 1e-6  # the max's gradient path is present


def test_dtkd_dkd_decomposition_matches_reference():
    student, teacher, target = make_inputs(seed=5)
    student_temperature, teacher_temperature = ref_dynamic_temperatures(student, teacher, 4.0)
    scale = (student_temperature * teacher_temperature).squeeze(1)
    tckd_rows = ref_tckd_rows(student, teacher, target, student_temperature, teacher_temperature)
    nckd_rows = ref_nckd_rows(student, teacher, target, student_temperature, teacher_temperature)
    terms = F.dynamic_decoupled(student, teacher, target, temperature=4.0)
    assert_same(terms.tckd, (scale * tckd_rows).mean(), student)
    assert_same(terms.nckd, (scale * nckd_rows).mean(), student)
    direct = F.tckd(student, teacher, target, temperature=student_temperature,
                    teacher_temperature=teacher_temperature)
    assert_same(direct, (scale * tckd_rows).mean(), student)


def test_deepkd_kd_weights_match_reference():
    student, teacher, target = make_inputs(seed=6)
    temperature = 4.0
    teacher_target = torch_functional.softmax(teacher / temperature, dim=1).gather(1, target[:, None]).squeeze(1)
    nckd_rows = ref_nckd_rows(student, teacher, target, temperature, temperature) * temperature ** 2
    terms = F.decoupled(student, teacher, target, temperature=temperature)
    assert_same((1 - terms.teacher_target_prob) * terms.nckd, (1 - teacher_target.mean()) * nckd_rows.mean(), student)
    assert_same(terms.weighted_nckd, ((1 - teacher_target) * nckd_rows).mean(), student)


@pytest.mark.parametrize("count_target", [False, True])
@pytest.mark.parametrize("k", [2, 3, 7])
def test_topk_mask_nckd_matches_reference(k, count_target):
    student, teacher, target = make_inputs(classes=12, seed=7)
    keep = F.topk_keep_mask(teacher, target, k, count_target=count_target)
    dropped = ref_dropped(teacher, target, k, count_target)
    assert torch.equal(keep, (dropped == 0) & (ref_masks(teacher, target)[0] == 0))
    if not count_target:
        assert torch.equal(keep.sum(1), torch.full((16,), k))
    ours = F.nckd(student, teacher, target, temperature=4.0, keep=keep)
    theirs = ref_nckd_rows(student, teacher, target, 4.0, 4.0, dropped).mean() * 16.0
    assert_same(ours, theirs, student)


def test_row_with_no_kept_class_contributes_zero():
    # count_target=True, K=1 and the teacher's top class is the target: no non-target class is
    # left. The reference would subtract 1000 from every logit (removing nothing); deepkd gives 0.
    student, teacher, target = make_inputs(classes=12, seed=7)
    target = teacher.argmax(1)
    keep = F.topk_keep_mask(teacher, target, 1, count_target=True)
    assert not keep.any()
    value = F.nckd(student, teacher, target, keep=keep)
    grad, = torch.autograd.grad(value, student)
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_dkd_identity_per_sample():
    student, teacher, target = make_inputs(seed=8, positive_max=False)
    for row in range(target.shape[0]):
        one = slice(row, row + 1)
        terms = F.decoupled(student[one], teacher[one], target[one], temperature=3.0)
        p_target = torch.softmax(teacher[one] / 3.0, dim=1)[0, target[row]]
        nckd = F.nckd(student[one], teacher[one], target[one], temperature=3.0)
        full = F.kd(student[one], teacher[one], temperature=3.0)
        torch.testing.assert_close(full, terms.tckd + (1 - p_target) * nckd, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(terms.weighted_nckd, (1 - p_target) * nckd, rtol=1e-10, atol=1e-12)


def test_zero_for_equal_logits():
    student, _, target = make_inputs(seed=9)
    same = student.detach().clone()
    for value in (F.kd(student, same), F.tckd(student, same, target), F.nckd(student, same, target),
                  F.dkd(student, same, target), F.dtkd(student, same)):
        assert abs(value.item()) < 1e-12
    assert F.kd(student, same + 0.5 * torch.randn_like(same)).item() > 1e-3


@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_temperature_squared_scaling(temperature):
    student, teacher, target = make_inputs(seed=10)
    small_s, small_t = student / temperature, teacher / temperature
    torch.testing.assert_close(F.kd(student, teacher, temperature=temperature),
                               temperature ** 2 * F.kd(small_s, small_t, temperature=1.0))
    for loss in (F.tckd, F.nckd):
        torch.testing.assert_close(loss(student, teacher, target, temperature=temperature),
                                   temperature ** 2 * loss(small_s, small_t, target, temperature=1.0))


def test_shift_invariance():
    student, teacher, target = make_inputs(seed=11)
    shift_s = torch.randn(16, 1, dtype=torch.float64) * 5
    shift_t = torch.randn(16, 1, dtype=torch.float64) * 5
    for loss in (lambda s, t: F.kd(s, t), lambda s, t: F.tckd(s, t, target),
                 lambda s, t: F.nckd(s, t, target), lambda s, t: F.dkd(s, t, target)):
        torch.testing.assert_close(loss(student + shift_s, teacher + shift_t), loss(student, teacher))


def test_dtkd_equals_kd_when_maxima_are_equal():
    student, teacher, _ = make_inputs(seed=12)
    student = (student - student.amax(1, keepdim=True) + teacher.amax(1, keepdim=True)).detach()
    expected = (3.0 + 1.0) * F.kd(student, teacher, temperature=4.0)
    torch.testing.assert_close(F.dtkd(student, teacher, temperature=4.0, alpha=3.0, beta=1.0), expected)
    torch.testing.assert_close(F.dtkd(student, teacher, alpha=0.0, beta=2.0), 2.0 * F.kd(student, teacher))


@pytest.mark.parametrize("count_target", [False, True])
def test_dtm_with_all_classes_is_plain_nckd(count_target):
    student, teacher, target = make_inputs(classes=10, seed=13)
    plain = F.nckd(student, teacher, target)
    for k in (0, 9, 10, 50):
        keep = F.topk_keep_mask(teacher, target, k, count_target=count_target)
        assert torch.equal(keep, ~ref_masks(teacher, target)[0].bool())
        torch.testing.assert_close(F.nckd(student, teacher, target, keep=keep), plain)
    partial = F.nckd(student, teacher, target, keep=F.topk_keep_mask(teacher, target, 3))
    assert (partial - plain).abs().item() > 1e-6


def test_dtm_schedule():
    assert [F.dtm_k(e, 100, ramp_start=20, ramp_end=150) for e in (1, 10, 20)] == [5, 5, 5]
    assert F.dtm_k(150, 100, ramp_start=20, ramp_end=150) == 100 == F.dtm_k(240, 100, ramp_start=20, ramp_end=150)
    assert F.dtm_k(85, 100, ramp_start=20, ramp_end=150) == math.floor(5 + 95 * 65 / 130 + 0.5)
    assert F.dtm_k(1, 1000, ramp_start=1, ramp_end=30) == 50
    assert F.dtm_k(1, 10, ramp_start=5, ramp_end=8) == 1  # ceil(0.5), at least one class
    ks = [F.dtm_k(e, 100, ramp_start=20, ramp_end=150) for e in range(1, 241)]
    assert all(a <= b for a, b in zip(ks, ks[1:]))
    with pytest.raises(ValueError, match="start_fraction"):
        F.dtm_k(1, 100, start_fraction=0.0, ramp_start=1, ramp_end=2)


FUNCTIONS_WITH_TARGET = {
    "tckd": lambda s, t, y, **kw: F.tckd(s, t, y, **kw),
    "nckd": lambda s, t, y, **kw: F.nckd(s, t, y, **kw),
    "dkd": lambda s, t, y, **kw: F.dkd(s, t, y, **kw),
    "kd": lambda s, t, y, **kw: F.kd(s, t, target=y, **kw),
    "dtkd": lambda s, t, y, **kw: F.dtkd(s, t, target=y, **kw),
    "cross_entropy": lambda s, t, y, **kw: F.cross_entropy(s, y, **kw),
    "dynamic_nckd": lambda s, t, y, **kw: F.dynamic_decoupled(s, t, y, **kw).nckd,
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS_WITH_TARGET))
def test_sequence_logits_with_ignore_index(name):
    loss = FUNCTIONS_WITH_TARGET[name]
    student, teacher, target = make_inputs(batch=24, seed=14)
    target = target.clone()
    target[[1, 5, 6, 20]] = -100
    kept = target != -100
    flat = loss(student[kept], teacher[kept], target[kept])
    shaped = loss(student.reshape(4, 6, 10), teacher.reshape(4, 6, 10), target.reshape(4, 6))
    torch.testing.assert_close(shaped, flat)
    garbage = student.detach().clone()
    garbage[~kept] = float("nan")  # ignored positions may hold anything
    value = loss(garbage.requires_grad_(True), teacher, target)
    torch.testing.assert_close(value, flat.detach())


@pytest.mark.parametrize("name", sorted(FUNCTIONS_WITH_TARGET))
def test_float32_agrees_with_float64_and_half_is_upcast(name):
    loss = FUNCTIONS_WITH_TARGET[name]
    student, teacher, target = make_inputs(seed=15)
    wide = loss(student, teacher, target)
    narrow = loss(student.float(), teacher.float(), target)
    assert narrow.dtype == torch.float32 and wide.dtype == torch.float64
    torch.testing.assert_close(narrow.double(), wide, rtol=1e-5, atol=1e-6)
    half = loss(student.bfloat16(), teacher.bfloat16(), target)
    assert half.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss(student.float(), teacher.float(), target).dtype == torch.float32


@pytest.mark.parametrize("name", sorted(set(FUNCTIONS_WITH_TARGET) - {"cross_entropy"}))
def test_gradients_reach_only_the_student(name):
    student, teacher, target = make_inputs(seed=16)
    teacher = teacher.clone().requires_grad_(True)
    FUNCTIONS_WITH_TARGET[name](student, teacher, target).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


ERROR_CASES = [
    ("student logits", lambda s, t, y: F.kd(s, t[:, :-1])),
    ("student logits", lambda s, t, y: F.dkd(s, t[:-1], y)),
    ("target shape", lambda s, t, y: F.tckd(s, t, y[:-1])),
    ("target shape", lambda s, t, y: F.cross_entropy(s, y[:, None])),
    ("integer class indices", lambda s, t, y: F.nckd(s, t, y.double())),
    ("outside", lambda s, t, y: F.dkd(s, t, torch.full_like(y, 10))),
    ("outside", lambda s, t, y: F.tckd(s, t, torch.full_like(y, -1))),
    ("outside", lambda s, t, y: F.cross_entropy(s, torch.full_like(y, 99))),
    ("at least 3 classes", lambda s, t, y: F.nckd(s[:, :2], t[:, :2], y % 2)),
    ("at least 3 classes", lambda s, t, y: F.dkd(s[:, :2], t[:, :2], y % 2)),
    ("temperature must be positive", lambda s, t, y: F.kd(s, t, temperature=0.0)),
    ("temperature must be positive", lambda s, t, y: F.dkd(s, t, y, temperature=-1.0)),
    ("temperature must be positive", lambda s, t, y: F.dtkd(s, t, temperature=0.0)),
    ("temperature must be positive", lambda s, t, y: F.nckd(s, t, y, temperature=-torch.ones(16, 1))),
    ("dynamic temperatures", lambda s, t, y: F.dtkd(s, -t - 10)),
    ("dynamic temperatures", lambda s, t, y: F.dynamic_decoupled(s - 100, t, y)),
    ("keep must be a bool mask", lambda s, t, y: F.nckd(s, t, y, keep=torch.ones(16, 10))),
    ("non-negative integer", lambda s, t, y: F.topk_keep_mask(t, y, -1)),
]


@pytest.mark.parametrize("match,call", ERROR_CASES, ids=[f"{i}-{m}" for i, (m, _) in enumerate(ERROR_CASES)])
def test_errors(match, call):
    student, teacher, target = make_inputs(seed=17)
    with pytest.raises(ValueError, match=match):
        call(student, teacher, target)


def test_dtkd_guard_clamps_instead_of_raising():
    student, teacher, _ = make_inputs(seed=18)
    teacher = -teacher - 10  # maxima of opposite signs: reference temperatures negative or huge
    student_temperature, teacher_temperature = F.dynamic_temperatures(student, teacher, guard=True)
    for value in (student_temperature, teacher_temperature):
        assert value.min() >= 1.0 and value.max() <= 16.0
    loss = F.dtkd(student, teacher, guard=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    nan_rows = torch.full((4, 10), float("nan"), dtype=torch.float64)
    guarded = F.dynamic_temperatures(nan_rows, nan_rows, guard=True)
    assert torch.equal(guarded[0], torch.full((4, 1), 4.0, dtype=torch.float64))


def test_validate_false_skips_value_checks():
    student, teacher, target = make_inputs(seed=19)
    negative = F.dtkd(student, -teacher - 10, validate=False)  # reference behaviour, unguarded
    assert negative.dtype == torch.float64
    value = F.nckd(student, teacher, target, temperature=torch.full((16, 1), 4.0, dtype=torch.float64),
                   validate=False)
    torch.testing.assert_close(value, F.nckd(student, teacher, target))


def test_minus_infinity_logits_act_as_absent_classes():
    """Token-level use masks vocabulary entries with -inf in both models: same as dropping them.
    (DTKD is excluded: its gradient through T_s = f(max z) meets z / T_s with z = -inf.)"""
    student, teacher, target = make_inputs(classes=10, seed=20)
    target = target % 9
    full_s = torch.cat([student, torch.full((16, 1), float("-inf"), dtype=torch.float64)], dim=1)
    full_t = torch.cat([teacher, torch.full((16, 1), float("-inf"), dtype=torch.float64)], dim=1)
    for loss in (lambda s, t: F.kd(s, t), lambda s, t: F.dkd(s, t, target),
                 lambda s, t: F.nckd(s, t, target, keep=F.topk_keep_mask(t, target, 3))):
        value = loss(full_s, full_t)
        grad, = torch.autograd.grad(value, student)
        torch.testing.assert_close(value, loss(student, teacher))
        assert torch.isfinite(grad).all()


def test_confident_rows_do_not_underflow_in_float32():
    """A gap of 1000 logits underflows the reference's summed probabilities to log(0) = -inf;
    deepkd's log-sum-exp form gives the exact finite value (checked against float64)."""
    student, teacher, target = make_inputs(seed=21)
    student = student.detach().clone()
    student.scatter_(1, target[:, None], 1000.0)
    for loss in (F.tckd, F.nckd, F.dkd):
        narrow = loss(student.float(), teacher.float(), target, temperature=1.0)
        wide = loss(student, teacher, target, temperature=1.0)
        assert torch.isfinite(narrow)
        torch.testing.assert_close(narrow.double(), wide, rtol=1e-5, atol=1e-4)
    gt, other = ref_masks(student.float(), target)
    binary = ref_cat_mask(torch.softmax(student.float(), dim=1), gt, other)
    assert torch.isinf(torch.log(binary)).any()  # the reference arithmetic would give inf here
