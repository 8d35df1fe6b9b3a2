"""``optimizer.stream_momentum: auto``: the GSNR -> momentum rule, its config, and the trainer's use of it
(measured, set, logged, checkpointed, resumed bit for bit)."""
import json
import math

import pytest
import torch
from conftest import tiny_config, trained_teacher
from torch import nn

from deepkd.engine.checkpoint import load_checkpoint
from deepkd.optim import DecoupledMomentumSGD, gsnr, stream_grads
from deepkd.optim import GSNRMomentum as _Rule
from deepkd.train.config import ConfigError, config_to_dict
from deepkd.train.config_errors import validate_config
from deepkd.train.loop import train

MU, DELTA = 0.9, 0.075
HIGH, LOW = MU + DELTA, MU - DELTA
PAPER = {"task": HIGH, "target": LOW, "non_target": HIGH}


def GSNRMomentum(*args, **kwargs):  # noqa: N802 - the tests of the interval rule (deepkd <= 0.1's default)
    return _Rule(*args, **{"invariant": "interval", **kwargs})


# -- the rule ---------------------------------------------------------------------------------------
def steps(momenta):
    """The streams' steady-state step multipliers 1 / (1 - m)."""
    return {k: 1 / (1 - m) for k, m in momenta.items()}


@pytest.mark.parametrize("gsnrs", [None, {"task": 3.0, "target": 0.01, "non_target": 3.0},
                                   {"task": 1.0, "target": 0.01, "non_target": 100.0},
                                   {"task": 5.0, "target": 5.0, "non_target": 5.0}, {"task": 2.0, "target": 0.5}])
@pytest.mark.parametrize("mu, delta", [(0.9, 0.075), (0.9, 0.05), (0.8, 0.1)])
def test_mean_step_rule_keeps_sgds_mean_step_and_the_intervals_step_ratio(gsnrs, mu, delta):
    rule = _Rule(mu=mu, delta=delta, smoothing=0.0)
    momenta = rule.initial() if gsnrs is None else rule.update(gsnrs)
    a = steps(momenta)
    assert sum(a.values()) / 3 == pytest.approx(1 / (1 - mu), rel=1e-12)
    ratio = max(a.values()) / min(a.values())
    measured = gsnrs is None or len(set(gsnrs.values())) > 1
    assert ratio == pytest.approx((1 - mu + delta) / (1 - mu - delta) if measured else 1.0, rel=1e-12)
    if gsnrs and len(gsnrs) == 3:  # monotone: a higher GSNR never gets a lower momentum
        order = sorted(gsnrs, key=gsnrs.get)
        assert [momenta[k] for k in order] == sorted(momenta[k] for k in order)


def test_mean_step_rule_at_the_papers_ordering_by_hand():
    """a = 10 * (sqrt 7, 1 / sqrt 7, sqrt 7) / mean = (14, 2, 14): momenta 13/14, 1/2, 13/14."""
    momenta = _Rule().initial()
    assert momenta == pytest.approx({"task": 13 / 14, "target": 0.5, "non_target": 13 / 14}, abs=1e-12)
    assert _Rule(invariant="interval").initial() == PAPER
    with pytest.raises(ValueError, match="invariant"):
        _Rule(invariant="mean")


def test_initial_coefficients_are_the_paper_rule():
    rule = GSNRMomentum()
    assert (rule.mu, rule.delta, rule.every, rule.samples) == (MU, DELTA, 200, 32)
    assert rule.initial() == rule.momenta() == PAPER
    assert GSNRMomentum(streams=("task", "other")).initial() == {"task": HIGH, "other": MU}


def test_paper_ordering_gives_the_paper_rule_exactly():
    rule = GSNRMomentum(smoothing=0.0)
    assert rule.update({"task": 3.0, "target": 0.01, "non_target": 3.0}) == PAPER


def test_highest_gets_mu_plus_delta_lowest_mu_minus_delta_middle_linear_in_log_gsnr():
    rule = GSNRMomentum(smoothing=0.0)
    momenta = rule.update({"task": 1.0, "target": 100.0, "non_target": 10.0})  # reversed: target highest
    assert momenta["target"] == HIGH and momenta["task"] == LOW
    assert momenta["non_target"] == pytest.approx(MU)  # log 10 is half-way between log 1 and log 100
    momenta = rule.update({"task": 1.0, "target": 1000.0, "non_target": 10.0})
    assert momenta["non_target"] == pytest.approx(LOW + 2 * DELTA / 3)  # a third of the way in log GSNR


