"""Strict configs: unknown keys name the closest valid key; every shipped recipe builds."""
import pytest
import torch

from deepkd.train import build
from deepkd.train.config import ConfigError, config_to_dict, load_config, validate_config
from deepkd.train.recipes import list_recipes, recipes_dir

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
    cfg = load_config(path, ["optimizer.lr=0.2", "data.synthetic.num_train=64", "method.name=kd"])
    assert cfg.optimizer.lr == 0.2 and cfg.data.synthetic.num_train == 64 and cfg.method.name == "kd"
    again = validate_config(config_to_dict(cfg))
    assert again == cfg
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(path, ["optimizer.lr"])


RECIPES = list_recipes()


def test_recipes_cover_every_pair():
    names = {str(p.relative_to("configs")) for p in RECIPES}
    for pair in ["resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2", "vgg13-MobileNetV2", "ResNet50-MobileNetV2"]:
        for method in ["kd", "dkd", "dtkd", "deepkd_kd", "deepkd_dkd"]:
            assert f"cifar100/{pair}/{method}.yaml" in names
    assert "imagenet/resnet50-mobilenetv1/deepkd_dkd.yaml" in names
    assert len(RECIPES) >= 90


@pytest.mark.parametrize("path", RECIPES, ids=[str(p) for p in RECIPES])
def test_every_recipe_builds(path):
    cfg = load_config(recipes_dir().parent / path)
    assert path.read_text().startswith("# ") and "expected top-1" in path.read_text()
    num_classes = {"imagenet": 1000, "cifar10": 10, "tinyimagenet": 200}.get(cfg.data.dataset, 100)
    method = build.build_method(cfg.method, cfg.schedule)
    with torch.device("meta"):
        student = build.create_model(cfg.student.name, num_classes=num_classes)
        if cfg.teacher is not None:
            build.create_model(cfg.teacher.name, num_classes=num_classes)
    optimizer = build.build_optimizer(cfg.optimizer, student)
    lr = build.build_schedule(cfg.schedule, cfg.optimizer.lr)
    assert lr(1, 0.0) > 0 and method.needs_teacher == (cfg.teacher is not None)
    assert len(optimizer.param_groups) == 1
