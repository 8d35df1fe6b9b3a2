"""Strict configs: unknown keys name the closest valid key, keys a choice does not use are errors,
every shipped recipe builds and is what tools/make_recipes.py writes."""
import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

from deepkd.errors import ConfigError as DeepKDConfigError
from deepkd.losses.registry import METHODS
from deepkd.train import build
from deepkd.train.config import ConfigError, config_to_dict, load_config
from deepkd.train.config_errors import validate_config
from deepkd.train.method_config import is_deepkd_method, method_features
from deepkd.train.recipes import find_recipe, list_recipes, recipes_dir

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = {"student": {"name": "cnn_w4"}}


def _raw(**sections):
    raw = {"student": {"name": "cnn_w4"}}
    raw.update(sections)
    return raw


@pytest.mark.parametrize("raw, expected", [
    (_raw(optimizer={"momentm": 0.9}), "optimizer.momentum"),
    (_raw(data={"synthetic": {"num_trian": 10}}), "data.synthetic.num_train"),
    (_raw(schedule={"milestone": [1]}), "schedule.milestones"),
    (_raw(experimnt="x"), "experiment"),
    (_raw(train={"precison": "bf16"}), "train.precision"),
])
def test_unknown_key_names_closest(raw, expected):
    with pytest.raises(ConfigError, match=f"did you mean '{expected}'"):
        validate_config(raw)


def test_config_error_is_the_deepkd_error():
    assert ConfigError is DeepKDConfigError and issubclass(ConfigError, ValueError)


def test_method_arguments_checked_against_signature():
    with pytest.raises(ConfigError, match="did you mean 'beta'"):
        validate_config(_raw(method={"name": "dkd", "bta": 8.0}))
    with pytest.raises(ConfigError, match="dkd"):
        validate_config(_raw(method={"name": "dkdd"}))
    cfg = validate_config(_raw(method={"name": "dkd", "beta": 2.0}))
    assert cfg.method.arguments() == {"beta": 2.0}


def test_bad_values_are_one_clear_error():
    with pytest.raises(ConfigError, match="data.batch_size"):
        validate_config(_raw(data={"batch_size": 0}))
    with pytest.raises(ConfigError, match="student"):
        validate_config({})


