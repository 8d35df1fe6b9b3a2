"""Every registered method (parametrized over list_methods()) and the method-specific formulas."""
import inspect
import warnings

import pytest
import torch

from deepkd.losses import STREAMS, LossTerm, Method, build_method, list_methods, total_loss
from deepkd.losses import functional as F
from deepkd.losses.registry import METHODS

ALL = [n for n in list_methods() if not getattr(METHODS.get(n), "features", False)]  # feature methods: own tests
PLAIN_TYPES = (int, float, bool, str)


def views(name):
    """2 for the two-view methods (MLKD, CRLD: logits ``[2, B, C]``), else 1."""
    return getattr(METHODS.get(name), "views", 1)


def inputs(batch=8, classes=10, seed=0, shape=None, views=1):
    generator = torch.Generator().manual_seed(seed)
    lead = (2, batch) if views == 2 else (batch,)
    student = torch.randn(*lead, classes, generator=generator) * 2 + 1.5
    teacher = torch.randn(*lead, classes, generator=generator) * 3 + 2.0
    target = torch.randint(0, classes, (batch,), generator=generator)
    if shape is not None:
        student, teacher = student.reshape(*shape, classes), teacher.reshape(*shape, classes)
        target = target.reshape(shape)
    return student.requires_grad_(True), teacher.requires_grad_(True), target


def run(method, student, teacher, target, epoch):
    return method(student, teacher if method.needs_teacher else None, target, epoch=epoch)


def test_expected_methods_are_registered():
    assert {"ce", "kd", "dkd", "dtkd", "dtkd_dkd", "deepkd", "deepkd_kd", "deepkd_dkd", "deepkd_dtkd",
            "mlkd", "crld", "deepkd_mlkd", "deepkd_crld"} <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_builds_with_defaults_and_returns_valid_terms(name):
    method = build_method(name)
    assert isinstance(method, Method)
    student, teacher, target = inputs(views=views(name))
    terms = run(method, student, teacher, target, epoch=30)
    assert terms and all(isinstance(t, LossTerm) for t in terms.values())
    assert {t.stream for t in terms.values()} <= set(STREAMS)
    assert any(t.stream == "task" for t in terms.values())
    for term in terms.values():
        assert term.value.dim() == 0 and term.value.dtype == torch.float32 and torch.isfinite(term.value)
    if method.needs_teacher:
        assert {t.stream for t in terms.values()} - {"task"}, "a distillation method needs a distillation term"


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_only_the_student(name):
    method = build_method(name)
    student, teacher, target = inputs(seed=1, views=views(name))
    total_loss(run(method, student, teacher, target, epoch=30)).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_warmup_scales_distillation_terms_only(name):
    params = inspect.signature(METHODS.get(name)).parameters
    method = build_method(name, **({"warmup_epochs": 20} if "warmup_epochs" in params else {}))
    student, teacher, target = inputs(seed=2, views=views(name))
    first = run(method, student, teacher, target, epoch=1)
    full = run(method, student, teacher, target, epoch=20)
    later = run(method, student, teacher, target, epoch=200)
    assert first.keys() == full.keys()
    for key, term in full.items():
        factor = 1.0 if term.stream == "task" else 1.0 / 20.0
        torch.testing.assert_close(first[key].value, factor * term.value)
        torch.testing.assert_close(later[key].value, term.value)


@pytest.mark.parametrize("name", ALL)
def test_constructor_arguments_are_flat_keywords_with_defaults(name):
    """The trainer validates recipe keys against this signature (DESIGN.md: flat typed args)."""
    for param in inspect.signature(METHODS.get(name)).parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, param.name
        assert param.default is not inspect.Parameter.empty, param.name
        allowed = param.default is None or isinstance(param.default, PLAIN_TYPES)
        assert allowed, f"{name}.{param.name} default {param.default!r} is not a plain value"


