"""CTKD (Li et al., AAAI 2023): the gradient-reversal layer, the cosine curriculum, the learnable
temperature on a KD, DKD or DTKD base, and a 2-epoch run that trains it and resumes bit-exactly."""
import math

import pytest
import torch

from deepkd.errors import ConfigError
from deepkd.losses import build_method, total_loss
from deepkd.losses import functional as F
from deepkd.losses.ctkd import curriculum_lambda, reverse_gradient
from tests.conftest import assert_trains_and_resumes, tiny_config, trained_teacher


def inputs(batch=8, classes=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * 2 + 1.5
    teacher = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * 3 + 2.0
    target = torch.randint(0, classes, (batch,), generator=generator)
    return student.requires_grad_(True), teacher, target


def reference_kd(student, teacher, temperature):
    """``T^2 mean_b KL(softmax(zt/T) || softmax(zs/T))`` written out; ``temperature`` a scalar or ``[B, 1]``."""
    log_t = torch.log_softmax(teacher / temperature, dim=1)
    log_s = torch.log_softmax(student / temperature, dim=1)
    rows = (log_t.exp() * (log_t - log_s)).sum(1, keepdim=True) * temperature ** 2
    return rows.mean()


def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 3, dtype=torch.float64)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, -0.3 * upstream, rtol=0, atol=0)
    x.grad = None
    (reverse_gradient(x, 0.0) * upstream).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("epoch", [0, 1, 2, 5, 9, 10, 11, 240])
@pytest.mark.parametrize("low, high, loops", [(0.0, 1.0, 10), (0.2, 0.8, 5)])
def test_cosine_curriculum_is_the_formula(epoch, low, high, loops):
    paper = low + 0.5 * (high - low) * (1 + math.cos((1 + min(epoch, loops) / loops) * math.pi))
    # the reference's CosineDecay(max=-low, min=-high) passed with its sign to a layer that multiplies
    i = min(max(epoch, 0), loops)
    reference = -((math.cos(i * math.pi / loops) + 1.0) * 0.5 * (-low + high) - high)
    ours = curriculum_lambda(epoch, lambda_min=low, lambda_max=high, cos_epochs=loops)
    assert ours == pytest.approx(paper, abs=1e-15) and ours == pytest.approx(reference, abs=1e-15)


def test_curriculum_landmarks():
    assert curriculum_lambda(0) == 0.0 and curriculum_lambda(5) == pytest.approx(0.5, abs=1e-15)
    assert curriculum_lambda(10) == 1.0 and curriculum_lambda(100) == 1.0
    assert curriculum_lambda(1) == pytest.approx(0.0244717418524232, abs=1e-15)
    method = build_method("ctkd", cos_epochs=5, lambda_max=0.5)
    assert method.strength(5) == 0.5 and method.strength(3) == pytest.approx(0.25 * (1 - math.cos(0.6 * math.pi)))


@pytest.mark.parametrize("epoch", [1, 4, 20])
def test_global_temperature_gradient_is_the_reversed_plain_one(epoch):
    student, teacher, target = inputs(seed=1)
    method = build_method("ctkd").double()
    raw = method.learned_temperature.raw
    assert raw.item() == 1.0  # the reference's initial value: T = 1 + 20 sigmoid(1)
    total = total_loss(method(student, teacher, target, epoch=epoch))
    grad_raw, grad_student = torch.autograd.grad(total, [raw, student])
    leaf = torch.ones(1, dtype=torch.float64, requires_grad=True)
    temperature = 1.0 + 20.0 * torch.sigmoid(leaf)
    plain = 0.1 * torch.nn.functional.cross_entropy(student, target) + 0.9 * reference_kd(student, teacher, temperature)
    plain_raw, plain_student = torch.autograd.grad(plain, [leaf, student])
    strength = curriculum_lambda(epoch)
    assert strength > 0 and plain_raw.abs().item() > 1e-6
    torch.testing.assert_close(grad_raw, -strength * plain_raw, rtol=1e-10, atol=0)
    assert torch.sign(grad_raw) == -torch.sign(plain_raw)
    torch.testing.assert_close(grad_student, plain_student, rtol=1e-10, atol=1e-14)  # the student's is untouched
    torch.testing.assert_close(total, plain, rtol=1e-12, atol=0)


@pytest.mark.parametrize("base, extra", [
    ("kd", {}), ("dkd", {"beta": 2.0}), ("dkd", {"topk": True, "topk_ramp_end": 90}), ("dtkd", {}),
    ("dtkd", {"guard": True}), ("kd", {"logit_stand": True}), ("dkd", {"logit_stand": True}),
    ("dtkd", {"logit_stand": True})])
