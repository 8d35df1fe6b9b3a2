"""The model registry: ``create_model(name, num_classes)`` and ``list_models(pattern)``."""
from __future__ import annotations

from typing import Dict, List, Optional

from torch import nn

from deepkd.registry import Registry

MODELS = Registry("model")


def register_model(name: str, *, input_size: int = 32, dataset: str = "cifar", source: str = "deepkd", **info):
    """Decorator for a model builder ``builder(num_classes=...) -> nn.Module``; ``source`` says whose
    code builds it (``deepkd`` or ``torchvision``)."""
    return MODELS.register(name, input_size=input_size, dataset=dataset, source=source, **info)


def create_model(name: str, num_classes: Optional[int] = None, **kwargs) -> nn.Module:
    """Build an architecture; ``forward(x)`` returns logits ``[B, num_classes]``.

    ``name``: a registered name (deepkd's CIFAR zoo, MobileNetV1, torchvision's ImageNet ResNets and
    MobileNetV2), ``timm/<name>`` (any timm model) or ``torchvision/<name>`` (any torchvision
    classifier). ``num_classes`` defaults to the model's dataset: 100 for CIFAR models, 1000 for
    ImageNet, timm and torchvision ones.
    """
    from deepkd.models import ecosystem

    if ecosystem.is_external(name):
        model = ecosystem.create_external(name, 1000 if num_classes is None else num_classes, **kwargs)
        model.deepkd_name = name
        return model
    if num_classes is None:
        num_classes = 1000 if MODELS.info(name).get("dataset") == "imagenet" else 100
    model = MODELS.build(name, num_classes=num_classes, **kwargs)
    model.deepkd_name = name
    return model


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Registered model names, optionally filtered by a shell pattern such as ``"resnet*"``; a pattern
    starting with ``timm/`` or ``torchvision/`` lists that library's models (``"timm/deit_*"``)."""
    from deepkd.models import ecosystem

    if pattern and ecosystem.is_external(pattern):
        return ecosystem.list_external(pattern)
    return MODELS.names(pattern)


def model_info(name: str) -> dict:
    """Registration metadata of a model: ``input_size``, ``dataset``, ``source``."""
    from deepkd.models import ecosystem

    if ecosystem.is_external(name):
        size = ecosystem.data_config(name).get("image_size", 224)
        return {"input_size": size, "dataset": "imagenet", "source": name.split("/")[0]}
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


def format_model_table(pattern: Optional[str] = None, *, max_counted: int = 60) -> str:
    """Name, source, trainable parameters (millions; 100 classes for CIFAR models, 1000 otherwise),
    dataset and input size of every model matching ``pattern`` (``timm/...`` and ``torchvision/...``
    patterns list those libraries; parameters are counted for at most ``max_counted`` of them)."""
    names = list_models(pattern)
    rows = [f"{'name':<34} {'source':<11} {'params':>9}  {'dataset':<9} input"]
    for index, name in enumerate(names):
        info = model_info(name)
        count = f"{_published_parameter_count(name) / 1e6:8.3f}M" if index < max_counted else f"{'-':>9}"
        rows.append(f"{name:<34} {info['source']:<11} {count}  {info.get('dataset', 'cifar'):<9} "
                    f"{info.get('input_size', 32)}")
    if not pattern:
        rows.append("timm: any 'timm/<name>' (deepkd list models 'timm/deit_*'); torchvision: any "
                    "'torchvision/<name>' (deepkd list models 'torchvision/*')")
    return "\n".join(rows)
