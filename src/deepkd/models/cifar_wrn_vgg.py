"""CIFAR WideResNets (pre-activation) and VGGs with BatchNorm, with the reference module paths.

WRN-d-k: ``conv1``, ``block{1..3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``.
VGG: ``block{0..4}.{j}`` (conv-BN-ReLU repeated, the last ReLU of each block applied in forward),
``classifier``; on 32x32 inputs the fourth max-pool is skipped, as in the reference.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from deepkd.models.registry import register_model


def _init_normal(model: nn.Module, linear_std: float | None) -> None:
    """Conv weights ~ N(0, 2 / (k*k*out)), BN 1/0, Linear N(0, linear_std) or bias 0 only."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / fan))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                m.weight.data.normal_(0, linear_std)
            m.bias.data.zero_()


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 + identity or 1x1 ``convShortcut``."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)))
        out = self.conv2(out)
        # when shapes change, the shortcut conv also sees the pre-activated input (reference arithmetic)
        return out + (x if self.equal else self.convShortcut(activated))


class NetworkBlock(nn.Module):
    """``count`` wide blocks in ``self.layer`` (the reference path ``block{k}.layer.{i}``)."""

    def __init__(self, count: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen: stem 16, stages 16k/32k/64k of ``(depth - 4) // 6`` blocks, BN-ReLU, global pool.

    ``forward``: ``[B, 3, 32, 32] -> [B, num_classes]``.
    """

    def __init__(self, depth: int, widen: int, num_classes: int = 100):
        super().__init__()
        channels = [16, 16 * widen, 32 * widen, 64 * widen]
        count = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(count, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(count, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(count, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        _init_normal(self, linear_std=None)

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = {"stem": self.conv1(x)}
        x = feats["stem"]
        for i in (1, 2, 3):
            x = feats[f"block{i}"] = getattr(self, f"block{i}")(x)
        x = F.relu(self.bn1(x))
        feats["pooled"] = torch.flatten(F.avg_pool2d(x, x.shape[-1]), 1)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x)["pooled"])


VGG_CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _vgg_block(widths: List[int], cin: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        cin = width
    return nn.Sequential(*layers[:-1])  # the block's last ReLU runs in forward (pre-activation features)


class VGG(nn.Module):
    """Five conv-BN blocks with 2x2 max-pools after the first three (and the fourth
    on 64x64 inputs), global average pool, one Linear.

    ``forward``: ``[B, 3, 32, 32] -> [B, num_classes]``.
    """

    def __init__(self, config: List[List[int]], num_classes: int = 100):
        super().__init__()
        cin = 3
        for i, widths in enumerate(config):
            setattr(self, f"block{i}", _vgg_block(widths, cin))
            cin = widths[-1]
        self.classifier = nn.Linear(512, num_classes)
        _init_normal(self, linear_std=0.01)

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        height, feats = x.shape[2], {}
        for i in range(5):
            x = feats[f"block{i}"] = F.relu(getattr(self, f"block{i}")(x))
            if i < 3 or (i == 3 and height == 64):
                x = F.max_pool2d(x, 2, 2)
        feats["pooled"] = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x)["pooled"])


def _register_wrn(depth: int, widen: int) -> None:
    @register_model(f"wrn_{depth}_{widen}")
    def build(num_classes: int = 100) -> WideResNet:
        return WideResNet(depth, widen, num_classes)


def _register_vgg(name: str) -> None:
    @register_model(name)
    def build(num_classes: int = 100) -> VGG:
        return VGG(VGG_CONFIGS[name], num_classes)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register_wrn(_depth, _widen)
for _name in VGG_CONFIGS:
    _register_vgg(_name)
