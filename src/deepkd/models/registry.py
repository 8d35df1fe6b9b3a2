"""The model registry: ``create_model(name, num_classes)`` and ``list_models(pattern)``."""
from __future__ import annotations

from typing import List, Optional

from torch import nn

from deepkd.registry import Registry

MODELS = Registry("model")


def register_model(name: str, *, input_size: int = 32, dataset: str = "cifar", **info):
    """Decorator for a model builder ``builder(num_classes=...) -> nn.Module``."""
    return MODELS.register(name, input_size=input_size, dataset=dataset, **info)


def create_model(name: str, num_classes: int = 100, **kwargs) -> nn.Module:
    """Build a registered architecture; ``forward(x)`` returns logits ``[B, num_classes]``."""
    model = MODELS.build(name, num_classes=num_classes, **kwargs)
    model.deepkd_name = name
    return model


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Registered model names, optionally filtered by a shell pattern such as ``"resnet*"``."""
    return MODELS.names(pattern)


def model_info(name: str) -> dict:
    """Registration metadata of a model: ``input_size``, ``dataset``."""
    return MODELS.info(name)
