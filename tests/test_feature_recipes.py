"""The feature-distillation recipes: each builds its method on the real models of its pair (the
connectors need their shapes), is what tools/recipe_tables/features.yaml says, and is headed by its source."""
from __future__ import annotations

import functools
import inspect

import pytest
import torch

from deepkd.losses.registry import METHODS, method_builder
from deepkd.models import create_model
from deepkd.models.features import feature_info
from deepkd.train import build
from deepkd.train.config import load_config
from deepkd.train.method_config import method_features
from deepkd.train.recipes import find_recipe, list_recipes

# the classification ones; the COCO recipes (reviewkd on the FPN) are built in tests/test_detection_features.py
FEATURE = [n for n in list_recipes() if n.rsplit("/", 1)[1] in METHODS and method_features(n.rsplit("/", 1)[1])
           and not n.startswith("coco/")]


def test_every_feature_method_has_mdistillers_pair_and_published_rows_elsewhere():
    on_pair = {n.rsplit("/", 1)[1] for n in FEATURE if n.startswith("cifar100/resnet32x4-resnet8x4/")}
    assert on_pair == {"fitnet", "at", "nst", "pkt", "kdsvd", "ofd", "rkd", "sp", "vid", "crd", "reviewkd"}
    assert "cifar100/vgg13-MobileNetV2/crd" in FEATURE and "cifar100/resnet56-resnet20/fitnet" in FEATURE
    cifar = [n for n in FEATURE if n.startswith("cifar100/")]
    assert len(cifar) == 11 + 12 * 8  # eight methods with a published number on the CRD paper's other 12 pairs


def test_mdistillers_imagenet_feature_configs_that_can_run_are_shipped():
    """mdistiller's r34_r18/{at,crd,reviewkd} and r50_mv1/{at,crd,ofd,reviewkd}, all of them."""
    imagenet = {n for n in FEATURE if n.startswith("imagenet/")}
    assert imagenet == {f"imagenet/{pair}/{m}" for pair in ("resnet34-resnet18", "resnet50-mobilenetv1")
                        for m in ("at", "crd", "reviewkd")} | {"imagenet/resnet50-mobilenetv1/ofd"}


# (classes, input size) of each dataset's models
SHAPES = {"cifar100": (100, (3, 32, 32)), "imagenet": (1000, (3, 224, 224))}


@functools.lru_cache(maxsize=None)
def _model(name: str, dataset: str):
    """A model of ``dataset`` in eval mode and its feature shapes, built once per name (the methods only read
    them)."""
    classes, shape = SHAPES[dataset]
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes).eval()
    return model, feature_info(model, shape)


@pytest.mark.parametrize("name", FEATURE)
def test_every_feature_recipe_builds_on_its_models(name):
    cfg = load_config(name)
    text = find_recipe(name).read_text()
    assert text.startswith("# ") and "expected top-1" in text
    dataset = cfg.data.dataset
    (student, student_info), (teacher, teacher_info) = _model(cfg.student.name, dataset), _model(cfg.teacher.name,
                                                                                                   dataset)
    provided = {"student_info": student_info, "teacher_info": teacher_info,
                "num_samples": 50_000, "train_labels": torch.arange(50_000) % 100,
                "student_model": student, "teacher_model": teacher}
    builder = method_builder(cfg.method.name)
    wanted = {k: v for k, v in provided.items() if k in inspect.signature(builder).parameters}
    method = builder(**cfg.method.arguments(), **wanted)
    assert method.features and method.needs_teacher
    optimizer = build.build_optimizer(cfg.optimizer, student, method)
    assert len(optimizer.param_groups[0]["params"]) == len(list(student.parameters())) + len(list(method.parameters()))
