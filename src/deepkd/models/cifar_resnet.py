"""CIFAR ResNets of the KD literature (32x32 inputs).

- ``resnet8 .. resnet110``, ``resnet8x4``, ``resnet32x4``: three stages of basic blocks, widths
  16/32/64 (x4 variants: stem 32, stages 64/128/256), 8x8 average pool. Module paths ``conv1``,
  ``bn1``, ``layer{1..3}.{i}.{conv1,bn1,conv2,bn2}``, ``layer{k}.0.downsample.{0,1}``, ``fc``.
- ``ResNet18``, ``ResNet50``: the four-stage ImageNet design with a 3x3 stem and no max-pool;
  paths ``layer{1..4}.{i}.{conv1..3,bn1..3}``, ``shortcut.{0,1}``, ``linear``.
Same layer order, initialisation and arithmetic as the community's reference models, so their
checkpoints load strictly and give the same logits.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from deepkd.models.registry import register_model


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the identity or a 1x1 conv-BN ``downsample``, then ReLU.

    ``preact`` (an ``nn.Identity``, no parameters) marks the sum before the last ReLU, the
    pre-activation feature that :mod:`deepkd.models.features` hooks (OFD, ReviewKD).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut_name: str = "downsample"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut_name = shortcut_name
        needs = stride != 1 or cin != cout
        setattr(self, shortcut_name, _conv_bn(cin, cout, stride) if needs else nn.Sequential())
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(self.preact(out + getattr(self, self.shortcut_name)(x)))


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck with expansion 4 (CIFAR ResNet50), shortcut named ``shortcut``; ``preact``
    as in :class:`BasicBlock`."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _conv_bn(cin, cout, stride) if stride != 1 or cin != cout else nn.Sequential()
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(self.preact(out + self.shortcut(x)))


class CifarResNet(nn.Module):
    """Three stages of ``(depth - 2) // 6`` basic blocks; ``widths`` = (stem, stage1, stage2, stage3)."""

    def __init__(self, depth: int, widths: List[int], num_classes: int = 100):
        super().__init__()
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for stage, (width, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(cin, width, stride if i == 0 else 1))
                cin = width
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.fc = nn.Linear(widths[3], num_classes)
        _init(self)

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = {"stem": F.relu(self.bn1(self.conv1(x)))}
        x = feats["stem"]
        for stage in (1, 2, 3):
            x = feats[f"layer{stage}"] = getattr(self, f"layer{stage}")(x)
        feats["pooled"] = torch.flatten(F.avg_pool2d(x, x.shape[-1]), 1)  # 8x8 on 32x32 inputs
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x)["pooled"])


class CifarResNetV2(nn.Module):
    """ResNet18/50 for 32x32 inputs: 3x3 stem, no max-pool, four stages, adaptive average pool."""

    def __init__(self, block: str, counts: List[int], num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin, expansion = 64, 4 if block == "bottleneck" else 1
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), counts), start=1):
            layers = []
            for i in range(count):
                stride = (1 if stage == 1 else 2) if i == 0 else 1
                layers.append(Bottleneck(cin, planes, stride) if block == "bottleneck"
                              else BasicBlock(cin, planes, stride, shortcut_name="shortcut"))
                cin = planes * expansion
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.linear = nn.Linear(512 * expansion, num_classes)
        _init(self)

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        feats = {"stem": x}
        for stage in (1, 2, 3, 4):
            x = feats[f"layer{stage}"] = getattr(self, f"layer{stage}")(x)
        feats["pooled"] = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x)["pooled"])


def _register_resnet(name: str, depth: int, widths: List[int]) -> None:
    @register_model(name)
    def build(num_classes: int = 100) -> CifarResNet:
        return CifarResNet(depth, widths, num_classes)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register_resnet(f"resnet{_depth}", _depth, [16, 16, 32, 64])
_register_resnet("resnet8x4", 8, [32, 64, 128, 256])
_register_resnet("resnet32x4", 32, [32, 64, 128, 256])


@register_model("ResNet18")
def cifar_resnet18(num_classes: int = 100) -> CifarResNetV2:
    return CifarResNetV2("basic", [2, 2, 2, 2], num_classes)


@register_model("ResNet50")
def cifar_resnet50(num_classes: int = 100) -> CifarResNetV2:
    return CifarResNetV2("bottleneck", [3, 4, 6, 3], num_classes)
