"""``deepkd demo``: its runs are the study's recipes, its printed n = 5 means are the study's, and it
picks Fashion-MNIST when the files are there and the synthetic set when they are not."""
import json
import statistics
from pathlib import Path

import pytest
from test_fashion_mnist import write_set

from deepkd.commands import demo
from deepkd.data import fashion_mnist as fm
from deepkd.errors import MissingFileError
from deepkd.train.config import config_to_dict, load_config
from deepkd.train.config_errors import validate_config

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "benchmarks" / "study"
TEACHERS = {"synthetic": STUDY / "teacher.yaml", "fashion_mnist": STUDY / "teachers" / "fashion_mnist_resnet8.yaml"}
RUN_KEYS = ("experiment", "output_dir", "train")  # where a run goes and how it reports; the rest must match


def resolved(raw):
    cfg = config_to_dict(validate_config(raw, "test"))
    if cfg.get("teacher"):
        cfg["teacher"]["weights"] = Path(cfg["teacher"]["weights"]).name
    return {k: v for k, v in cfg.items() if k not in RUN_KEYS}


@pytest.mark.parametrize("source", sorted(demo.SETTINGS))
def test_each_row_is_the_studys_recipe_at_its_lr_and_seed_3(source, tmp_path):
    setting = demo.SETTINGS[source]
    configs = demo.student_configs(setting, tmp_path, str(setting["teacher_weights"]))
    assert set(configs) == set(setting["rows"])
    for name in setting["rows"]:
        configuration = demo.STUDENTS[name][0]
        recipe = config_to_dict(load_config(STUDY / setting["problem"] / f"{configuration}.yaml"))
        recipe.update(seed=demo.SEED)
        recipe["optimizer"]["lr"] = setting["lr"][name]
        assert resolved(configs[name]) == resolved(recipe), name
        train = {"progress": "none", "tensorboard": "off", "eval_every": demo.STUDENT_EVAL_EVERY}
        if configuration != "ce" and setting.get("teacher_cache"):
            train.update(demo.CACHE)
            assert {k: recipe["train"][k] for k in demo.CACHE} == demo.CACHE, name
        assert configs[name]["train"] == train, name  # without a cache here, the study's cached logits run live
    assert setting["teacher_weights"].is_file()


@pytest.mark.parametrize("source", sorted(demo.SETTINGS))
def test_the_teacher_is_trained_from_its_recipe(source, tmp_path):
    recipe = config_to_dict(load_config(TEACHERS[source]))
    assert resolved(demo.teacher_config(demo.SETTINGS[source], tmp_path)) == resolved(recipe)


@pytest.mark.parametrize("source", sorted(demo.SETTINGS))
def test_the_printed_means_are_the_studys_confirmation_at_the_selected_lrs(source):
    """The demo's lrs are the confirmed (selected) ones, and its n = 5 means are those runs'."""
    setting = demo.SETTINGS[source]
    runs = json.loads((REPO / "docs" / "study2" / f"{setting['problem']}_confirm.json").read_text())["runs"]
    for name in setting["rows"]:
        experiment = f"{demo.STUDENTS[name][0]}__optimizer.lr={setting['lr'][name]:g}"
        finals = [r["last_top1"] for r in runs if r["experiment"] == experiment and r["finished"]]
        assert len(finals) == 5, (name, experiment)
        mean, std = setting["study"][name]
        assert (mean, std) == (round(statistics.fmean(finals), 2), round(statistics.stdev(finals), 2)), name


def test_fashion_mnist_is_chosen_when_its_files_are_there(tmp_path, monkeypatch):
    write_set(tmp_path, monkeypatch)
    source, why = demo.choose_data("auto", str(tmp_path))
    assert source == "fashion_mnist" and str(tmp_path) in why


def test_the_synthetic_set_when_fashion_mnist_is_missing_and_cannot_be_downloaded(tmp_path, monkeypatch):
    def offline(root, name):
        raise MissingFileError(f"no network for {name}")

    monkeypatch.setattr(fm, "_download", offline)
    source, why = demo.choose_data("auto", str(tmp_path))
    assert source == "synthetic" and "could not be downloaded" in why and "apt-get install dataset-fashion-mnist" in why
    with pytest.raises(MissingFileError, match="no network"):
        demo.choose_data("fashion_mnist", str(tmp_path))
    assert demo.choose_data("synthetic", str(tmp_path))[0] == "synthetic"


@pytest.mark.skipif(not fm._complete(fm.DEBIAN_ROOT), reason="the dataset-fashion-mnist package is not installed")
def test_quick_demo_on_the_debian_packages_files(tmp_path, capsys):
    """End to end (the sweep's processes read the real files: the swapped checksums of small files do not
    reach them)."""
    result = demo.run_demo(out=tmp_path / "demo", quick=True)
    first = capsys.readouterr().out.splitlines()[0]
    title = demo.SETTINGS["fashion_mnist"]["title"]
    assert first.startswith(f"deepkd demo: distilling on {title} (its released files in {fm.DEBIAN_ROOT})")
    assert list(result) == ["teacher", "student alone", "KD", "DKD", "DeepKD+DKD", "seconds"]
    saved = config_to_dict(load_config(tmp_path / "demo" / "dkd" / f"seed{demo.SEED}" / "config.yaml"))
    assert saved["data"]["dataset"] == "fashion_mnist" and saved["data"]["train_per_class"] == 4
    assert Path(saved["teacher"]["weights"]).parent.name == "seed0"  # the teacher trained here, quick


@pytest.mark.parametrize("model", ["resnet8", "resnet20"])
def test_the_shipped_fashion_mnist_teacher_recipes_are_the_studys(model):
    from deepkd.train.recipes import find_recipe

    shipped = config_to_dict(load_config(find_recipe(f"fashion_mnist/teacher/{model}")))
    study = config_to_dict(load_config(STUDY / "teachers" / f"fashion_mnist_{model}.yaml"))
    assert shipped["experiment"] == study["experiment"]
    assert resolved(shipped) == resolved(study)


def test_the_shipped_recipes_of_the_demos_pair_are_its_rows(tmp_path):
    """``deepkd train fashion_mnist/resnet8-cnn_w8/<row>`` trains what the demo and the study ran (seed aside;
    the teacher's weights from the teacher recipe's run instead of the shipped file), the teacher's logits
    cached as there."""
    from deepkd.train.recipes import find_recipe

    setting = demo.SETTINGS["fashion_mnist"]
    configs = demo.student_configs(setting, tmp_path, str(setting["teacher_weights"]))
    for name, configuration in (("student alone", "ce"), ("KD", "kd"), ("DKD", "dkd"), ("DeepKD+DKD", "deepkd_dkd")):
        shipped = config_to_dict(load_config(find_recipe(f"fashion_mnist/resnet8-cnn_w8/{configuration}")))
        ours = {**config_to_dict(validate_config(configs[name], "test")), "seed": shipped["seed"]}
        for cfg in (shipped, ours):
            if cfg.get("teacher"):
                cfg["teacher"]["weights"] = None
        assert {k: v for k, v in shipped.items() if k not in RUN_KEYS} == {k: v for k, v in ours.items()
                                                                           if k not in RUN_KEYS}, name
        assert shipped["train"]["teacher_cache"] == ours["train"]["teacher_cache"] == (name != "student alone")
        expected = setting["study"][name]
        assert f"expected top-1: {expected[0]:.2f} +- {expected[1]:.2f}" in find_recipe(
            f"fashion_mnist/resnet8-cnn_w8/{configuration}").read_text()
