"""MobileNetV1 for ImageNet: the student that the papers' ImageNet configs call "MobileNetV2".

torchvision has no MobileNetV1, so it stays deepkd's own: a 3x3 stride-2 stem conv-BN-ReLU to 32
channels, 13 depthwise-separable conv-BN-ReLU blocks to 1024, global average pooling, ``fc``, in the
reference key layout ``model.{i}.{j}.*`` / ``fc.*`` so the reference checkpoints load. Any input size.
The ImageNet ResNets and MobileNetV2 come from torchvision (:mod:`deepkd.models.ecosystem`).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from deepkd.models.registry import register_model


def _bn_relu_conv(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class MobileNetV1(nn.Module):
    """3x3 stride-2 stem to 32 channels, 13 depthwise-separable blocks to 1024, pool, fc."""

    PLAN = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
            (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 1024, 2),
            (1024, 1024, 1)]

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        blocks = [nn.Sequential(*_bn_relu_conv(3, 32, 3, 2))]
        for cin, cout, stride in self.PLAN:
            blocks.append(nn.Sequential(*_bn_relu_conv(cin, cin, 3, stride, groups=cin),
                                        *_bn_relu_conv(cin, cout, 1, 1)))
        self.model = nn.Sequential(*blocks)
        self.fc = nn.Linear(1024, num_classes)

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.model(x)
        return {"features": x, "pooled": torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x)["pooled"])


@register_model("mobilenetv1", input_size=224, dataset="imagenet")
def mobilenetv1(num_classes: int = 1000) -> MobileNetV1:
    return MobileNetV1(num_classes)