def test_monotone_bounded_and_scale_free():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        values = (10 ** (torch.rand(3, generator=generator) * 8 - 4)).tolist()
        gsnrs = dict(zip(("task", "target", "non_target"), values))
        momenta = GSNRMomentum(smoothing=0.0).update(gsnrs)
        scaled = GSNRMomentum(smoothing=0.0).update({k: v * 37.0 for k, v in gsnrs.items()})
        assert all(LOW <= m <= HIGH for m in momenta.values())
        order = sorted(gsnrs, key=gsnrs.get)
        assert [momenta[k] for k in order] == sorted(momenta.values())  # higher GSNR, no lower momentum
        assert max(momenta.values()) == HIGH and min(momenta.values()) == LOW
        assert scaled == pytest.approx(momenta, abs=1e-12)


def test_ties():
    rule = GSNRMomentum(smoothing=0.0)
    assert rule.update({"task": 2.0, "target": 2.0, "non_target": 2.0}) == {k: MU for k in PAPER}
    assert rule.update({"task": 5.0, "target": 0.5, "non_target": 5.0}) == PAPER
    assert rule.update({"task": 0.5, "target": 5.0, "non_target": 0.5}) == {"task": LOW, "target": HIGH,
                                                                             "non_target": LOW}


@pytest.mark.parametrize("bad", [float("nan"), 0.0, float("inf"), -1.0, None])
def test_missing_measurements_leave_the_average_alone(bad):
    rule = GSNRMomentum(smoothing=0.5)
    rule.update({"task": 4.0, "target": 1.0, "non_target": 2.0})
    before = dict(rule.smoothed)
    rule.update({"task": 4.0, "target": bad, "non_target": 2.0})
    assert rule.smoothed["target"] == before["target"] and rule.measurements == 2
    fresh = GSNRMomentum()
    momenta = fresh.update({"task": bad, "non_target": 3.0})  # target absent, task missing
    assert set(fresh.smoothed) == {"non_target"}
    assert momenta == {"task": HIGH, "target": LOW, "non_target": MU}  # a lone stream ties with itself
    assert GSNRMomentum().update({}) == PAPER


def test_smoothing_is_an_ema_of_log_gsnr():
    rule = GSNRMomentum(smoothing=0.75)
    rule.update({"task": 100.0, "target": 1.0, "non_target": 10.0})
    assert rule.smoothed == pytest.approx({"task": math.log(100), "target": 0.0, "non_target": math.log(10)})
    momenta = rule.update({"task": 1.0, "target": 100.0, "non_target": 10.0})  # one reversed measurement
    assert rule.smoothed["task"] == pytest.approx(0.75 * math.log(100))
    assert rule.smoothed["target"] == pytest.approx(0.25 * math.log(100))
    assert momenta["task"] == HIGH and momenta["target"] == LOW  # not flipped by a single measurement
    for _ in range(20):
        momenta = rule.update({"task": 1.0, "target": 100.0, "non_target": 10.0})
    assert momenta["task"] == LOW and momenta["target"] == HIGH


def test_min_log_range_makes_near_ties_continuous():
    plain, wide = GSNRMomentum(smoothing=0.0), GSNRMomentum(smoothing=0.0, min_log_range=2.0)
    near = {"task": 1.1, "target": 1.0, "non_target": 1.05}
    assert plain.update(near)["task"] == HIGH
    momenta = wide.update(near)
    assert momenta["task"] == pytest.approx(MU + DELTA * math.log(1.1) / 2.0)
    assert momenta["target"] == pytest.approx(MU - DELTA * math.log(1.1) / 2.0)
    far = {"task": 100.0, "target": 1.0, "non_target": 10.0}
    assert wide.update(far) == pytest.approx(plain.update(far))  # a range above it spans the interval


