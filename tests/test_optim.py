"""DecoupledMomentumSGD, stream_grads, gsnr and the LR schedules against their definitions."""
import copy

import pytest
import torch
from torch import nn

from deepkd.models import create_model, list_models
from deepkd.optim import DecoupledMomentumSGD, cosine_lr, gsnr, step_lr, stream_grads


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))


def three_losses(model, seed):
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=generator), torch.randint(0, 5, (16,), generator=generator)
    logits = model(x)
    return {"task": nn.functional.cross_entropy(logits, y), "target": logits[:, 0].pow(2).mean(),
            "non_target": logits.logsumexp(-1).mean()}


def param_groups(model):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    plain = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [{"params": decay}, {"params": plain, "weight_decay": 0.0, "lr": 0.03}]


def test_single_stream_equals_torch_sgd_bitwise():
    a, b = tiny_model(), tiny_model()
    ours = DecoupledMomentumSGD(param_groups(a), lr=0.1, momentum=0.9, weight_decay=5e-4)
    ref = torch.optim.SGD(param_groups(b), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(25):
        loss = sum(three_losses(a, step).values())
        ours.step(stream_grads({"default": loss}, [p for g in ours.param_groups for p in g["params"]]))
        ref.zero_grad()
        sum(three_losses(b, step).values()).backward()
        ref.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def literal_equations(model, momenta, steps, lr=0.05, wd=5e-4):
    """METHODS.md 4.1 written out: one buffer per stream, decay on the target stream."""
    params = list(model.parameters())
    buffers = {}
    for step in range(steps):
        losses = three_losses(model, step)
        grads = {k: torch.autograd.grad(v, params, retain_graph=True) for k, v in losses.items()}
        with torch.no_grad():
            for i, p in enumerate(params):
                total = torch.zeros_like(p)
                for k in ("task", "target", "non_target"):
                    g = grads[k][i] + (wd * p if k == "target" else 0)
                    buffers[k, i] = g.clone() if step == 0 else momenta[k] * buffers[k, i] + g
                    total += buffers[k, i]
                p -= lr * total
    return model


@pytest.mark.parametrize("momenta", [{"task": .825, "target": .825, "non_target": .95},
                                     {"task": .975, "target": .825, "non_target": .95}])
@pytest.mark.parametrize("merge", [True, False])
def test_three_streams_follow_the_equations(momenta, merge):
    ours, ref = tiny_model(1), literal_equations(tiny_model(1), momenta, 10)
    opt = DecoupledMomentumSGD(ours.parameters(), lr=0.05, momentum=momenta, weight_decay=5e-4,
                               weight_decay_stream="target", merge_equal=merge)
    expected_keys = 2 if (merge and momenta["task"] == momenta["target"]) else 3
    assert len(opt.merged_streams()) == expected_keys
    for step in range(10):
        losses = opt.merge_losses(three_losses(ours, step))
        assert len(losses) == expected_keys
        opt.step(stream_grads(losses, list(ours.parameters())))
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_per_stream_grads_into_merged_buffers_and_state_dict_round_trip():
    momenta = {"task": .825, "target": .825, "non_target": .95}
    a, b = tiny_model(2), tiny_model(2)
    opt_a = DecoupledMomentumSGD(a.parameters(), lr=0.05, momentum=momenta, weight_decay=5e-4)
    opt_b = DecoupledMomentumSGD(b.parameters(), lr=0.05, momentum=momenta, weight_decay=5e-4)
    for step in range(4):  # a: per-stream view (GSNR steps); b: merged losses
        opt_a.step(stream_grads(three_losses(a, step), list(a.parameters())))
        opt_b.step(stream_grads(opt_b.merge_losses(three_losses(b, step)), list(b.parameters())))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    c = copy.deepcopy(b)
    opt_c = DecoupledMomentumSGD(c.parameters(), lr=0.05, momentum=momenta, weight_decay=5e-4)
    opt_c.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    assert any("momentum_buffer:task+target" in s for s in opt_c.state_dict()["state"].values())
    for step in range(4, 8):
        for model, opt in ((b, opt_b), (c, opt_c)):
            opt.step(stream_grads(opt.merge_losses(three_losses(model, step)), list(model.parameters())))
    for pb, pc in zip(b.parameters(), c.parameters()):
        assert torch.equal(pb, pc)


def test_set_momentum_split_keeps_the_buffer_sum():
    model = tiny_model(3)
    opt = DecoupledMomentumSGD(model.parameters(), lr=0.05, momentum={"task": .9, "target": .9, "non_target": .5})
    opt.step(stream_grads(opt.merge_losses(three_losses(model, 0)), list(model.parameters())))
    before = [opt.state[p]["momentum_buffer:task+target"].clone() for p in model.parameters()]
    opt.set_momentum({"task": .8, "target": .9, "non_target": .5})
    assert set(opt.merged_streams()) == {"task", "target", "non_target"}
    for p, buffer in zip(model.parameters(), before):
        assert torch.equal(opt.state[p]["momentum_buffer:task"], buffer)
        assert "momentum_buffer:target" not in opt.state[p]


def test_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="weight_decay_stream"):
        DecoupledMomentumSGD(model.parameters(), lr=0.1, momentum={"task": .9}, weight_decay_stream="target")
    with pytest.raises(ValueError, match="weight_decay_stream"):  # the default stream is "target"
        DecoupledMomentumSGD(model.parameters(), lr=0.1, momentum={"task": .9, "non_target": .5})
    opt = DecoupledMomentumSGD(model.parameters(), lr=0.1, momentum={"task": .9, "target": .8})
    with pytest.raises(KeyError, match="streams"):
        opt.step({"other": [None] * 6})
    with pytest.raises(ValueError, match="parameters"):
        opt.step({"task": [None]})


