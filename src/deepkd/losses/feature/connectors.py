"""Small trainable modules that map a student feature onto a teacher's (FitNet's regressor and kin).

Their shapes follow mdistiller's, so a recipe's numbers mean the same thing there and here; they are
trained with the student (the optimizer gets them after its parameters) and never exported.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from deepkd.errors import ConfigError


def conv_regressor(student: Sequence[int], teacher: Sequence[int], *, relu: bool = True) -> nn.Sequential:
    """FitNet's convolutional regressor from a student map ``(C_s, H_s, W_s)`` to a teacher map
    ``(C_t, H_t, W_t)``: a stride-2 3x3 conv when the student's map is twice the teacher's, a stride-2
    4x4 transposed conv when it is half, else a ``(1 + H_s - H_t) x (1 + W_s - W_t)`` conv; then
    BatchNorm and (``relu``) a ReLU."""
    (s_channels, s_height, s_width), (t_channels, t_height, t_width) = student, teacher
    if s_height == 2 * t_height:
        conv = nn.Conv2d(s_channels, t_channels, kernel_size=3, stride=2, padding=1)
    elif 2 * s_height == t_height:
        conv = nn.ConvTranspose2d(s_channels, t_channels, kernel_size=4, stride=2, padding=1)
    elif s_height >= t_height:
        conv = nn.Conv2d(s_channels, t_channels, kernel_size=(1 + s_height - t_height, 1 + s_width - t_width))
    else:
        raise ConfigError(f"no regressor maps a {s_height}x{s_width} student feature onto a {t_height}x{t_width} "
                          "teacher feature: choose a student stage at least as large as the teacher's")
    layers = [conv, nn.BatchNorm2d(t_channels)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


def stage_shape(info, stage: int) -> tuple:
    """``(channels, height, width)`` of ``stage`` of a :class:`~deepkd.models.features.FeatureInfo`."""
    if not -len(info.channels) <= stage < len(info.channels):
        raise ConfigError(f"stage {stage} does not exist: the model has {len(info.channels)} feature stages "
                          f"(0 is the stem)")
    return (info.channels[stage], *info.sizes[stage])
