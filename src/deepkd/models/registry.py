"""The model registry: ``create_model(name, num_classes)`` and ``list_models(pattern)``.

Named builders are registered with :func:`register_model`. Whole families of names that another
library builds (``timm/<name>``, ``torchvision/<name>``) come from a :class:`ModelResolver` that
registers itself under its name prefix (:func:`register_resolver`): :mod:`deepkd.models.ecosystem`
does so when :mod:`deepkd.models` is imported, so this module imports no adapter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from torch import nn

from deepkd.registry import Registry

MODELS = Registry("model")


@dataclass(frozen=True)
class ModelResolver:
    """The models of a name prefix that another library builds (timm, torchvision)."""

    create: Callable[..., nn.Module]  # (name, num_classes, **kwargs) -> model, randomly initialised
    names: Callable[[str], List[str]]  # a shell pattern starting with the prefix -> matching names
    info: Callable[[str], dict]  # name -> model_info's ``input_size``, ``dataset``, ``source``


_RESOLVERS: Dict[str, ModelResolver] = {}


def register_resolver(prefix: str, resolver: ModelResolver) -> None:
    """Resolve every name starting with ``prefix`` (``"timm/"``) through ``resolver``; a prefix
    registered twice raises, as a model name does."""
    if prefix in _RESOLVERS:
        raise ValueError(f"model name prefix {prefix!r} is already registered")
    _RESOLVERS[prefix] = resolver


def _resolver(name: str) -> Optional[ModelResolver]:
    return next((resolver for prefix, resolver in _RESOLVERS.items() if name.startswith(prefix)), None)


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
    resolver = _resolver(name)
    if resolver is not None:
        model = resolver.create(name, 1000 if num_classes is None else num_classes, **kwargs)
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
    resolver = _resolver(pattern) if pattern else None
    if resolver is not None:
        return resolver.names(pattern)
    return MODELS.names(pattern)


def model_info(name: str) -> dict:
    """Registration metadata of a model: ``input_size``, ``dataset``, ``source``."""
    resolver = _resolver(name)
    return resolver.info(name) if resolver is not None else MODELS.info(name)


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
