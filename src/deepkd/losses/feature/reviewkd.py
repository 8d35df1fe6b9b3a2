"""``reviewkd``: Knowledge Review (Chen et al., Distilling Knowledge via Knowledge Review, CVPR 2021),
mdistiller's ``ReviewKD``.

The student's levels (its stages after the stem, then the pooled vector as a ``1x1`` map) are fused
from the deepest to the shallowest by attention-based fusion (ABF) modules: each maps its level to
``mid`` channels (1x1 conv + BN), mixes it with the deeper level's fused map (nearest-upsampled) by two
sigmoid attention maps from a 1x1 conv of their concatenation, resizes it to the teacher's level and
maps it to the teacher's channels (3x3 conv + BN). Each output is matched to the teacher's level (its
pre-activation stages after the stem, then the pooled vector) by the hierarchical context loss::

    HCL(s, t) = (MSE(s, t) + sum_k 2^-k MSE(pool_{l_k}(s), pool_{l_k}(t))) / (1 + sum_k 2^-k)

over ``l_k`` in 4, 2, 1 (``k`` counting only the sizes smaller than the map's height; adaptive average
pooling), summed over the levels. The loss is ``ce_weight CE + reviewkd_weight min(epoch / warmup_epochs,
1) sum HCL``, epochs counting from 1.

``fpn: true`` distils a detector's feature pyramid, as the ReviewKD detection code (which DKD's
detection code reuses) does: every FPN level of the student (``Features.stages``, shallowest first) is
paired with the teacher's level of the same index (no stem skipped, no pooled level, the FPN outputs
as they are: nothing follows them to be pre-activated), each ABF output resized to its teacher level's
size of that batch (images vary in size), and HCL's pools apply as on any map.

NOTE(paper): the halving HCL weights normalized by their sum, the teacher's pre-activation features,
the ``min(epoch / warmup_epochs, 1)`` warm-up and the kaiming-uniform (``a=1``) init of the two ABF
convs are the reference code's (mdistiller's, after the authors' release), which we follow.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from deepkd.errors import ConfigError
from deepkd.features import FeatureInfo, Features
from deepkd.losses.base import LossTerm, Method, warmup_factor
from deepkd.losses.registry import register_method

POOL_SIZES = (4, 2, 1)
Size = Tuple[int, ...]


def hcl(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss summed over level pairs ``[B, C, H, W]`` (the module docstring's)."""
    total = None
    for fs, ft in zip(student, teacher):
        loss, weight, norm = F.mse_loss(fs, ft), 1.0, 1.0
        for size in POOL_SIZES:
            if size >= fs.shape[2]:
                continue
            weight /= 2.0
            pooled = F.mse_loss(F.adaptive_avg_pool2d(fs, (size, size)), F.adaptive_avg_pool2d(ft, (size, size)))
            loss, norm = loss + weight * pooled, norm + weight
        total = loss / norm if total is None else total + loss / norm
    return total


class ABF(nn.Module):
    """Attention-based fusion of one student level with the deeper levels' fused map (``fuse``), then
    resized to the teacher's level and mapped to its channels. Submodule names match mdistiller's."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor], out_size: Size
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(output, fused)``: the output for the teacher's level and the fused map passed to the next."""
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, tuple(x.shape[2:]), mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, tuple(out_size), mode="nearest")
        return self.conv2(x), x


def _levels(info: FeatureInfo, role: str, preact: bool) -> Tuple[List[int], List[Size]]:
    """Channels and sizes of a model's levels: every stage, then the pooled vector as a 1x1 map."""
    if info.pooled is None:
        raise ConfigError(f"reviewkd needs the {role}'s pooled feature (the classifier's input), which this "
                          "model does not expose (a detector's feature pyramid: set reviewkd's fpn: true)")
    if preact and not info.preact:
        raise ConfigError(f"reviewkd reads the {role}'s pre-activation features, which this model does not expose: "
                          + ("use a teacher that has them" if role == "teacher" else "set stu_preact: false"))
    return [*info.channels, info.pooled], [tuple(s) for s in info.sizes] + [(1, 1)]


def _matched(student: FeatureInfo, teacher: FeatureInfo, stu_preact: bool, fpn: bool
             ) -> Tuple[List[int], List[Size], List[int], List[Size]]:
    """``(student channels, sizes, teacher channels, sizes)`` of the paired levels, shallowest first."""
    if fpn:
        if stu_preact:
            raise ConfigError("reviewkd with fpn: true reads the pyramid's levels as they are: set stu_preact: false")
        if len(student.channels) != len(teacher.channels):
            raise ConfigError(f"reviewkd with fpn: true pairs the pyramids level by level, but the student has "
                              f"{len(student.channels)} levels and the teacher {len(teacher.channels)}")
        return (list(student.channels), [tuple(s) for s in student.sizes], list(teacher.channels),
                [tuple(s) for s in teacher.sizes])
    t_channels, t_sizes = _levels(teacher, "teacher", preact=True)
    t_channels, t_sizes = t_channels[1:], t_sizes[1:]  # the teacher's stem is not matched
    s_channels, s_sizes = _levels(student, "student", preact=stu_preact)
    if len(s_channels) < len(t_channels):
        raise ConfigError(f"reviewkd matches the teacher's {len(t_channels)} levels (stages after the stem, then "
                          f"the pooled vector) but the student has only {len(s_channels)} (stem included)")
    return s_channels[-len(t_channels):], s_sizes[-len(t_channels):], t_channels, t_sizes