def test_state_dict_round_trip():
    rule = GSNRMomentum(smoothing=0.8)
    for values in ([3.0, 0.2, 1.0], [2.0, 0.3, 5.0]):
        rule.update(dict(zip(PAPER, values)))
    copy = GSNRMomentum(smoothing=0.8)
    copy.load_state_dict(json.loads(json.dumps(rule.state_dict())))
    assert copy.momenta() == rule.momenta() and copy.measurements == 2
    assert copy.update({"task": 0.1, "target": 9.0}) == rule.update({"task": 0.1, "target": 9.0})
    with pytest.raises(ValueError, match="not among"):
        GSNRMomentum(streams=("task",)).load_state_dict(rule.state_dict())


@pytest.mark.parametrize("kwargs, match", [
    ({"mu": 0.95, "delta": 0.075}, r"mu \+ delta"), ({"mu": 0.05, "delta": 0.075}, "mu - delta"),
    ({"delta": -0.1}, "delta >= 0"), ({"smoothing": 1.0}, "smoothing"), ({"min_log_range": -1.0}, "min_log_range"),
    ({"every": 0}, "every"), ({"samples": 1}, "samples"), ({"streams": ("a", "a")}, "distinct"),
])
def test_invalid_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GSNRMomentum(**kwargs)


def test_unknown_stream_is_an_error():
    with pytest.raises(ValueError, match="no momentum"):
        GSNRMomentum().update({"task": 1.0, "kd": 2.0})


# -- a problem whose GSNR ordering is known -----------------------------------------------------------
def _streams(logits, target, scale):
    """Losses whose per-sample gradients w.r.t. a linear layer are ``x * scale[:, stream]``: the scale of
    ``target`` is 1 + small noise (consistent, high GSNR), of ``task`` a random sign (mean 0, GSNR ~
    1/n), of ``non_target`` 1 + unit noise (in between)."""
    out = logits.sum(1)
    return {k: (out * scale[:, i]).sum() for i, k in enumerate(("task", "target", "non_target"))}


def test_known_gsnr_ordering_drives_the_momenta():
    torch.manual_seed(0)
    model = nn.Linear(6, 3, bias=False)
    params = list(model.parameters())
    opt = DecoupledMomentumSGD(params, lr=0.01, momentum=GSNRMomentum().initial(), merge_equal=False)
    rule = GSNRMomentum(smoothing=0.5, every=2, samples=64)
    for step in range(1, 9):
        x = 1.0 + 0.05 * torch.randn(64, 6)
        scale = torch.stack([torch.randint(0, 2, (64,)) * 2.0 - 1.0, 1 + 0.05 * torch.randn(64),
                             1 + torch.randn(64)], dim=1)
        terms = _streams(model(x), None, scale)
        opt.step(stream_grads({k: v / 64 for k, v in terms.items()}, params))
        if rule.due(step):
            measured = gsnr(model, _streams, x, torch.zeros(64, dtype=torch.long), extra=(scale,))
            opt.set_momentum(rule.update({k: v["overall"] for k, v in measured.items()}))
    assert measured["target"]["overall"] > measured["non_target"]["overall"] > measured["task"]["overall"]
    momenta = opt.stream_momentum
    assert momenta["target"] == HIGH and momenta["task"] == LOW and LOW < momenta["non_target"] < HIGH
    assert rule.measurements == 4


def test_one_buffer_per_stream_makes_a_change_of_coefficients_exact():
    """The paper's initial coefficients tie task and non_target; after the rule separates them, the
    update equals the per-stream equations (a shared buffer could not be split exactly)."""
    torch.manual_seed(1)
    param = nn.Parameter(torch.randn(5))
    opt = DecoupledMomentumSGD([param], lr=0.1, momentum=dict(PAPER), weight_decay=0.0, merge_equal=False)
    grads = [{k: torch.randn(5) for k in PAPER} for _ in range(4)]
    coefficients = [PAPER, PAPER, {"task": 0.83, "target": 0.9, "non_target": 0.97},
                    {"task": 0.83, "target": 0.9, "non_target": 0.97}]
    expected, buffers = param.detach().clone(), {}
    for grad, momentum in zip(grads, coefficients):
        opt.set_momentum(momentum)
        opt.step({k: [g] for k, g in grad.items()})
        for k, g in grad.items():
            buffers[k] = g.clone() if k not in buffers else momentum[k] * buffers[k] + g
        expected = expected - 0.1 * sum(buffers.values())
    assert torch.allclose(param.detach(), expected, atol=1e-6)


