"""ImageNet students and teachers with torchvision's parameter names and arithmetic (no torchvision).

``resnet18``, ``resnet34``, ``resnet50`` (v1.5: stride on the 3x3 conv), ``mobilenetv1`` (the
papers' "MobileNetV2" ImageNet student; reference key layout ``model.{i}.{j}``, ``fc``) and
``mobilenetv2_imagenet`` (torchvision's ``features.*`` / ``classifier.1`` layout). Any input
size: global average pooling is adaptive.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from deepkd.models.registry import register_model


class TVBasicBlock(nn.Module):
    """torchvision BasicBlock: conv3x3-BN-ReLU-conv3x3-BN + identity or ``downsample``, ReLU."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TVBottleneck(nn.Module):
    """torchvision Bottleneck (v1.5): 1x1-3x3(stride)-1x1, expansion 4, ``downsample`` shortcut."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin: int, cout: int, stride: int):
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ImageNetResNet(nn.Module):
    """torchvision ResNet: 7x7/2 stem, 3x3/2 max-pool, four stages, adaptive pool, ``fc``.

    ``forward``: ``[B, 3, H, W] -> [B, num_classes]`` for any ``H, W >= 32``.
    """

    def __init__(self, block, counts: List[int], num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), counts), start=1):
            layers = []
            for i in range(count):
                layers.append(block(cin, planes, (1 if stage == 1 else 2) if i == 0 else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = {"stem": x}
        for stage in (1, 2, 3, 4):
            x = feats[f"layer{stage}"] = getattr(self, f"layer{stage}")(x)
        feats["pooled"] = torch.flatten(self.avgpool(x), 1)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x)["pooled"])


def _bn_relu_conv(cin: int, cout: int, kernel: int, stride: int, groups: int = 1, relu: str = "relu") -> List[nn.Module]:
    act = nn.ReLU6(inplace=True) if relu == "relu6" else nn.ReLU(inplace=True)
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act]


class MobileNetV1(nn.Module):
    """3x3 stride-2 stem to 32 channels, 13 depthwise-separable blocks to 1024, pool, fc."""

    PLAN = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
            (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 1024, 2),
            (1024, 1024, 1)]

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        blocks = [nn.Sequential(*_bn_relu_conv(3, 32, 3, 2))]
        for cin, cout, stride in self.PLAN:
            blocks.append(nn.Sequential(*_bn_relu_conv(cin, cin, 3, stride, groups=cin), *_bn_relu_conv(cin, cout, 1, 1)))
        self.model = nn.Sequential(*blocks)
        self.fc = nn.Linear(1024, num_classes)

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.model(x)
        return {"features": x, "pooled": torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x)["pooled"])


class TVInvertedResidual(nn.Module):
    """torchvision inverted residual: [1x1 expand-BN-ReLU6] - dw 3x3-BN-ReLU6 - 1x1-BN (+ x)."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.use_res_connect = stride == 1 and cin == cout
        layers: List[nn.Module] = []
        if expansion != 1:
            layers.append(nn.Sequential(*_bn_relu_conv(cin, hidden, 1, 1, relu="relu6")))
        layers += [nn.Sequential(*_bn_relu_conv(hidden, hidden, 3, stride, groups=hidden, relu="relu6")),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2ImageNet(nn.Module):
    """torchvision MobileNetV2 (width 1.0): ``features.{0..18}``, pool, dropout 0.2, ``classifier.1``.

    ``forward``: ``[B, 3, H, W] -> [B, num_classes]``.
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                    (6, 320, 1, 1)]
        features: List[nn.Module] = [nn.Sequential(*_bn_relu_conv(3, 32, 3, 2, relu="relu6"))]
        cin = 32
        for t, c, n, s in settings:
            for i in range(n):
                features.append(TVInvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(nn.Sequential(*_bn_relu_conv(cin, 1280, 1, 1, relu="relu6")))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.features(x)
        return {"features": x, "pooled": torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x)["pooled"])


@register_model("resnet18", input_size=224, dataset="imagenet")
def resnet18(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(TVBasicBlock, [2, 2, 2, 2], num_classes)


@register_model("resnet34", input_size=224, dataset="imagenet")
def resnet34(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(TVBasicBlock, [3, 4, 6, 3], num_classes)


@register_model("resnet50", input_size=224, dataset="imagenet")
def resnet50(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(TVBottleneck, [3, 4, 6, 3], num_classes)


@register_model("mobilenetv1", input_size=224, dataset="imagenet")
def mobilenetv1(num_classes: int = 1000) -> MobileNetV1:
    return MobileNetV1(num_classes)


@register_model("mobilenetv2_imagenet", input_size=224, dataset="imagenet")
def mobilenetv2_imagenet(num_classes: int = 1000) -> MobileNetV2ImageNet:
    return MobileNetV2ImageNet(num_classes)
