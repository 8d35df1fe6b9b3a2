"""The model registry: ``create_model(name, num_classes)`` and ``list_models(pattern)``."""
from __future__ import annotations

from typing import Dict, List, Optional

from torch import nn

from deepkd.registry import Registry

MODELS = Registry("model")


def register_model(name: str, *, input_size: int = 32, dataset: str = "cifar", **info):
    """Decorator for a model builder ``builder(num_classes=...) -> nn.Module``."""
    return MODELS.register(name, input_size=input_size, dataset=dataset, **info)


def create_model(name: str, num_classes: Optional[int] = None, **kwargs) -> nn.Module:
    """Build a registered architecture; ``forward(x)`` returns logits ``[B, num_classes]``.

    ``num_classes`` defaults to the model's dataset: 100 for CIFAR models, 1000 for ImageNet ones.
    """
    if num_classes is None:
        num_classes = 1000 if MODELS.info(name).get("dataset") == "imagenet" else 100
    model = MODELS.build(name, num_classes=num_classes, **kwargs)
    model.deepkd_name = name
    return model


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Registered model names, optionally filtered by a shell pattern such as ``"resnet*"``."""
    return MODELS.names(pattern)


def model_info(name: str) -> dict:
    """Registration metadata of a model: ``input_size``, ``dataset``."""
    return MODELS.info(name)


_PARAMETER_COUNTS: Dict[str, int] = {}


def _published_parameter_count(name: str) -> int:
    """Trainable parameters at the model's default class count, built once on the meta device."""
    if name not in _PARAMETER_COUNTS:
        import torch

        with torch.device("meta"):  # no memory, no initialisation cost
            model = create_model(name)
        _PARAMETER_COUNTS[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return _PARAMETER_COUNTS[name]


def format_model_table(pattern: Optional[str] = None) -> str:
    """Name, trainable parameters (millions; 100 classes for CIFAR models, 1000 for ImageNet), dataset
    and input size of every registered model matching ``pattern``. Counts are cached per process."""
    rows = [f"{'name':<22} {'params':>8}  {'dataset':<9} input"]
    for name in list_models(pattern):
        info = MODELS.info(name)
        count = _published_parameter_count(name)
        rows.append(f"{name:<22} {count / 1e6:7.3f}M  {info.get('dataset', 'cifar'):<9} {info.get('input_size', 32)}")
    return "\n".join(rows)
