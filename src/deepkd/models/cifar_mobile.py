"""Mobile CIFAR students: MobileNetV2 (width 0.5, expansion 6), ShuffleNetV1 (groups 3), ShuffleNetV2.

Module paths follow the reference models: MobileNetV2 ``conv1``, ``blocks.{s}.{i}.conv.{0..7}``,
``conv2``, ``classifier.0``; ShuffleNets ``conv1``, ``bn1``, ``layer{1..3}.{i}.*``, ``linear``
(and ``conv2``/``bn2`` for V2).
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from deepkd.models.registry import register_model


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """pw 1x1 expand - dw 3x3 - pw 1x1 linear (always all three, as in the reference)."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2: stride-2 stem, stages (t, c, n, s) with the 24-channel stage at stride 1."""

    def __init__(self, expansion: int = 6, width: float = 0.5, num_classes: int = 100):
        super().__init__()
        settings = [(1, 16, 1, 1), (expansion, 24, 2, 1), (expansion, 32, 3, 2), (expansion, 64, 4, 2),
                    (expansion, 96, 3, 1), (expansion, 160, 3, 2), (expansion, 320, 1, 1)]
        cin = int(32 * width)
        self.conv1 = _conv_bn_relu(3, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in settings:
            cout, layers = int(c * width), []
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.conv1(x)
        feats = {"stem": x}
        for i, block in enumerate(self.blocks):
            x = feats[f"block{i}"] = block(x)
        x = feats["head"] = self.conv2(x)
        # reference: AvgPool2d(input_size // 16, ceil_mode=True) = global pooling of the 2x2 map
        feats["pooled"] = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x)["pooled"])


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[N, C, H, W]``: view channels as ``[groups, C / groups]``, transpose, flatten back."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 - shuffle - dw 3x3 - grouped 1x1; stride 2 concatenates an avg-pooled shortcut.
    ``preact`` (an ``nn.Identity``) marks the tensor before the last ReLU for feature hooks."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        mid = cout // 4
        self.first_groups = 1 if cin == 24 else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(self.preact(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)))
        return F.relu(self.preact(out + x))


class ShuffleNetV1(nn.Module):
    """1x1 stem to 24 channels, three stages (240/480/960, 4/8/4 units, groups 3), global pool.

    ``forward``: ``[B, 3, 32, 32] -> [B, num_classes]``.
    """

    def __init__(self, out_planes=(240, 480, 960), counts=(4, 8, 4), groups: int = 3, num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for stage, (planes, count) in enumerate(zip(out_planes, counts), start=1):
            layers = []
            for i in range(count):
                layers.append(ShuffleV1Block(cin, planes - (cin if i == 0 else 0), 2 if i == 0 else 1, groups))
                cin = planes
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.linear = nn.Linear(out_planes[2], num_classes)

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        feats = {"stem": x}
        for stage in (1, 2, 3):
            x = feats[f"layer{stage}"] = getattr(self, f"layer{stage}")(x)
        feats["pooled"] = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x)["pooled"])


class ShuffleV2Block(nn.Module):
    """Split channels in half; transform the second half (1x1 - dw 3x3 - 1x1); concat; shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        kept, changed = x[:, :half], x[:, half:]
        out = F.relu(self.bn1(self.conv1(changed)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([kept, out], 1), 2)


class ShuffleV2Down(nn.Module):
    """Stride-2 unit: both branches see the whole input, outputs concatenated then shuffled."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """1x1 stem to 24 channels, three stages (116/232/464; a stride-2 unit then 3/7/3 units), 1x1 conv
    to 1024, global pool. ``forward``: ``[B, 3, 32, 32] -> [B, num_classes]``.
    """

    def __init__(self, channels=(116, 232, 464, 1024), counts=(3, 7, 3), num_classes: int = 100):
        super().__init__()
        # NOTE(paper): the reference CIFAR ShuffleNetV2 uses a 1x1 stem conv (not the paper's 3x3 stride 2
        # plus max-pool); the community checkpoints hold conv1.weight [24, 3, 1, 1].
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for stage, (width, count) in enumerate(zip(channels[:3], counts), start=1):
            setattr(self, f"layer{stage}", nn.Sequential(ShuffleV2Down(cin, width),
                                                         *[ShuffleV2Block(width) for _ in range(count)]))
            cin = width
        self.conv2 = nn.Conv2d(channels[2], channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels[3])
        self.linear = nn.Linear(channels[3], num_classes)

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        feats = {"stem": x}
        for stage in (1, 2, 3):
            x = feats[f"layer{stage}"] = getattr(self, f"layer{stage}")(x)
        x = feats["head"] = F.relu(self.bn2(self.conv2(x)))
        feats["pooled"] = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x)["pooled"])


@register_model("MobileNetV2")
def mobilenetv2_cifar(num_classes: int = 100) -> MobileNetV2:
    return MobileNetV2(6, 0.5, num_classes)


@register_model("ShuffleV1")
def shufflev1(num_classes: int = 100) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes=num_classes)


@register_model("ShuffleV2")
def shufflev2(num_classes: int = 100) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes=num_classes)