def test_ctkd_is_its_base_at_the_learned_temperature(base, extra):
    student, teacher, target = inputs(seed=2)
    method = build_method("ctkd", base_method=base, warmup_epochs=20, **extra).double()
    with torch.no_grad():
        method.learned_temperature.raw.fill_(-0.7)
    temperature = float(method.temperature(student, teacher, 1).detach())
    assert temperature == pytest.approx(1.0 + 20.0 / (1.0 + math.exp(0.7)))
    ours = method(student, teacher, target, epoch=5)
    theirs = build_method(base, temperature=temperature, warmup_epochs=20, **extra)(student, teacher, target, epoch=5)
    assert ours.keys() == theirs.keys()
    for key, term in ours.items():
        assert term.stream == theirs[key].stream
        torch.testing.assert_close(term.value, theirs[key].value, rtol=1e-12, atol=1e-15)
    ours_grad, = torch.autograd.grad(total_loss(ours), student)
    theirs_grad, = torch.autograd.grad(total_loss(theirs), student)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-10, atol=1e-14)
    assert method.topk(5) == (1 if extra.get("topk") else None)  # the base's mask: K0 = ceil(0.05 * 10)


@pytest.mark.parametrize("base", ["kd", "dkd"])
def test_instance_temperature_is_one_per_sample_and_reversed(base):
    student, teacher, target = inputs(seed=3)
    method = build_method("ctkd", base_method=base, temperature_module="instance", num_classes=10,
                          hidden_size=16).double()
    temperature = method.temperature(student, teacher, 10)
    assert temperature.shape == (8, 1) and bool(((temperature > 1) & (temperature < 21)).all())
    assert temperature.unique().numel() == 8
    terms = method(student, teacher, target, epoch=10)
    t = temperature.detach()
    if base == "kd":
        expected = 0.9 * reference_kd(student, teacher, t)
        torch.testing.assert_close(terms["kd"].value, expected, rtol=1e-12, atol=0)
    else:
        parts = F.decoupled(student, teacher, target, temperature=t)
        torch.testing.assert_close(terms["nckd"].value, 8.0 * parts.nckd, rtol=1e-12, atol=0)
    weights = list(method.learned_temperature.parameters())
    grads = torch.autograd.grad(total_loss(terms), weights + [student])
    # the plain gradient w.r.t. the MLP: the same loss with an ordinary (unreversed) temperature
    outputs = method.learned_temperature.mlp(torch.cat([teacher, student.detach()], dim=1))
    plain_t = 1 + 20 * torch.sigmoid(outputs)
    plain = total_loss(build_method("ctkd", base_method=base).terms_at(student, teacher, target, plain_t, epoch=10))
    plain_grads = torch.autograd.grad(plain, weights)
    for ours, theirs in zip(grads, plain_grads):
        torch.testing.assert_close(ours, -theirs, rtol=1e-10, atol=1e-14)  # lambda(10) = 1


def test_teacher_gets_no_gradient():
    student, teacher, target = inputs(seed=4)
    teacher.requires_grad_(True)
    for module in ("global", "instance"):
        method = build_method("ctkd", base_method="dtkd", temperature_module=module, num_classes=10).double()
        total_loss(method(student, teacher, target, epoch=3)).backward()
        assert teacher.grad is None


@pytest.mark.parametrize("arguments, match", [
    ({"base_method": "crd"}, "base_method must be one of"),
    ({"temperature": 4.0}, "ctkd learns the temperature"),
    ({"temperature_module": "instance"}, "set method.num_classes"),
    ({"temperature_module": "layer"}, "temperature_module must be one of"),
    ({"base_method": "kd", "beta": 2.0}, "has no argument 'beta'"),
    ({"base_method": "dkd", "bta": 2.0}, "did you mean 'beta'"),
    ({"cos_epochs": 0}, "cos_epochs must be a positive"),
    ({"lambda_min": 1.0, "lambda_max": 0.5}, "lambda_min <= lambda_max"),
    ({"t_start": 0.0}, "t_start > 0"),
])
def test_arguments_that_cannot_work_are_refused_in_one_sentence(arguments, match):
    with pytest.raises(ConfigError, match=match):
        build_method("ctkd", **arguments)


def test_instance_temperature_checks_the_class_count():
    student, teacher, target = inputs(classes=12)
    with pytest.raises(ConfigError, match="built for num_classes=10"):
        build_method("ctkd", temperature_module="instance", num_classes=10)(student, teacher, target, epoch=1)


def test_ctkd_trains_under_plain_sgd(tmp_path):
    """Not a DeepKD method: plain SGD needs no ``allow_base_method``."""
    cfg = tiny_config(tmp_path, method={"name": "ctkd", "base_method": "dkd"},
                      teacher={"name": "cnn_w4", "weights": "x.pt"})
    assert cfg.method.arguments() == {"base_method": "dkd"}


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    return trained_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.mark.parametrize("method", [{"name": "ctkd"},
                                    {"name": "ctkd", "base_method": "dkd", "temperature_module": "instance",
                                     "num_classes": 100, "hidden_size": 8}], ids=["global-kd", "instance-dkd"])
def test_ctkd_trains_and_resumes_bit_exactly(tmp_path, teacher_weights, method):
    state = assert_trains_and_resumes(tmp_path, teacher_weights, method)
    if method.get("temperature_module") == "instance":
        assert set(state) == {"learned_temperature.mlp.0.weight", "learned_temperature.mlp.0.bias",
                              "learned_temperature.mlp.2.weight", "learned_temperature.mlp.2.bias"}
    else:
        assert set(state) == {"learned_temperature.raw"}
        assert state["learned_temperature.raw"].item() != 1.0  # trained with the student