def test_overrides_and_round_trip(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("student: {name: cnn_w4}\noptimizer: {lr: 0.1}\n")
    cfg = load_config(path, ["optimizer.lr=0.2", "data.dataset=synthetic", "data.synthetic.num_train=64",
                             "method.name=kd"])
    assert cfg.optimizer.lr == 0.2 and cfg.data.synthetic.num_train == 64 and cfg.method.name == "kd"
    resolved = config_to_dict(cfg)  # written out in full, it reads back to itself
    assert config_to_dict(validate_config(resolved)) == resolved
    assert validate_config(resolved).optimizer == cfg.optimizer and validate_config(resolved).data == cfg.data
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(path, ["optimizer.lr"])


RECIPES = list_recipes()
FEATURE = {n for n in RECIPES if n.rsplit("/", 1)[1] in METHODS and method_features(n.rsplit("/", 1)[1])}


def test_recipes_cover_every_pair():
    names = set(RECIPES)
    for pair in ["resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2", "vgg13-MobileNetV2", "ResNet50-MobileNetV2"]:
        for method in ["kd", "dkd", "dtkd", "deepkd_kd", "deepkd_dkd"]:
            assert f"cifar100/{pair}/{method}" in names
    assert "imagenet/resnet50-mobilenetv1/deepkd_dkd" in names
    for pair in {n.rsplit("/", 1)[0] for n in names
                 if n.endswith("/deepkd_dkd") and n.startswith(("cifar100", "imagenet"))}:
        assert f"{pair}/deepkd_dkd_topk" in names  # the paper's dagger rows: every pair with a DeepKD+DKD recipe
    for method in ["mlkd", "deepkd_mlkd", "crld", "deepkd_crld"]:  # spec/MLKD_CRLD.md 4, the headline pair
        assert f"cifar100/resnet32x4-resnet8x4/{method}" in names
    assert {f"imagenet/resnet34-resnet18/{m}" for m in ("crld", "deepkd_crld", "mlkd", "deepkd_mlkd")} <= names
    assert len(RECIPES) >= 200


# DOT (issue 20 item 6): mdistiller's seven DOT configs -> (lr, weight decay, delta, KD weights, published top-1)
DOT = {"cifar100/resnet32x4-resnet8x4": (0.05, 5e-4, 0.075, (4.0, 0.1, 0.9), 75.12),
       "cifar100/vgg13-vgg8": (0.05, 5e-4, 0.075, (4.0, 0.1, 0.9), 73.77),
       "cifar100/resnet32x4-ShuffleV2": (0.01, 5e-4, 0.075, (4.0, 0.1, 0.9), 75.55),
       "tinyimagenet/ResNet18-MobileNetV2": (0.2, 5e-4, 0.075, (4.0, 0.1, 0.9), 64.01),
       "tinyimagenet/ResNet18-ShuffleV2": (0.2, 5e-4, 0.075, (4.0, 0.1, 0.9), 65.75),
       "imagenet/resnet34-resnet18": (0.2, 1e-4, 0.09, (1.0, 0.5, 0.5), 71.72),
       "imagenet/resnet50-mobilenetv1": (0.2, 1e-4, 0.09, (1.0, 0.5, 0.5), 73.09)}

DOT_SOLVER = {"cifar100": (64, 240, [150, 180, 210]), "tinyimagenet": (256, 200, [60, 120, 160]),
              "imagenet": (512, 100, [30, 60, 90])}  # batch, epochs, milestones of each set's DOT configs


@pytest.mark.parametrize("pair", DOT)
def test_dot_recipes_are_kd_under_dots_two_momenta(pair):
    """Each is deepkd_kd with per-sample weights under task m - delta (with the weight decay) and
    target = non_target m + delta, the configuration tests/test_dot.py proves equal to mdistiller's DOT."""
    assert f"{pair}/dot" in RECIPES
    lr, weight_decay, delta, (temperature, ce_weight, kd_weight), top1 = DOT[pair]
    cfg = load_config(f"{pair}/dot")
    arguments = cfg.method.arguments()
    assert cfg.method.name == "deepkd_kd" and arguments["per_sample_weight"] is True
    assert (arguments["temperature"], arguments["ce_weight"], arguments["kd_weight"]) == (temperature, ce_weight,
                                                                                          kd_weight)
    momenta = cfg.optimizer.stream_momentum
    assert cfg.optimizer.name == "decoupled" and cfg.optimizer.weight_decay_stream == "task"
    assert momenta["target"] == momenta["non_target"] == pytest.approx(0.9 + delta)
    assert momenta["task"] == pytest.approx(0.9 - delta)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (lr, weight_decay)
    batch, epochs, milestones = DOT_SOLVER[pair.split("/")[0]]
    assert (cfg.data.batch_size, cfg.schedule.epochs, cfg.schedule.milestones) == (batch, epochs, milestones)
    assert f"expected top-1: {top1:.2f}" in find_recipe(f"{pair}/dot").read_text().splitlines()[1]


# coco: test_detection_train; feature methods (their connectors need the models): test_feature_recipes
@pytest.mark.parametrize("name", [n for n in RECIPES if not n.startswith("coco/") and n not in FEATURE])
def test_every_recipe_builds(name):
    cfg = load_config(name)
    text = find_recipe(name).read_text()
    assert text.startswith("# ") and "expected top-1" in text
    num_classes = {"imagenet": 1000, "cifar10": 10, "fashion_mnist": 10, "tinyimagenet": 200}.get(cfg.data.dataset, 100)
    method = build.build_method(cfg.method)
    with torch.device("meta"):
        student = build.create_model(cfg.student.name, num_classes=num_classes)
        if cfg.teacher is not None:
            build.create_model(cfg.teacher.name, num_classes=num_classes)
    optimizer = build.build_optimizer(cfg.optimizer, student)
    lr = build.build_schedule(cfg.schedule, cfg.optimizer.lr)
    assert lr(1, 0.0) > 0 and method.needs_teacher == (cfg.teacher is not None)
    assert len(optimizer.param_groups) == 1
    if is_deepkd_method(cfg.method.name) and name.endswith(("_topk", "_topk_floor")):  # the curriculum on, stated
        ramp_end = cfg.method.arguments()["topk_ramp_end"]
        assert cfg.method.arguments()["topk"] is True and 0 < ramp_end <= cfg.schedule.epochs
        assert f"to all classes at epoch {ramp_end}" in text
        assert method.dtm.k(1, num_classes) < method.dtm.k(ramp_end, num_classes) == num_classes
    elif is_deepkd_method(cfg.method.name):  # DeepKD recipes say the mask is off and where its ramp would end
        assert cfg.method.arguments()["topk"] is False and "method.topk_ramp_end=" in text


def _generator():
    spec = importlib.util.spec_from_file_location("make_recipes", ROOT / "tools" / "make_recipes.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    return generator


def test_the_generator_writes_exactly_the_shipped_recipes():
    written = _generator().recipes()
    shipped = {str(p.relative_to(recipes_dir())): p.read_text() for p in recipes_dir().rglob("*.yaml")}
    assert sorted(written) == sorted(shipped)
    assert [n for n in written if written[n] != shipped[n]] == []


def test_the_generators_templates_and_its_refusals(tmp_path):
    """A field fills in a value of any type, a row overrides its family's variables, ``when`` skips a row;
    a variable two tables define is refused."""
    generator = _generator()
    env = {"pair": "{t}-{s}", "t": "a", "s": "b", "size": [1, 2], "top": None}
    assert generator.render({"name": "{pair}", "sizes": "{size}", "first": "{size[0]}"}, env) == {
        "name": "a-b", "sizes": [1, 2], "first": 1}
    assert generator.render({"if": "top", "then": "x", "else": "none"}, env) == "none"
    family = {"rows": [{"t": "c", "top": 1.0}, {"t": "d"}], "vars": {"t": "z", "s": "y"}, "when": "top"}
    assert [generator.render("{pair}", row) for row in generator.rows(family, env)] == ["c-y"]
    (tmp_path / "a.yaml").write_text("vars: {X: 1}\n")
    (tmp_path / "b.yaml").write_text("vars: {X: 2}\n")
    with pytest.raises(ValueError, match="already defined"):
        generator.load_tables(tmp_path)


def test_recipe_names_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_recipe("cifar100/resnet32x4-resnet8x4/dkd") == recipes_dir() / "cifar100/resnet32x4-resnet8x4/dkd.yaml"
    assert find_recipe("cifar100/resnet32x4-resnet8x4/dkd.yaml").is_file()
    assert load_config("cifar100/resnet32x4-resnet8x4/dkd").method.name == "dkd"
    local = tmp_path / "cifar100" / "resnet32x4-resnet8x4" / "dkd.yaml"  # a real file wins over a shipped name
    local.parent.mkdir(parents=True)
    local.write_text("student: {name: cnn_w4}\n")
    assert load_config("cifar100/resnet32x4-resnet8x4/dkd.yaml").student.name == "cnn_w4"
    with pytest.raises(ConfigError, match="did you mean 'cifar100/resnet32x4-resnet8x4/dkd'"):
        find_recipe("configs/cifar100/resnet32x4-resnet8x4/dkd.yaml")
    pair = "cifar100/resnet32x4-resnet8x4"
    assert list_recipes(f"{pair}/d*kd") == [f"{pair}/{m}" for m in ("deepkd_crld", "deepkd_dkd", "deepkd_dkd_topk",
                                                                      "deepkd_kd", "deepkd_mlkd", "dkd", "dtkd")]
    assert list_recipes(f"{pair}/*crld") == [f"{pair}/{m}" for m in ("crld", "deepkd_crld")]


@pytest.mark.parametrize("section, match", [
    ({"optimizer": {"stream_momentum": {"task": 0.9}}}, "optimizer 'sgd' does not use optimizer.stream_momentum "
                                                        r"\(only 'decoupled'\)"),
    ({"optimizer": {"name": "decoupled", "momentum": 0.9}}, "optimizer 'decoupled' does not use optimizer.momentum"),
    ({"optimizer": {"name": "decoupled", "nesterov": True}}, r"optimizer.nesterov \(only 'sgd'\)"),
    ({"optimizer": {"name": "adam"}}, "optimizer.name 'adam' is not one of 'sgd', 'decoupled'"),
    ({"schedule": {"name": "cosine", "milestones": []}}, "schedule 'cosine' does not use schedule.milestones"),
    ({"schedule": {"warmup_epochs": 5}}, r"schedule 'step' does not use schedule.warmup_epochs \(only 'cosine'\)"),
    ({"data": {"dataset": "imagenet", "download": False}}, "dataset 'imagenet' does not use data.download"),
    ({"data": {"dataset": "cifar100", "synthetic": {"num_train": 8}}},
     "dataset 'cifar100' does not use data.synthetic"),
    ({"data": {"dataset": "synthetic", "root": "x", "num_workers": 4}},
     r"data.root \(only cifar100, cifar10, tinyimagenet, fashion_mnist, imagenet, imagefolder\), data.num_workers"),
    ({"teacher": {"name": "cnn_w8"}}, "teacher section is not used by method 'ce'"),
    ({"method": {"name": "deepkd_dkd"}, "teacher": {"name": "cnn_w8"}}, "optimizer.allow_base_method: true"),
    ({"method": {"name": "deepkd", "base": "kd"}, "teacher": {"name": "cnn_w8"}}, "trains its base method"),
    ({"method": {"name": "kd"}, "teacher": {"name": "cnn_w8"}, "optimizer": {"allow_base_method": True}},
     "allow_base_method is only for a DeepKD method"),
    ({"method": {"name": "dkd", "topk": True}, "teacher": {"name": "cnn_w8"}}, "topk_ramp_end is not set"),
    ({"method": {"name": "deepkd_kd", "topk_ramp_end": 150}, "teacher": {"name": "cnn_w8"},
      "optimizer": {"name": "decoupled"}}, "topk_ramp_end is set but topk is off"),
])
def test_keys_that_would_do_nothing_are_errors(section, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(_raw(**section))


def test_unused_key_errors_are_one_sentence_per_problem():
    with pytest.raises(ConfigError) as caught:
        validate_config(_raw(optimizer={"stream_momentum": {}, "momentm": 0.9}))
    assert str(caught.value).count(";") == 2 and "did you mean 'optimizer.momentum'" in str(caught.value)


def test_deepkd_with_plain_sgd_on_purpose():
    cfg = validate_config(_raw(method={"name": "deepkd_dkd"}, teacher={"name": "cnn_w8"},
                               optimizer={"allow_base_method": True}))
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.allow_base_method
    cfg = validate_config(_raw(method={"name": "dkd", "topk": True, "topk_ramp_end": 60}, teacher={"name": "cnn_w8"}))
    assert build.build_method(cfg.method).dtm.ramp_end == 60


def test_defaults_come_from_the_builders_signatures():
    from deepkd.data import build_data
    from deepkd.optim import DecoupledMomentumSGD, cosine_lr, step_lr

    def default(builder, name):
        return inspect.signature(builder).parameters[name].default

    cfg = validate_config(_raw(optimizer={"name": "decoupled"}, schedule={"name": "cosine"}))
    assert cfg.optimizer.stream_momentum == default(DecoupledMomentumSGD, "momentum")
    assert cfg.optimizer.weight_decay == default(DecoupledMomentumSGD, "weight_decay")
    assert cfg.schedule.warmup_start_factor == default(cosine_lr, "warmup_start_factor")
    assert validate_config(_raw()).schedule.gamma == default(step_lr, "gamma")
    assert cfg.data.batch_size == default(build_data, "batch_size")
    assert cfg.data.synthetic.num_train == default(build_data, "synthetic_train")


def test_resolved_config_is_complete_and_only_what_is_used():
    cfg = validate_config(_raw(data={"dataset": "synthetic"}, method={"name": "dkd", "beta": 2.0},
                               teacher={"name": "cnn_w8"}, optimizer={"name": "decoupled"}))
    data = config_to_dict(cfg)
    assert set(data["data"]) == {"dataset", "batch_size", "eval_batch_size", "drop_last", "flip", "synthetic"}
    assert data["method"]["beta"] == 2.0 and data["method"]["temperature"] == 4.0  # the signature's default
    assert "momentum" not in data["optimizer"] and data["optimizer"]["stream_momentum"]["non_target"] == 0.95
    assert validate_config(data) == validate_config(config_to_dict(validate_config(data)))
