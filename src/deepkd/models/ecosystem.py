"""Models and pretrained weights from torchvision and timm, behind deepkd's ``create_model``.

torchvision builds the papers' ImageNet ResNet-18/34/50 and MobileNetV2 (deepkd names ``resnet18``,
``resnet34``, ``resnet50``, ``mobilenetv2_imagenet``), and any other torchvision classification
model as ``torchvision/<name>``; timm builds any ``timm/<name>`` (e.g. ``timm/regnety_160``,
``timm/deit_tiny_patch16_224``) with its classifier sized to the data's class count.

Pretrained weights (a model section's ``weights``) come from one of:

- a local file: any format :func:`deepkd.models.load_weights` reads (a torchvision ``.pth`` such as
  ``resnet34-333f7ec4.pth``, a timm ``model.safetensors``, a deepkd checkpoint);
- ``torchvision:<ENUM>``: torchvision's released weights of that model, e.g. ``torchvision:IMAGENET1K_V1``
  (ResNet-34's is the 73.31 % teacher of the DKD and DeepKD ImageNet tables), downloaded with their
  hash checked into torch's hub cache (``$TORCH_HOME/hub/checkpoints``);
- ``timm:<tag>`` (``timm:`` alone: the model's default tag): timm's pretrained weights from the
  Hugging Face hub (its cache, ``$HF_HOME``), e.g. ``timm:deit_in1k`` for the RegNetY-16GF that
  DeiT distilled from.

A classifier whose class count differs from the weights' is re-initialised only when the caller
allows it (a student fine-tuned on new classes); a teacher's must match.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from deepkd.errors import MissingFileError, UnknownNameError, WeightsError
from deepkd.models.registry import ModelResolver, register_model, register_resolver
from deepkd.models.weights import extract_state_dict, load_weights, read_weights

TIMM, TORCHVISION = "timm/", "torchvision/"
_TORCHVISION_NAMES = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
                      "mobilenetv2_imagenet": "mobilenet_v2"}


def _torchvision_builder(tv_name: str):
    def build(num_classes: int = 1000) -> nn.Module:
        import torchvision

        model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes)
        model.torchvision_name = tv_name
        return model

    build.__doc__ = f"torchvision.models.{tv_name} (torchvision's parameter names and arithmetic)."
    return build


for _name, _tv_name in _TORCHVISION_NAMES.items():
    register_model(_name, input_size=224, dataset="imagenet", source="torchvision")(_torchvision_builder(_tv_name))


def create_external(name: str, num_classes: int) -> nn.Module:
    """Build ``timm/<name>`` or ``torchvision/<name>`` with randomly initialised weights."""
    if name.startswith(TIMM):
        import timm

        arch = name[len(TIMM):]
        if not timm.is_model(arch):
            raise UnknownNameError(f"unknown timm model {arch!r} (list them with: deepkd list models "
                                   f"'timm/{arch[:4]}*')")
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
        model.timm_name = arch
        return model
    import torchvision

    arch = name[len(TORCHVISION):]
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise UnknownNameError(f"unknown torchvision classification model {arch!r} "
                               "(deepkd list models 'torchvision/*')")
    return _torchvision_builder(arch)(num_classes)


def list_external(pattern: str) -> List[str]:
    """``timm/...`` or ``torchvision/...`` names matching a shell pattern such as ``timm/deit_*``."""
    if pattern.startswith(TIMM):
        import timm

        return [TIMM + n for n in timm.list_models(pattern[len(TIMM):] or "*")]
    import fnmatch

    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return [TORCHVISION + n for n in names if fnmatch.fnmatch(n, pattern[len(TORCHVISION):] or "*")]


def external_info(name: str) -> Dict[str, Any]:
    """:func:`deepkd.models.model_info` of ``timm/<name>`` or ``torchvision/<name>``: an ImageNet model
    whose input size is its pretrained weights' (224 when they name none)."""
    size = data_config(name).get("image_size", 224)
    return {"input_size": size, "dataset": "imagenet", "source": name.split("/")[0]}


for _prefix in (TIMM, TORCHVISION):
    register_resolver(_prefix, ModelResolver(create=create_external, names=list_external, info=external_info))


def data_config(name: str, weights: Optional[str] = None) -> Dict[str, Any]:
    """The input pipeline a timm model's pretrained weights expect (those of ``weights="timm:<tag>"``,
    else the default tag's): ``image_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``; empty
    for other models (deepkd's dataset defaults apply)."""
    if not name.startswith(TIMM):
        return {}
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    arch = name[len(TIMM):]
    tag = weights[len("timm:"):] if weights and weights.startswith("timm:") else ""
    cfg = _timm_pretrained_cfg(arch, tag) if tag else get_pretrained_cfg(arch)
    if cfg is None:
        return {}
    resolved = resolve_data_config(pretrained_cfg=cfg.to_dict())
    return {"image_size": resolved["input_size"][-1], "crop_pct": resolved["crop_pct"],
            "interpolation": resolved["interpolation"], "mean": list(resolved["mean"]), "std": list(resolved["std"])}