def test_defaults_are_deepkd():
    opt = DecoupledMomentumSGD(tiny_model().parameters(), lr=0.1)
    assert opt.merged_streams() == {"task+target": ("task", "target"), "non_target": ("non_target",)}
    group = opt.param_groups[0]
    assert (group["weight_decay"], group["weight_decay_stream"]) == (5e-4, "target")
    single = DecoupledMomentumSGD(tiny_model().parameters(), lr=0.1, momentum=0.9)
    assert single.merged_streams() == {"default": ("default",)}
    assert single.param_groups[0]["weight_decay_stream"] == "default"


MODELS = [name for name in ("resnet8x4", "cnn_w8") if name in list_models()]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batched", [False, True, "auto"])
def test_stream_grads_equal_separate_backward_passes(name, batched):
    torch.manual_seed(0)
    model = create_model(name).train()  # BatchNorm in train mode
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
    logits = model(x)
    losses = {"task": nn.functional.cross_entropy(logits, y), "target": logits.softmax(-1)[:, 0].mean(),
              "non_target": logits.pow(2).mean()}
    params = list(model.parameters())
    ours = stream_grads(losses, params, retain_graph=True, batched=batched)
    for key, loss in losses.items():
        model.zero_grad()
        loss.backward(retain_graph=True)
        for p, g in zip(params, ours[key]):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_stream_grads_batched_failure_falls_back_once(monkeypatch):
    """A graph the batched product cannot handle gives the separate-pass result, and is remembered."""
    import deepkd.optim.streams as streams

    weight = torch.randn(5, requires_grad=True)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no batching rule")

    monkeypatch.setattr(streams, "_batched", failing)
    for _ in range(2):
        losses = {"a": (weight * weight).sum(), "b": weight.sin().sum()}
        ours = stream_grads(losses, [weight], batched=True)
        torch.testing.assert_close(ours["a"][0], 2 * weight.detach(), rtol=0, atol=0)
        torch.testing.assert_close(ours["b"][0], weight.detach().cos())
    assert len(calls) == 1
    with pytest.raises(ValueError, match="batched"):
        stream_grads({"a": weight.sum()}, [weight], batched="yes")


def test_gsnr_known_answer():
    """Loss w.x per sample: the per-sample gradient is x itself, so GSNR_j = mean(x_j)^2 / var(x_j)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    x = torch.randn(64, 4) + torch.tensor([2.0, 0.5, 0.0, -1.0])
    result = gsnr(model, lambda out, y: {"a": out.sum(), "b": 3.0 * out.sum()}, x, torch.zeros(64))
    expected = (x.double().mean(0) ** 2 / x.double().var(0, unbiased=False))
    assert result["a"]["weight"] == pytest.approx(float(expected.mean()), rel=1e-6)
    assert result["b"]["overall"] == pytest.approx(result["a"]["overall"], rel=1e-6)  # scale-free


def test_schedules():
    milestones = [150, 180, 210]
    assert step_lr(150, 0.05, milestones) == 0.05
    assert step_lr(151, 0.05, milestones) == pytest.approx(0.005)
    assert step_lr(181, 0.05, milestones) == pytest.approx(5e-4)
    assert step_lr(211, 0.05, milestones) == pytest.approx(5e-5)
    assert cosine_lr(0, 0.2, 100, 20, 0.1, 5e-5) == pytest.approx(0.02)
    assert cosine_lr(10, 0.2, 100, 20, 0.1, 5e-5) == pytest.approx(0.11)
    assert cosine_lr(20, 0.2, 100, 20, 0.1, 5e-5) == pytest.approx(0.2)
    assert cosine_lr(60, 0.2, 100, 20, 0.1, 5e-5) == pytest.approx(5e-5 + (0.2 - 5e-5) / 2)
    assert cosine_lr(100, 0.2, 100, 20, 0.1, 5e-5) == pytest.approx(5e-5)
