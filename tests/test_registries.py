"""The dataset, optimizer and schedule registries: every name a recipe accepts is registered, a miss
names the closest, and a builder registered from outside is the one used."""
import typing
from types import SimpleNamespace

import pytest
import torch
from pydantic import TypeAdapter
from torch import nn

from deepkd.data import DATASETS, build_data, register_dataset
from deepkd.errors import UnknownNameError
from deepkd.optim import DecoupledMomentumSGD, cosine_lr, step_lr
from deepkd.train import build
from deepkd.train.data_config import DATASET_KEYS, DataConfig
from deepkd.train.optim_config import OptimizerConfig, ScheduleConfig
from deepkd.train.optimizers import OPTIMIZERS, SCHEDULES, register_schedule

DETECTION_SCHEDULES = {"multistep_iter"}  # an iteration schedule, built by deepkd.train.detection_task


def _choice_names(section) -> set:
    """The ``name`` of each model of a ``_choice`` section (Annotated[Union[Annotated[model, Tag]], ...])."""
    union = typing.get_args(section)[0]
    return {typing.get_args(variant)[0].model_fields["name"].default for variant in typing.get_args(union)}


def _section(choice, value: dict):
    """A validated optimizer or schedule section."""
    return TypeAdapter(choice).validate_python(value)


def _scratch(monkeypatch, registry) -> None:
    """Registrations made by the test are dropped after it."""
    monkeypatch.setattr(registry, "_builders", dict(registry._builders))
    monkeypatch.setattr(registry, "_info", dict(registry._info))


def test_registries_list_the_names_the_config_accepts():
    assert set(DATASETS.names()) == set(DATASET_KEYS)
    assert set(typing.get_args(DataConfig.model_fields["dataset"].annotation)) == set(DATASET_KEYS)
    assert set(OPTIMIZERS.names()) == _choice_names(OptimizerConfig) == {"sgd", "decoupled"}
    assert set(SCHEDULES.names()) == _choice_names(ScheduleConfig) - DETECTION_SCHEDULES == {"step", "cosine"}


@pytest.mark.parametrize("registry, typo, closest", [
    (DATASETS, "cifar1000", "cifar100"), (OPTIMIZERS, "decouple", "decoupled"), (SCHEDULES, "cosin", "cosine")])
def test_a_miss_names_the_closest(registry, typo, closest):
    with pytest.raises(UnknownNameError, match=f"unknown {registry.kind} '{typo}'; did you mean '{closest}'"):
        registry.get(typo)


def test_build_functions_look_names_up_in_the_registries():
    with pytest.raises(UnknownNameError, match="did you mean 'fashion_mnist'"):
        build_data("fashion_mnst")
    with pytest.raises(UnknownNameError, match="unknown optimizer 'sgdd'; did you mean 'sgd'"):
        build.build_optimizer(SimpleNamespace(name="sgdd"), nn.Linear(2, 2))


def test_registered_builders_build_what_the_section_says():
    model = nn.Linear(3, 2)
    sgd = build.build_optimizer(_section(OptimizerConfig, {"name": "sgd", "lr": 0.1, "nesterov": True}), model)
    assert type(sgd) is torch.optim.SGD
    assert (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["nesterov"]) == (0.1, 0.9, True)
    decoupled = build.build_optimizer(_section(OptimizerConfig, {"name": "decoupled"}), model)
    assert type(decoupled) is DecoupledMomentumSGD
    step = build.build_schedule(_section(ScheduleConfig, {"name": "step", "milestones": [2]}), 0.1)
    assert [step(e, 0.5) for e in (1, 2, 3)] == [step_lr(e, 0.1, [2]) for e in (1, 2, 3)]
    cosine = build.build_schedule(_section(ScheduleConfig, {"name": "cosine", "epochs": 4, "warmup_epochs": 1}), 0.1)
    assert cosine(2, 0.25) == cosine_lr(1.25, 0.1, 4, 1)


def test_a_registered_schedule_is_used(monkeypatch):
    _scratch(monkeypatch, SCHEDULES)

    @register_schedule("constant")
    def constant(cfg, base_lr):
        return lambda epoch, progress: base_lr

    assert build.build_schedule(SimpleNamespace(name="constant"), 0.3)(7, 0.5) == 0.3
    assert "constant" in SCHEDULES
    with pytest.raises(ValueError, match="already registered"):
        register_schedule("step")(constant)


def test_a_registered_dataset_is_used(monkeypatch):
    _scratch(monkeypatch, DATASETS)
    seen = {}

    @register_dataset("few_blobs")
    def few_blobs(dataset, options, *, synthetic_seed, **_):
        seen.update(dataset=dataset, seed=synthetic_seed, batch_size=options["batch_size"])
        return DATASETS.get("synthetic")(dataset, options, synthetic_train=40, synthetic_test=20,
                                         synthetic_seed=synthetic_seed, synthetic_noise=1.5)

    data = build_data("few_blobs", batch_size=8, synthetic_seed=3)
    assert seen == {"dataset": "few_blobs", "seed": 3, "batch_size": 8}
    assert data.num_classes == build_data("synthetic", synthetic_train=40, synthetic_test=20).num_classes
    assert data.train.num_samples == 40
