"""Intermediate features of a model: stage outputs, pre-activations, the pooled vector.

The feature-distillation methods (FitNet, AT, NST, PKT, KDSVD, OFD, RKD, SP, VID, CRD, ReviewKD) read
what the model computes on its way to the logits. :class:`FeatureExtractor` runs the model's own
``forward`` with forward hooks that keep those tensors, so the logits are ``model(x)``'s, bit for bit,
and a user's network needs no rewrite::

    extractor = FeatureExtractor(model)                   # a zoo, torchvision or timm model
    out = extractor(images)                               # Features(logits, stages, preact, pooled)
    mine = FeatureExtractor(net, ["layer1", "layer2.0.conv1"], pooled="fc:input")  # any nn.Module
    feature_info(model, (3, 32, 32)).channels             # [32, 64, 128, 256] for resnet8x4

``Features.stages`` is ``[stem, stage1, ..., stageN]`` (mdistiller's ``feats``), ``preact`` the same
tensors before the last ReLU of each stage (``preact_feats``; OFD, ReviewKD's teacher) and ``pooled``
the classifier's input ``[B, C]`` (``pooled_feat``; CRD, RKD, PKT, SP). A feature point is a module
path with an optional suffix: ``"layer1"`` (its output), ``"fc:input"`` (its first input) or
``"block1:relu"`` (ReLU of its output, where the model applies that ReLU functionally right after it).
A module called several times per forward (a shared ReLU) gives its last call.

=======================  ============================  ==============================================
architecture             stages (stem first)           preact
=======================  ============================  ==============================================
resnet8..110, x4         layer1 input, layer1..3       stem, ``layer{k}.{last}.preact``
ResNet18/50 (CIFAR)      layer1 input, layer1..4       stem, ``layer{k}.{last}.preact``
wrn_*                    conv1, block1..3              conv1, the next BN: block2/3.layer.0.bn1, bn1
vgg*                     ReLU of block0..4             block0 after ReLU, block1..4 (before it)
MobileNetV2 (CIFAR)      conv1, blocks.1/2/4/6         = stages (linear bottlenecks: no last ReLU)
ShuffleV1                layer1 input, layer1..3       stem, ``layer{k}.{last}.preact``
ShuffleV2                layer1 input, layer1..3       none
mobilenetv1              model.0/3/5/11/13             input of each one's last ReLU
cnn_w*                   each stage's ReLU (pre-pool)  its input
torchvision ResNet       relu, layer1..4               input of relu, of each stage's last block relu
torchvision MobileNetV2  features.0/3/6/13/17          = stages
timm                     forward_intermediates         none
=======================  ============================  ==============================================

Pooled: the input of ``fc`` / ``linear`` / ``classifier`` (timm: of ``get_classifier()``); timm's
stages are its ``feature_info`` stages. The table is looked up by the model's exact class. Any other
model: name ``layers`` (and ``preact``, ``pooled``) by module path. NOTE: torchvision's
``create_feature_extractor`` is not used: its ResNet ``add`` nodes come back already overwritten by
the in-place ReLU that follows; the hooks here copy the input of an in-place module instead.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from deepkd.errors import ConfigError, UnknownNameError
from deepkd.features import FeatureInfo, Features
from deepkd.models.cifar_mobile import MobileNetV2, ShuffleNetV1, ShuffleNetV2
from deepkd.models.cifar_resnet import CifarResNet, CifarResNetV2
from deepkd.models.cifar_wrn_vgg import VGG, WideResNet
from deepkd.models.mobilenetv1 import MobileNetV1
from deepkd.models.tiny import TinyCNN
from deepkd.registry import closest

SIDES = ("output", "input", "relu")


@dataclass(frozen=True)
class FeaturePoints:
    """Where the features are: ``"path"``, ``"path:input"`` or ``"path:relu"`` per feature."""

    stages: Tuple[str, ...]
    preact: Optional[Tuple[str, ...]] = None
    pooled: Optional[str] = None


def _last_blocks(model: nn.Module, names: Sequence[str]) -> List[str]:
    return [f"{name}.{len(getattr(model, name)) - 1}" for name in names]


def _layered(model: nn.Module, head: str, preact: bool = True) -> FeaturePoints:
    """CIFAR ResNets and ShuffleNets: a functional stem, ``layer1..N``, a ``preact`` Identity per block."""
    layers = [name for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, name)]
    pre = ("layer1:input", *(f"{block}.preact" for block in _last_blocks(model, layers))) if preact else None
    return FeaturePoints(("layer1:input", *layers), pre, f"{head}:input")


def _wrn(model: nn.Module) -> FeaturePoints:
    # pre-activation design: a stage's pre-activation is the next BN's output (mdistiller's preact_feats)
    return FeaturePoints(("conv1", "block1", "block2", "block3"),
                         ("conv1", "block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"), "fc:input")


def _vgg(model: nn.Module) -> FeaturePoints:
    blocks = [f"block{i}" for i in range(5)]
    return FeaturePoints(tuple(f"{b}:relu" for b in blocks), ("block0:relu", *blocks[1:]), "classifier:input")


def _mobilenetv2(model: nn.Module) -> FeaturePoints:
    stages = ("conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6")  # where the resolution changes
    return FeaturePoints(stages, stages, "classifier:input")


def _mobilenetv1(model: nn.Module) -> FeaturePoints:
    ends = (0, 3, 5, 11, 13)  # the stem, then the last block at each resolution
    return FeaturePoints(tuple(f"model.{i}" for i in ends),
                         tuple(f"model.{i}.{len(model.model[i]) - 1}:input" for i in ends), "fc:input")


def _tiny(model: nn.Module) -> FeaturePoints:
    # each stage's ReLU, before the max-pool of stages 1 and 2 (as VGG's stages are taken before theirs)
    relus = [f"stages.{i}.{next(j for j, m in enumerate(stage) if isinstance(m, nn.ReLU))}"
             for i, stage in enumerate(model.stages)]
    return FeaturePoints(tuple(relus), tuple(f"{relu}:input" for relu in relus), "fc:input")


def _torchvision_resnet(model: nn.Module) -> FeaturePoints:
    layers = ["layer1", "layer2", "layer3", "layer4"]
    return FeaturePoints(("relu", *layers), ("relu:input", *(f"{b}.relu:input" for b in _last_blocks(model, layers))),
                         "fc:input")


def _torchvision_mobilenetv2(model: nn.Module) -> FeaturePoints:
    stages = ("features.0", "features.3", "features.6", "features.13", "features.17")
    return FeaturePoints(stages, stages, "classifier:input")


def _tables() -> Dict[type, Callable[[nn.Module], FeaturePoints]]:
    """Architecture -> its feature points (mdistiller's ``feats``/``preact_feats``/``pooled_feat``)."""
    from torchvision.models import MobileNetV2 as TorchvisionMobileNetV2
    from torchvision.models import ResNet as TorchvisionResNet

    return {CifarResNet: functools.partial(_layered, head="fc"),
            CifarResNetV2: functools.partial(_layered, head="linear"),
            ShuffleNetV1: functools.partial(_layered, head="linear"),
            ShuffleNetV2: functools.partial(_layered, head="linear", preact=False),
            WideResNet: _wrn, VGG: _vgg, MobileNetV2: _mobilenetv2, MobileNetV1: _mobilenetv1, TinyCNN: _tiny,
            TorchvisionResNet: _torchvision_resnet, TorchvisionMobileNetV2: _torchvision_mobilenetv2}


def feature_points(model: nn.Module) -> Optional[FeaturePoints]:
    """The built-in feature points of ``model``'s architecture, or ``None`` (timm and others)."""
    table = _tables().get(type(model))
    return table(model) if table is not None else None


def _is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and hasattr(model, "forward_intermediates")


def _parse(point: str) -> Tuple[str, str]:
    path, _, side = point.partition(":")
    if side and side not in SIDES[1:]:
        raise ConfigError(f"feature point {point!r}: the suffix must be ':input' or ':relu', not ':{side}'")
    return path, side or "output"


def _resolve(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path``; a miss names the closest real paths."""
    modules = dict(model.named_modules())
    if path in modules and path:
        return modules[path]
    near = closest(path, [name for name in modules if name], n=3) or [name for name, _ in model.named_children()][:6]
    raise UnknownNameError(f"{type(model).__name__} has no module {path!r} (closest: "
                           f"{', '.join(repr(n) for n in near)})")


class _Capture:
    """Hooks that keep one tensor per feature point during one forward pass, removed on exit."""

    def __init__(self, targets: Dict[str, Tuple[nn.Module, str]]):
        self.values: Dict[str, torch.Tensor] = {}
        self.versions: Dict[str, int] = {}
        self.handles = []
        for point, (module, side) in targets.items():
            if side == "input":  # an in-place module would overwrite its input: keep a copy
                keep = functools.partial(self._input, point, bool(getattr(module, "inplace", False)))
                self.handles.append(module.register_forward_pre_hook(keep))
            else:
                self.handles.append(module.register_forward_hook(functools.partial(self._output, point, side)))

    def _keep(self, point: str, value) -> None:
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"feature point {point!r} is a {type(value).__name__}, not a tensor: name a submodule")
        self.values[point], self.versions[point] = value, value._version

    def _input(self, point: str, copy: bool, module: nn.Module, inputs) -> None:
        self._keep(point, inputs[0].clone() if copy else inputs[0])

    def _output(self, point: str, side: str, module: nn.Module, inputs, output) -> None:
        self._keep(point, F.relu(output) if side == "relu" else output)

    def __enter__(self) -> "_Capture":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def get(self, point: str) -> torch.Tensor:
        """The tensor kept at ``point``; one that did not run, or was overwritten in place, is an error."""
        if point not in self.values:
            raise ConfigError(f"feature point {point!r} did not run in the model's forward pass")
        if self.values[point]._version != self.versions[point]:
            raise ConfigError(f"feature point {point!r} was overwritten in place after it ran (an in-place op "
                              f"such as ReLU(inplace=True) follows it): name that op's module with ':input'")
        return self.values[point]


class FeatureExtractor:
    """Run ``model`` and keep its intermediate features: ``FeatureExtractor(model)(x) -> Features``.

    ``layers=None``: the architecture's built-in points (the module docstring's table) or, for a timm
    model, ``forward_intermediates`` (its ``feature_info`` stages) with the input of
    ``get_classifier()`` as ``pooled``. ``layers=[...]``: these points (module paths, optionally
    ``:input`` / ``:relu``) become ``stages`` in order; ``preact`` and ``pooled`` are the points given
    (``None`` when not given). A wrong path fails here, before any forward pass. Hooks live only during
    a call, so ``model(x)`` elsewhere is untouched; the tensors keep their autograd graph (call under
    ``torch.no_grad()`` for a teacher).
    """

    def __init__(self, model: nn.Module, layers: Optional[Sequence[str]] = None, *,
                 preact: Optional[Sequence[str]] = None, pooled: Optional[str] = None):
        self.model = model
        built_in = feature_points(model) if layers is None else None
        self.timm = layers is None and built_in is None and _is_timm(model)
        if layers is not None:
            self.points = FeaturePoints(tuple(layers), tuple(preact) if preact is not None else None, pooled)
        elif self.timm:
            self.points = FeaturePoints(stages=(), pooled=_timm_pooled_point(model))
        elif built_in is not None:
            self.points = built_in
        else:
            children = ", ".join(repr(name) for name, _ in model.named_children()) or "none"
            raise ConfigError(f"{type(model).__name__} has no built-in feature points: name its layers by "
                              f"module path (layers=[...]; its top-level modules: {children})")
        wanted = [*self.points.stages, *(self.points.preact or ()), *filter(None, [self.points.pooled])]
        self._targets = {}
        for point in dict.fromkeys(wanted):
            path, side = _parse(point)
            self._targets[point] = (_resolve(model, path), side)

    def __call__(self, x: torch.Tensor) -> Features:
        points = self.points
        with _Capture(self._targets) as capture:
            if self.timm:
                final, stages = self.model.forward_intermediates(x)
                logits = self.model.forward_head(final)
            else:
                logits = self.model(x)
                stages = [capture.get(p) for p in points.stages]
            preact = [capture.get(p) for p in points.preact] if points.preact is not None else None
            pooled = capture.get(points.pooled) if points.pooled else None
        return Features(logits, list(stages), preact, torch.flatten(pooled, 1) if pooled is not None else None)


def _timm_pooled_point(model: nn.Module) -> Optional[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    path = next((name for name, module in model.named_modules() if module is head and name), None)
    return f"{path}:input" if path else None


def feature_info(model: nn.Module, input_shape: Sequence[int], layers: Optional[Sequence[str]] = None,
                 **points) -> FeatureInfo:
    """Channels and spatial sizes of each stage, by a dry run of one zero image ``[1, *input_shape]``
    in eval mode (every module's train/eval mode is restored; BatchNorm statistics do not move).
    ``layers`` and ``points`` (``preact``, ``pooled``) as in :class:`FeatureExtractor`."""
    extractor = FeatureExtractor(model, layers, **points)
    modes = {module: module.training for module in model.modules()}
    parameter = next(model.parameters(), None)
    device, dtype = (parameter.device, parameter.dtype) if parameter is not None else ("cpu", torch.float32)
    model.eval()
    try:
        with torch.no_grad():
            out = extractor(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        for module, training in modes.items():
            module.training = training
    return FeatureInfo([t.shape[1] for t in out.stages], [tuple(t.shape[2:]) for t in out.stages],
                       out.pooled.shape[1] if out.pooled is not None else None, out.preact is not None)
