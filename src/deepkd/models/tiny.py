"""Small plain CNNs for the offline synthetic benchmark, the demo and fast tests.

``cnn_w{W}``: four conv3x3-BN-ReLU stages with widths W, 2W, 4W, 8W, max-pool after stages 2 and 3,
global average pool, linear head (``cnn_w8_plain``: no BatchNorm). Not from any paper; deepkd's own
CPU-sized teacher/student pair.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from deepkd.models.registry import register_model


def _stage(cin: int, cout: int, pool: bool, norm: bool = True) -> nn.Sequential:
    if norm:
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
    else:
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=True)]
    layers.append(nn.ReLU(inplace=True))
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class TinyCNN(nn.Module):
    def __init__(self, width: int = 16, num_classes: int = 100, norm: bool = True):
        super().__init__()
        w = width
        self.stages = nn.ModuleList([
            _stage(3, w, False, norm), _stage(w, 2 * w, True, norm), _stage(2 * w, 4 * w, True, norm),
            _stage(4 * w, 8 * w, False, norm)
        ])
        self.fc = nn.Linear(8 * w, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Stage outputs ``feat0..feat3`` and the pooled vector ``pooled`` ``[B, 8W]``."""
        feats = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            feats[f"feat{i}"] = x
        feats["pooled"] = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x)["pooled"])


def _make(width: int):
    @register_model(f"cnn_w{width}", input_size=32, dataset="synthetic")
    def build(num_classes: int = 100) -> TinyCNN:
        return TinyCNN(width, num_classes)

    return build


for _w in (4, 8, 16, 32, 64):
    _make(_w)


@register_model("cnn_w8_plain", input_size=32, dataset="synthetic")
def cnn_w8_plain(num_classes: int = 100) -> TinyCNN:
    """``cnn_w8`` without BatchNorm: per-sample independent, so data-parallel runs equal one process
    on the whole batch exactly (used by the multi-process tests)."""
    return TinyCNN(8, num_classes, norm=False)
