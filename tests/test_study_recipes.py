"""The study's recipes (benchmarks/study/<problem>/, STUDY.md): every configuration shares all settings
but what it names, and the step-matched control is derived from DeepKD's momenta by its formula."""
from pathlib import Path

import pytest

from deepkd.train.config import config_to_dict, load_config

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study"
PROBLEMS = sorted(p.name for p in STUDY.iterdir() if p.is_dir() and p.name != "teachers" and any(p.glob("*.yaml")))
SHARED = ("seed", "output_dir", "data", "student", "schedule")
CACHE = ("teacher_cache", "teacher_cache_dtype")  # the teacher's logits, cached once: distillers only


def configs(problem):
    return {p.stem: config_to_dict(load_config(p)) for p in sorted((STUDY / problem).glob("*.yaml"))}


STUDIED = ("synthetic", "fashion_mnist")  # the study's problems: every configuration; the demo's have four
CACHED = (*STUDIED, "fashion_mnist_demo2")  # the first demo problem runs its teacher live


def test_the_problems_are_there():
    assert {*STUDIED, "fashion_mnist_demo", "fashion_mnist_demo2"} <= set(PROBLEMS)
    for demo in ("fashion_mnist_demo", "fashion_mnist_demo2"):
        assert set(configs(demo)) == {"ce", "kd", "dkd", "deepkd_dkd_ref"}
    assert set(configs("synthetic")) == set(configs("fashion_mnist"))


@pytest.mark.parametrize("problem", PROBLEMS)
def test_configurations_share_everything_they_do_not_name(problem):
    found = configs(problem)
    base = found["ce"]
    for name, cfg in found.items():
        assert cfg["experiment"] == name
        for key in SHARED:
            assert cfg[key] == base[key], (name, key)
        train = {k: v for k, v in cfg["train"].items() if k not in CACHE}
        assert train == {k: v for k, v in base["train"].items() if k not in CACHE}, name
        if name != "ce":
            assert [cfg["train"][k] for k in CACHE] == ([True, "fp32"] if problem in CACHED else [False, "bf16"]), name
        assert cfg["optimizer"]["lr"] == base["optimizer"]["lr"]  # the grid sets it
        if name != "ce":
            assert cfg["teacher"] == found["dkd"]["teacher"], name
        if cfg["optimizer"]["name"] == "sgd":
            assert (cfg["optimizer"]["momentum"], cfg["optimizer"]["nesterov"]) == (0.9, False), name
            if name != "dkd_stepmatched":
                assert cfg["optimizer"]["weight_decay"] == base["optimizer"]["weight_decay"], name
        else:
            assert cfg["optimizer"]["weight_decay"] == base["optimizer"]["weight_decay"], name
    for name in [n for n in found if n.startswith("deepkd_dkd")]:
        drop_topk = lambda method: {k: v for k, v in method.items() if not k.startswith("topk")}  # noqa: E731
        assert drop_topk(found[name]["method"]) == {**drop_topk(found["dkd"]["method"]), "name": "deepkd_dkd"}, name
    if problem in STUDIED:
        assert found["dot"]["method"] == found["deepkd_kd_ref"]["method"]  # they differ in momenta alone


@pytest.mark.parametrize("problem", STUDIED)
def test_step_matched_dkd_scales_each_term_by_its_deepkd_streams_step(problem):
    found = configs(problem)
    momenta, dkd, matched = (found["deepkd_dkd_ref"]["optimizer"]["stream_momentum"], found["dkd"]["method"],
                             found["dkd_stepmatched"])
    scale = {stream: (1 - 0.9) / (1 - m) for stream, m in momenta.items()}
    decay_stream = found["deepkd_dkd_ref"]["optimizer"]["weight_decay_stream"]
    assert matched["method"]["ce_weight"] == pytest.approx(dkd["ce_weight"] * scale["task"], rel=1e-5)
    assert matched["method"]["alpha"] == pytest.approx(dkd["alpha"] * scale["target"], rel=1e-5)
    assert matched["method"]["beta"] == pytest.approx(dkd["beta"] * scale["non_target"], rel=1e-5)
    assert matched["optimizer"]["weight_decay"] == pytest.approx(
        found["dkd"]["optimizer"]["weight_decay"] * scale[decay_stream], rel=1e-5)


SHIPPED_AS = {"deepkd_kd": "deepkd_kd_ref", "deepkd_dkd": "deepkd_dkd_ref"}  # a shipped recipe's name -> the study's


def test_the_fashion_mnist_problems_shipped_recipes_are_its_configurations_at_their_confirmed_lr():
    """``deepkd train fashion_mnist/resnet20-cnn_w8/<name>`` trains the study's configuration at the lr its
    confirmation ran (the selected one), headed by that confirmation's n = 5 mean +- std."""
    import json
    import statistics

    import deepkd

    shipped_dir = Path(deepkd.__file__).parent / "configs" / "fashion_mnist" / "resnet20-cnn_w8"
    records = json.loads((STUDY.parents[1] / "docs" / "study2" / "fashion_mnist_confirm.json").read_text())["runs"]
    found = configs("fashion_mnist")
    assert len(list(shipped_dir.glob("*.yaml"))) >= 7
    for path in sorted(shipped_dir.glob("*.yaml")):
        shipped, study = config_to_dict(load_config(path)), found[SHIPPED_AS.get(path.stem, path.stem)]
        lr = shipped["optimizer"]["lr"]
        finals = [r["last_top1"] for r in records
                  if r["finished"] and r["experiment"] == f"{study['experiment']}__optimizer.lr={lr:g}"]
        assert len(finals) == 5, path.stem
        expected = f"expected top-1: {statistics.fmean(finals):.2f} +- {statistics.stdev(finals):.2f}"
        assert expected in path.read_text(), path.stem
        for cfg in (shipped, study):
            cfg["optimizer"]["lr"] = lr
            if cfg.get("teacher"):
                cfg["teacher"]["weights"] = None
            cfg["train"] = {k: cfg["train"][k] for k in CACHE}
        assert {k: v for k, v in shipped.items() if k not in ("experiment", "output_dir", "seed")} == \
            {k: v for k, v in study.items() if k not in ("experiment", "output_dir", "seed")}, path.stem