@pytest.mark.parametrize("name", ALL)
def test_sequence_logits_with_ignore_index(name):
    if views(name) == 2:
        pytest.skip("two-view methods take [2, B, C] logits: batch-level masks and correlations, no ignore_index")
    method = build_method(name)
    student, teacher, target = inputs(batch=12, seed=3)
    target = target.clone()
    target[[0, 7]] = -100
    kept = target != -100
    flat = run(method, student[kept], teacher[kept], target[kept], epoch=30)
    shaped = run(method, student.reshape(3, 4, 10), teacher.reshape(3, 4, 10), target.reshape(3, 4), epoch=30)
    for key in flat:
        torch.testing.assert_close(shaped[key].value, flat[key].value)


def test_terms_match_the_functions():
    student, teacher, target = inputs(seed=4)
    dkd = build_method("dkd", beta=6.0)(student, teacher, target, epoch=10)
    assert {k: t.stream for k, t in dkd.items()} == {"ce": "task", "tckd": "target", "nckd": "non_target"}
    torch.testing.assert_close(dkd["tckd"].value + dkd["nckd"].value,
                               0.5 * F.dkd(student, teacher, target, alpha=1.0, beta=6.0))
    kd = build_method("kd")(student, teacher, target, epoch=1)
    torch.testing.assert_close(kd["kd"].value, 0.9 * F.kd(student, teacher))
    torch.testing.assert_close(kd["ce"].value, 0.1 * torch.nn.functional.cross_entropy(student, target))
    dtkd = build_method("dtkd")(student, teacher, target, epoch=40)
    torch.testing.assert_close(dtkd["dtkd"].value, F.dtkd(student, teacher, alpha=3.0, beta=1.0))
    mixed = build_method("dtkd_dkd", alpha=2.0, beta=3.0)(student, teacher, target, epoch=40)
    terms = F.dynamic_decoupled(student, teacher, target)
    torch.testing.assert_close(mixed["tckd"].value, 2.0 * terms.tckd)
    torch.testing.assert_close(mixed["nckd"].value, 3.0 * terms.nckd)


@pytest.mark.parametrize("per_sample", [False, True])
def test_deepkd_kd_base(per_sample):
    student, teacher, target = inputs(seed=5)
    terms = build_method("deepkd_kd", per_sample_weight=per_sample)(student, teacher, target, epoch=1)
    parts = F.decoupled(student, teacher, target, temperature=4.0)
    expected = parts.weighted_nckd if per_sample else (1 - parts.teacher_target_prob) * parts.nckd
    torch.testing.assert_close(terms["nckd"].value, expected)
    torch.testing.assert_close(terms["tckd"].value, parts.tckd)
    torch.testing.assert_close(terms["ce"].value, 0.1 * torch.nn.functional.cross_entropy(student, target))
    if per_sample:  # the paper's form: the two streams add up to KD exactly
        torch.testing.assert_close(terms["tckd"].value + terms["nckd"].value, F.kd(student, teacher))


def test_deepkd_generic_builder_dispatches_on_base():
    assert type(build_method("deepkd", base="kd")) is type(build_method("deepkd_kd"))
    assert type(build_method("deepkd")) is type(build_method("dkd"))
    assert type(build_method("deepkd", base="dtkd", guard=True)) is type(build_method("dtkd_dkd"))
    assert build_method("deepkd", base="kd").ce_weight == 0.1
    assert build_method("deepkd", base="dkd", topk=True, topk_ramp_end=90).dtm.ramp_end == 90
    with pytest.raises(ValueError, match="base must be one of"):
        build_method("deepkd", base="crd")
    with pytest.raises(ValueError, match="did you mean 'temperature'"):
        build_method("deepkd", base="kd", temperatur=2.0)
    with pytest.raises(ValueError, match="has no argument 'beta'"):
        build_method("deepkd", base="kd", beta=2.0)


TOPK_METHODS = [n for n in ALL if "topk" in inspect.signature(METHODS.get(n)).parameters]


