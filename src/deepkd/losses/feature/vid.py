"""``vid``: Variational Information Distillation (Ahn et al., Variational Information Distillation for
Knowledge Transfer, CVPR 2019), as mdistiller's ``VID``.

For every stage after the stem (``stages[1:]``, paired by index), the teacher's feature ``t`` is
modelled as a Gaussian whose mean a regressor predicts from the student's feature ``s``,
``mu = conv1x1(relu(conv1x1(relu(conv1x1(s)))))`` (C_s -> C_t -> C_t -> C_t, no biases), with a
per-channel variance ``var_c = softplus(alpha_c) + eps``. The larger of the two maps is first
average-pooled (adaptive) to the smaller's size. The loss is the negative log-likelihood (without its
constant), averaged over batch, channels and positions, and summed over the stages:

    L_vid = feat_weight * sum_stages mean_{b,c,h,w} 0.5 * ((mu - t)^2 / var_c + log var_c)

``alpha_c`` starts at ``log(exp(init_pred_var - eps) - 1)``, so that ``var_c = init_pred_var``.

NOTE(paper): the paper (and the authors' code) learns ``alpha`` with the regressors; mdistiller keeps
the ``alpha`` tensors in a plain Python list, outside its learnable parameters, so the optimizer never
moves them and the variance stays ``init_pred_var`` for the whole run. We follow mdistiller by
default (``alpha`` a buffer, checkpointed, never trained); ``learn_variance=True`` makes it a trained
parameter as in the paper. The paper sums the log-likelihood over channels and positions (one weight
per layer); mdistiller averages it, with one ``feat_weight`` for all stages, as here.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deepkd.errors import ConfigError
from deepkd.features import FeatureInfo, Features
from deepkd.losses.base import LossTerm, Method
from deepkd.losses.registry import register_method


def mean_regressor(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """VID's mean predictor: three bias-free 1x1 convolutions ``C_s -> C_t -> C_t -> C_t`` with a ReLU
    between each two (torch's default initialisation, as mdistiller's)."""
    def conv(cin: int) -> nn.Conv2d:
        return nn.Conv2d(cin, teacher_channels, kernel_size=1, bias=False)

    return nn.Sequential(conv(student_channels), nn.ReLU(), conv(teacher_channels), nn.ReLU(), conv(teacher_channels))


class VariationalHead(nn.Module):
    """One stage's Gaussian: the regressor ``mean`` and the per-channel ``log_scale`` (``alpha``; a buffer,
    or with ``learn`` a parameter) whose ``softplus + eps`` is the variance."""

    def __init__(self, student_channels: int, teacher_channels: int, *, init_pred_var: float, eps: float,
                 learn: bool):
        super().__init__()
        self.eps = eps
        self.mean = mean_regressor(student_channels, teacher_channels)
        alpha = torch.full((teacher_channels,), math.log(math.exp(init_pred_var - eps) - 1.0))
        if learn:
            self.log_scale = nn.Parameter(alpha)
        else:
            self.register_buffer("log_scale", alpha)

    def variance(self) -> torch.Tensor:
        """``softplus(alpha) + eps`` per channel, as ``log(1 + exp(alpha)) + eps`` (mdistiller's arithmetic)."""
        return torch.log(1.0 + torch.exp(self.log_scale)) + self.eps

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood (less its constant) of ``teacher`` under this stage's Gaussian."""
        student, teacher = match_size(student, teacher)
        var = self.variance().to(teacher.dtype)[None, :, None, None]
        return (0.5 * ((self.mean(student) - teacher) ** 2 / var + torch.log(var))).mean()


def match_size(student: torch.Tensor, teacher: torch.Tensor):
    """Adaptive-average-pool the map with the larger height to the other's ``(H, W)``.

    NOTE(paper): mdistiller pools to ``(H, H)``, the same on its square maps; we keep the width."""
    if student.shape[2] > teacher.shape[2]:
        student = F.adaptive_avg_pool2d(student, teacher.shape[2:])
    elif student.shape[2] < teacher.shape[2]:
        teacher = F.adaptive_avg_pool2d(teacher, student.shape[2:])
    return student, teacher


def paired_stages(student_info: FeatureInfo, teacher_info: FeatureInfo) -> List[int]:
    """The stages VID distills: every student stage after the stem, each with the teacher's of the same index
    (mdistiller's ``feats[1:]``); a teacher with fewer stages is a one-sentence ConfigError."""
    n_student, n_teacher = len(student_info.channels), len(teacher_info.channels)
    if n_student < 2:
        raise ConfigError(f"vid distills the stages after the stem, but the student has {n_student} feature stage")
    if n_teacher < n_student:
        raise ConfigError(f"vid pairs each student stage with the teacher's of the same index, but the student "
                          f"has {n_student} feature stages and the teacher only {n_teacher}")
    return list(range(1, n_student))


@register_method("vid", paper="Ahn et al., Variational Information Distillation for Knowledge Transfer, CVPR 2019")
class VID(Method):
    """``ce_weight CE + feat_weight sum_k NLL_k``; terms ``ce`` (task) and ``vid`` (target). One
    :class:`VariationalHead` per stage after the stem (``heads``, trained with the student,
    checkpointed, never exported). Defaults: mdistiller's CIFAR-100 (weights 1 and 1, ``eps`` 1e-5,
    ``init_pred_var`` 5, the variance not learned)."""

    features = True

    def __init__(self, *, student_info: FeatureInfo, teacher_info: FeatureInfo, ce_weight: float = 1.0,
                 feat_weight: float = 1.0, eps: float = 1e-5, init_pred_var: float = 5.0,
                 learn_variance: bool = False):
        super().__init__()
        if eps < 0 or init_pred_var <= eps:
            raise ConfigError(f"vid needs 0 <= eps < init_pred_var (the variance starts at init_pred_var, "
                              f"softplus + eps), not eps {eps} and init_pred_var {init_pred_var}")
        self.ce_weight, self.feat_weight = ce_weight, feat_weight
        self.stages: Sequence[int] = paired_stages(student_info, teacher_info)
        self.heads = nn.ModuleList(
            VariationalHead(student_info.channels[k], teacher_info.channels[k], init_pred_var=init_pred_var,
                            eps=eps, learn=learn_variance) for k in self.stages)

    def forward(self, student: Features, teacher: Optional[Features], target: torch.Tensor, *,
                epoch: int) -> Dict[str, LossTerm]:
        ce = F.cross_entropy(student.logits, target)
        nll = sum(head(student.stages[k], teacher.stages[k].detach()) for k, head in zip(self.stages, self.heads))
        return {"ce": LossTerm(self.ce_weight * ce, "task"), "vid": LossTerm(self.feat_weight * nll, "target")}