def load_pretrained(model: nn.Module, source: str, *, reset_head: bool = False, role: str = "model") -> nn.Module:
    """Load ``source`` (a file, ``torchvision:<ENUM>`` or ``timm:<tag>``) into ``model``.

    ``reset_head``: a classifier whose shape differs from the weights' keeps its fresh initialisation
    (every other tensor must fit); otherwise any mismatch is an error naming the keys.
    """
    if source.startswith("timm:"):
        return _load_timm(model, source[len("timm:"):], reset_head=reset_head, role=role)
    if source.startswith("torchvision:"):
        state = _torchvision_state(model, source[len("torchvision:"):])
    else:
        if not Path(source).is_file():
            raise MissingFileError(f"{role}.weights: file {source!r} does not exist")
        state = extract_state_dict(read_weights(Path(source)), source)
    head = _head_keys(model)
    own = model.state_dict()
    mismatched = [k for k in head if k in state and state[k].shape != own[k].shape]
    if mismatched and not reset_head:
        classes = state[mismatched[0]].shape[0]
        raise WeightsError(f"{role}.weights {source!r} has a {classes}-class classifier but the {role} is built for "
                         f"{own[mismatched[0]].shape[0]} classes (the data's class count): use a {role} trained on "
                         "this data")
    if mismatched:
        state = {k: v for k, v in state.items() if k not in head}
        missing = [k for k in own if k not in state and k not in head]
        if missing:
            raise WeightsError(f"{role}.weights {source!r} lacks {len(missing)} non-classifier keys "
                               f"(first: {missing[0]})")
        return load_weights(model, state, strict=False, name=f"{role}.weights {source!r}")
    return load_weights(model, state, name=f"{role}.weights {source!r}")


def _head_keys(model: nn.Module) -> List[str]:
    """State-dict keys of the classifier (timm's ``get_classifier``, torchvision's last Linear)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    modules = head if isinstance(head, list) else [head]
    ids = {id(p) for m in modules for p in m.parameters()}
    return [k for k, p in model.named_parameters() if id(p) in ids]


def _torchvision_state(model: nn.Module, enum: str) -> Dict[str, torch.Tensor]:
    from torchvision.models import get_model_weights

    tv_name = getattr(model, "torchvision_name", None)
    if tv_name is None:
        raise WeightsError(f"weights 'torchvision:{enum}' need a torchvision model (resnet18/34/50, "
                         f"mobilenetv2_imagenet or torchvision/<name>), not {getattr(model, 'deepkd_name', model)!r}")
    choices = get_model_weights(tv_name)
    if enum.split(".")[-1] not in choices.__members__:
        raise WeightsError(f"torchvision has no weights {enum!r} for {tv_name} (choose from "
                         f"{', '.join(choices.__members__)})")
    weights = choices[enum.split(".")[-1]]
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except OSError as err:  # urllib's URLError is an OSError
        target = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise MissingFileError(f"could not download torchvision weights {weights} from {weights.url} ({err}): "
                                f"put that file at {target}, or set weights to a local file") from None


def _timm_pretrained_cfg(arch: str, tag: str):
    """timm's pretrained config of ``arch.tag`` (the default tag when empty); a miss lists the tags."""
    import timm
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None:
        raise WeightsError(f"timm has no pretrained weights {arch}.{tag} (choose from "
                         f"{', '.join(timm.list_pretrained(arch + '.*')) or 'none'})")
    return cfg


def _load_timm(model: nn.Module, tag: str, *, reset_head: bool, role: str) -> nn.Module:
    from timm.models import load_pretrained as timm_load_pretrained

    arch = getattr(model, "timm_name", None)
    if arch is None:
        raise WeightsError(f"{role}.weights 'timm:{tag}' need a timm/<name> model")
    cfg = _timm_pretrained_cfg(arch, tag)
    classes = model.num_classes
    if classes != cfg.num_classes and not reset_head:
        raise WeightsError(f"{role} timm/{arch} has {classes} classes but the weights timm:{cfg.tag} have "
                         f"{cfg.num_classes}: train it on your data first and set {role}.weights to that checkpoint")
    try:
        timm_load_pretrained(model, pretrained_cfg=cfg.to_dict(), num_classes=classes)
    except OSError as err:  # huggingface_hub: LocalEntryNotFoundError (offline, not cached) is an OSError
        raise MissingFileError(f"could not fetch timm weights {arch}.{cfg.tag} from the Hugging Face hub "
                                f"({type(err).__name__}): go online once (they are cached in $HF_HOME), or "
                                f"download {cfg.hf_hub_id or cfg.url} by hand and set {role}.weights to the "
                                "file") from err
    return model