@pytest.mark.parametrize("name", TOPK_METHODS)
def test_dynamic_topk_mask_applies_to_nckd_only(name):
    student, teacher, target = inputs(batch=8, classes=40, seed=6, views=views(name))
    plain = build_method(name, warmup_epochs=20)
    masked = build_method(name, warmup_epochs=20, topk=True, topk_ramp_end=150)
    assert plain.topk(1) is None and masked.topk(1) is None  # C unknown before the first forward
    early_plain, early = run(plain, student, teacher, target, 5), run(masked, student, teacher, target, 5)
    assert masked.topk(5) == 2 and masked.topk(150) == 40 and plain.topk(5) is None
    torch.testing.assert_close(early["tckd"].value, early_plain["tckd"].value)
    assert (early["nckd"].value - early_plain["nckd"].value).abs() > 1e-4
    late_plain, late = run(plain, student, teacher, target, 150), run(masked, student, teacher, target, 150)
    torch.testing.assert_close(late["nckd"].value, late_plain["nckd"].value)


def test_ce_needs_no_teacher():
    method = build_method("ce")
    assert method.needs_teacher is False
    student, _, target = inputs(seed=7)
    terms = method(student, None, target, epoch=1)
    torch.testing.assert_close(terms["ce"].value, torch.nn.functional.cross_entropy(student, target))


@pytest.mark.parametrize("name,kwargs,match", [
    ("kd", {"temperature": 0.0}, "temperature must be positive"),
    ("dkd", {"warmup_epochs": -1}, "warmup_epochs must be >= 0"),
    ("dkd", {"topk": True, "topk_start_fraction": 1.5}, "topk_start_fraction"),
    ("deepkd_kd", {"topk": True, "topk_ramp_start": 100, "topk_ramp_end": 50}, "must not precede"),
])
def test_constructor_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_method(name, **kwargs)


def test_unknown_method_names_the_closest():
    with pytest.raises(KeyError, match="dkd"):
        build_method("dkdd")


def test_dtkd_method_raises_on_bad_temperatures_unless_guarded():
    student, teacher, target = inputs(seed=8)
    flipped = -teacher.detach() - 10
    with pytest.raises(ValueError, match="guard=True"):
        build_method("dtkd")(student, flipped, target, epoch=1)
    terms = build_method("dtkd", guard=True)(student, flipped, target, epoch=1)
    assert all(torch.isfinite(t.value) for t in terms.values())


def test_only_ramp_arguments_default_to_none():
    """DTM's ramp start (None = warm-up) and deepkd's ramp end (None = the base's default)."""
    nullable = {param.name for name in ALL
                for param in inspect.signature(METHODS.get(name)).parameters.values() if param.default is None}
    assert nullable == {"topk_ramp_start", "topk_ramp_end", "correlation_group_size"}


def test_topk_mask_warns_when_nckd_starts_over_one_class():
    """5% of 10 classes is K = 1: NCKD over one kept class is exactly zero, and the user is told until when."""
    from deepkd.losses.topk import DynamicTopK

    teacher, target = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    student = torch.randn(4, 10, requires_grad=True)
    mask = DynamicTopK(enabled=True, start_fraction=0.05, ramp_start=2, ramp_end=13, count_target=False,
                       warmup_epochs=2)
    with pytest.warns(UserWarning, match="zero until epoch 3"):
        keep = mask.keep(teacher, target, epoch=1, ignore_index=-100)
    assert keep.sum(dim=1).tolist() == [1, 1, 1, 1]
    nckd = F.decoupled(student, teacher, target, temperature=4.0, keep=keep).nckd
    assert float(nckd.detach().abs().max()) == 0.0
    wide = DynamicTopK(enabled=True, start_fraction=0.2, ramp_start=2, ramp_end=13, count_target=False,
                       warmup_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wide.keep(teacher, target, epoch=1, ignore_index=-100)