# -- config -------------------------------------------------------------------------------------------
def _raw(optimizer, method=None, **more):
    return {"student": {"name": "cnn_w4"}, "teacher": {"name": "cnn_w4", "weights": "t.pt"},
            "method": method or {"name": "deepkd_dkd"}, "optimizer": optimizer, **more}


def test_auto_config_resolves_every_default():
    cfg = validate_config(_raw({"name": "decoupled", "stream_momentum": "auto", "auto_momentum": {"every": 50}}))
    optimizer = config_to_dict(cfg)["optimizer"]
    assert optimizer["stream_momentum"] == "auto" and optimizer["merge_equal"] is False
    assert optimizer["auto_momentum"] == {"mu": MU, "delta": DELTA, "smoothing": 0.9, "min_log_range": 0.0,
                                          "every": 50, "samples": 32, "invariant": "mean_step"}
    assert config_to_dict(validate_config(config_to_dict(cfg))) == config_to_dict(cfg)  # a recipe again
    plain = config_to_dict(validate_config(_raw({"name": "decoupled"})))["optimizer"]
    assert "auto_momentum" not in plain and plain["merge_equal"] is True


@pytest.mark.parametrize("raw, match", [
    (_raw({"name": "decoupled", "auto_momentum": {"mu": 0.9}}), "auto_momentum is read only with stream_momentum"),
    (_raw({"name": "sgd", "stream_momentum": "auto"}, method={"name": "dkd"}),
     r"optimizer 'sgd' does not use optimizer.stream_momentum \(only 'decoupled'\)"),
    (_raw({"name": "sgd", "auto_momentum": {}}, method={"name": "dkd"}), "optimizer 'sgd' does not use"),
    (_raw({"name": "decoupled", "stream_momentum": "auto", "merge_equal": True}), "set merge_equal: false"),
    (_raw({"name": "decoupled", "stream_momentum": "auto", "auto_momentum": {"mu": 0.95}}), r"mu \+ delta"),
    (_raw({"name": "decoupled", "stream_momentum": "auto", "auto_momentum": {"smoothng": 0.5}}),
     "did you mean 'optimizer.auto_momentum.smoothing'"),
    (_raw({"name": "decoupled", "stream_momentum": "auto", "auto_momentum": {"samples": 1}}), "samples"),
    (_raw({"name": "decoupled", "stream_momentum": "fast"}), "stream_momentum is 'auto' or"),
])
def test_auto_config_errors(raw, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(raw)


def test_auto_refused_for_two_view_methods(monkeypatch):
    from deepkd.losses.registry import METHODS

    def two_view():  # a registered builder is all the config reads
        raise AssertionError("not built")

    monkeypatch.setitem(METHODS._builders, "two_view_test", two_view)
    monkeypatch.setitem(METHODS._info, "two_view_test", {"views": 2})
    with pytest.raises(ConfigError, match="auto measures per-sample gradients, which method 'two_view_test'"):
        validate_config(_raw({"name": "decoupled", "stream_momentum": "auto"}, method={"name": "two_view_test"}))
    validate_config(_raw({"name": "decoupled"}, method={"name": "two_view_test"}))  # given coefficients: fine


def test_auto_refused_for_detection():
    raw = {"student": {"name": "tiny_fasterrcnn"}, "method": {"name": "ce"},
           "data": {"dataset": "synthetic_coco"}, "schedule": {"name": "multistep_iter", "epochs": 1},
           "optimizer": {"name": "decoupled", "stream_momentum": "auto"}}
    with pytest.raises(ConfigError, match="which detection does not have"):
        validate_config(raw)


# -- the trainer --------------------------------------------------------------------------------------
def _auto_run(tmp_path, teacher, experiment, **changes):
    return tiny_config(tmp_path, experiment=experiment, method={"name": "deepkd_dkd", "warmup_epochs": 1},
                       teacher={"name": "cnn_w4", "weights": teacher},
                       optimizer={"name": "decoupled", "lr": 0.05, "stream_momentum": "auto",
                                  "auto_momentum": {"every": 2, "samples": 8, "smoothing": 0.5}}, **changes)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_auto_momentum_end_to_end_and_exact_resume(tmp_path):
    teacher = trained_teacher(tmp_path)
    train(_auto_run(tmp_path, teacher, "full"))
    full = tmp_path / "runs" / "full" / "seed3"
    measured = _records(full / "gsnr.jsonl")
    assert [r["step"] for r in measured] == [2, 4, 6, 8, 10]
    streams = ("task", "target", "non_target")
    replay = _Rule(smoothing=0.5)  # the logged momenta are the (mean_step) rule applied to the logged GSNRs
    for record in measured:
        expected = replay.update({k: record[f"gsnr/{k}"] for k in streams})
        assert {k: record[f"momentum/{k}"] for k in streams} == expected
        a = steps(expected)
        assert max(a.values()) / min(a.values()) == pytest.approx(7.0) and sum(a.values()) / 3 == pytest.approx(10.0)
    initial = _Rule().initial()
    assert any(r[f"momentum/{k}"] != initial[k] for r in measured for k in streams)  # the rule moved them
    epochs = _records(full / "metrics.jsonl")
    assert [{k: r[f"momentum/{k}"] for k in streams} for r in epochs] == \
        [{k: measured[i][f"momentum/{k}"] for k in streams} for i in (1, 4)]  # steps 4 and 10 end the epochs
    ckpt = load_checkpoint(full / "last.pt")
    assert ckpt["optimizer"]["param_groups"][0]["stream_momentum"] == replay.momenta()
    assert ckpt["optimizer"]["param_groups"][0]["merge_equal"] is False
    assert ckpt["auto_momentum"] == replay.state_dict()

    assert train(_auto_run(tmp_path, teacher, "cut", train__stop_after_steps=6))["status"] == "stopped"
    assert train(_auto_run(tmp_path, teacher, "cut"), resume=True)["status"] == "finished"
    cut = tmp_path / "runs" / "cut" / "seed3"
    resumed = load_checkpoint(cut / "last.pt")
    for key in ckpt["model"]:
        assert torch.equal(ckpt["model"][key], resumed["model"][key]), key
    assert resumed["optimizer"]["param_groups"] == ckpt["optimizer"]["param_groups"]
    for index, state in ckpt["optimizer"]["state"].items():
        for name, buffer in state.items():
            assert torch.equal(buffer, resumed["optimizer"]["state"][index][name]), name
    assert resumed["auto_momentum"] == ckpt["auto_momentum"]
    assert _records(cut / "gsnr.jsonl") == measured
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [strip(r) for r in _records(cut / "metrics.jsonl")] == [strip(r) for r in epochs]


def _ranks_worker(rank, init_file, results):
    from types import SimpleNamespace

    import torch.distributed as dist

    from deepkd.engine.distributed import Dist
    from deepkd.losses import build_method
    from deepkd.train.gsnr_probe import adapt_momentum, measure_gsnr

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)  # one model on both ranks
    student, teacher = nn.Linear(8, 5), nn.Linear(8, 5)
    torch.manual_seed(100 + rank)  # a different batch on each rank
    images, targets = torch.randn(16, 8), torch.randint(0, 5, (16,))
    optimizer = DecoupledMomentumSGD(student.parameters(), lr=0.1, momentum=PAPER, merge_equal=False)
    run = SimpleNamespace(auto_momentum=GSNRMomentum(every=3, samples=16), ctx=Dist(rank, 2), optimizer=optimizer,
                          device=torch.device("cpu"), student=student, teacher=teacher, writer=None,
                          method=build_method("deepkd_dkd", warmup_epochs=1))
    adapt_momentum(run, images, targets, 1, 2)  # not due: nothing measured
    assert run.auto_momentum.measurements == 0
    adapt_momentum(run, images, targets, 1, 3)
    results[rank] = (optimizer.stream_momentum, measure_gsnr(run, images, targets, 1, samples=16))
    dist.destroy_process_group()


def test_every_rank_sets_the_momenta_of_the_rank_averaged_gsnr(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_ranks_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    (momenta_a, local_a), (momenta_b, local_b) = results[0], results[1]
    assert momenta_a == momenta_b and local_a != local_b
    averaged = {k.removeprefix("gsnr/"): (local_a[k] + local_b[k]) / 2 for k in local_a}
    assert momenta_a == pytest.approx(GSNRMomentum().update(averaged), abs=1e-12)