def _sides(sizes: Sequence[Size]) -> list:
    """Spatial sizes as mdistiller writes them: the side length of a square map, else ``(H, W)``."""
    return [size[0] if len(set(size)) == 1 else tuple(size) for size in sizes]


def _override(name: str, given: Optional[Sequence[int]], derived: list, what: str) -> list:
    """``derived`` (what the models give); a recipe's list, where given, must equal it."""
    if given is not None and [tuple(g) if isinstance(g, (list, tuple)) else g for g in given] != derived:
        raise ConfigError(f"{name} {list(given)} does not match the {what} {derived}: remove it to take the models'")
    return derived


@register_method("reviewkd", paper="Chen et al., Distilling Knowledge via Knowledge Review, CVPR 2021",
                 detection=True)  # reads a detector's feature pyramid (fpn: true)
class ReviewKD(Method):
    """``ce_weight CE + reviewkd_weight min(epoch / warmup_epochs, 1) sum_l HCL(ABF_l(f_s), f_t[l])``;
    terms ``ce`` (task) and ``reviewkd`` (target: a feature term has no target/non-target split).

    The levels come from the models: the teacher's pre-activation stages after the stem plus its pooled
    vector; the student's as many last levels of its stages (``stu_preact``: pre-activations) plus its
    pooled vector. ``in_channels``/``out_channels`` (shallowest level first) and ``shapes``/``out_shapes``
    (deepest first: the pooled ``1`` first) are mdistiller's lists; ``None`` takes them from the models, a
    list given must equal them. Defaults: mdistiller's CIFAR-100 (weights 1 and 5, warm-up 20 epochs,
    mid channels at most 512). ``fpn``: a detector's pyramid levels, paired one to one (module docstring);
    the sizes are then those of the models' dry run, each batch's own in training.
    """

    features = True

    def __init__(self, *, student_info: FeatureInfo, teacher_info: FeatureInfo, ce_weight: float = 1.0,
                 reviewkd_weight: float = 5.0, warmup_epochs: float = 20.0, max_mid_channel: int = 512,
                 stu_preact: bool = False, in_channels: Optional[List[int]] = None,
                 out_channels: Optional[List[int]] = None, shapes: Optional[List[int]] = None,
                 out_shapes: Optional[List[int]] = None, fpn: bool = False):
        super().__init__()
        self.ce_weight, self.reviewkd_weight, self.warmup_epochs = ce_weight, reviewkd_weight, warmup_epochs
        self.stu_preact, self.fpn = stu_preact, fpn
        s_channels, s_sizes, t_channels, t_sizes = _matched(student_info, teacher_info, stu_preact, fpn)
        self.in_channels = _override("in_channels", in_channels, s_channels, "student's level channels")
        self.out_channels = _override("out_channels", out_channels, t_channels, "teacher's level channels")
        self.shapes = _override("shapes", shapes, _sides(s_sizes[::-1]), "student's level sizes")
        self.out_shapes = _override("out_shapes", out_shapes, _sides(t_sizes[::-1]), "teacher's level sizes")
        self.out_sizes = t_sizes[::-1]  # deepest (the pooled 1x1) first, as the ABFs run (fpn: each batch's)
        # NOTE: mdistiller reads no MAX_MID_CHANNEL and caps at 512 itself: equal at the default only
        mid = min(max_mid_channel, s_channels[-1])
        last = len(s_channels) - 1
        built = [ABF(c_in, mid, c_out, idx < last) for idx, (c_in, c_out) in enumerate(zip(s_channels, t_channels))]
        self.abfs = nn.ModuleList(built[::-1])  # built shallowest first (mdistiller's init order), run deepest first

    def student_levels(self, student: Features) -> List[torch.Tensor]:
        """The student's levels the ABFs read, shallowest first (stages or pre-activations, then pooled;
        ``fpn``: the pyramid's levels)."""
        if self.fpn:
            return list(student.stages)
        stages = student.preact if self.stu_preact else student.stages
        return [*stages, student.pooled[:, :, None, None]][-len(self.abfs):]

    def teacher_levels(self, teacher: Features) -> List[torch.Tensor]:
        """The teacher's levels the outputs are matched to, shallowest first (pre-activations after the
        stem, then pooled; ``fpn``: the pyramid's levels)."""
        if self.fpn:
            return list(teacher.stages)
        return [*teacher.preact[1:], teacher.pooled[:, :, None, None]]

    def fuse(self, levels: Sequence[torch.Tensor], out_sizes: Optional[Sequence[Size]] = None) -> List[torch.Tensor]:
        """The ABF outputs for the teacher's levels, shallowest first, from the student's ``levels``;
        ``out_sizes``: the teacher's level sizes, deepest first (default: the models' dry run)."""
        outputs, residual = [], None
        for abf, x, out_size in zip(self.abfs, reversed(levels), out_sizes or self.out_sizes):
            out, residual = abf(x, residual, out_size)
            outputs.insert(0, out)
        return outputs

    def forward(self, student: Features, teacher: Optional[Features], target: torch.Tensor, *,
                epoch: int) -> Dict[str, LossTerm]:
        ce = F.cross_entropy(student.logits, target)
        targets = self.teacher_levels(teacher)
        sizes = [tuple(t.shape[2:]) for t in reversed(targets)] if self.fpn else None
        loss = hcl(self.fuse(self.student_levels(student), sizes), targets)
        weight = self.reviewkd_weight * warmup_factor(epoch, self.warmup_epochs)
        return {"ce": LossTerm(self.ce_weight * ce, "task"), "reviewkd": LossTerm(weight * loss, "target")}
