"""``ofd``: A Comprehensive Overhaul of Feature Distillation (Heo et al., ICCV 2019), as mdistiller's ``OFD``.

The student's pre-ReLU feature of each stage but the stem goes through a connector ``r_i`` (conv
``kernel_size`` x ``kernel_size``, no bias, then BatchNorm); the teacher's pre-ReLU feature ``t_i`` is
average-pooled to the connector's output size and clipped from below by a per-channel margin ``m_i``
(the margin ReLU ``max(t, m)``). The partial L2 distance skips each position where the teacher is not
positive and the student is already below its (clipped) value::

    T = max(t_i, m_i)         d_p = sum_{c,h,w} (r_i(s_i) - T)^2 [r_i(s_i) > T or t_i > 0]
    L = ce_weight CE + feat_weight * sum_i mean_batch(d_p) / 2^(n-1-i)     (i = 0..n-1, deepest last)

With the teacher's BatchNorm right before that ReLU ``BN(x) = gamma x_hat + beta``, its output per
channel is taken as ``N(beta, |gamma|^2)``; the margin is the mean of its negative part,
``E[x | x < 0] = beta - |gamma| phi(beta/|gamma|) / Phi(-beta/|gamma|)``, and ``-3 |gamma|`` where
``Phi(-beta/|gamma|) <= 0.001``; rounded to float32 once at build time and kept as buffers ``margin{i}``.
When the student and the teacher have different numbers of stages, the last ``n`` of each are paired.

Which BatchNorm feeds each teacher pre-activation (mdistiller's ``get_bn_before_relu``), by architecture:

=====================  ==========================================================================
CIFAR ResNet, x4, 18   each stage's last block's last BN (``bn2``; ``bn3`` of a Bottleneck): its
/50, ShuffleV1,        output plus the shortcut is the pre-activation
torchvision ResNet
WRN                    ``block2.layer.0.bn1``, ``block3.layer.0.bn1``, ``bn1`` (the next BN's output)
VGG                    the last module of ``block1..4`` (a BN: its output is the pre-activation)
MobileNetV2            ``blocks.{1,2,4,6}``: the last BN of the last inverted residual
cnn_w*                 the BN of each stage (its output is the ReLU's input)
=====================  ==========================================================================

ShuffleV2 exposes no pre-activations; any other teacher is refused in one sentence.

The teacher runs in training mode by default (``teacher_mode: train``), as mdistiller's ``OFD.train``
(and the authors' code) leaves it: its features use the batch's BatchNorm statistics, and its running
statistics drift with every training batch (they are checkpointed with the run, so a resume is
exact; the margins come from gamma and beta, which do not move). ``teacher_mode: eval`` runs it on its
running statistics, as every other deepkd method does. Either way the teacher gets no gradient, and it
is evaluated in eval mode.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deepkd.errors import ConfigError
from deepkd.features import FeatureInfo, Features
from deepkd.losses.base import TEACHER_MODES, LossTerm, Method
from deepkd.losses.registry import register_method

# NOTE(paper): mdistiller (and the authors' code) replace the margin by -3|gamma| where P(x < 0) <= 0.001,
# a numerical guard the paper does not state; a channel with gamma = 0 (where both would divide by zero)
# gets the limit of the formula, min(beta, 0).
TAIL = 0.001


def _layer_ends(model: nn.Module) -> List[str]:
    """``layer{k}.{last}.bn3`` (Bottleneck, ShuffleV1) or ``.bn2`` (BasicBlock) for each ``layer{k}``."""
    paths = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        if hasattr(model, name):
            blocks = getattr(model, name)
            paths.append(f"{name}.{len(blocks) - 1}.{'bn3' if hasattr(blocks[-1], 'bn3') else 'bn2'}")
    return paths


def _wrn(model: nn.Module) -> List[str]:
    return ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]


def _vgg(model: nn.Module) -> List[str]:
    return [f"block{k}.{len(getattr(model, f'block{k}')) - 1}" for k in range(1, 5)]


def _mobilenetv2(model: nn.Module) -> List[str]:
    ends = []
    for i in (1, 2, 4, 6):
        last = len(model.blocks[i]) - 1
        ends.append(f"blocks.{i}.{last}.conv.{len(model.blocks[i][last].conv) - 1}")
    return ends


def _tiny(model: nn.Module) -> List[str]:
    # the module right before each stage's ReLU (a BN, or the conv of the BN-free cnn_w8_plain)
    return [f"stages.{i}.{next(j for j, m in enumerate(stage) if isinstance(m, nn.ReLU)) - 1}"
            for i, stage in enumerate(model.stages) if i > 0]


# by the architecture's exact class (as deepkd.models.features looks up its feature points; deepkd.losses
# may not import deepkd.models, so the classes are named, not imported)
BN_BEFORE_RELU: Dict[str, Callable[[nn.Module], List[str]]] = {
    "deepkd.models.cifar_resnet.CifarResNet": _layer_ends,
    "deepkd.models.cifar_resnet.CifarResNetV2": _layer_ends,
    # NOTE(paper): mdistiller refuses ShuffleNet teachers; deepkd takes each stage's last bn3, as for ResNets
    "deepkd.models.cifar_mobile.ShuffleNetV1": _layer_ends,
    "deepkd.models.cifar_wrn_vgg.WideResNet": _wrn,
    "deepkd.models.cifar_wrn_vgg.VGG": _vgg,
    "deepkd.models.cifar_mobile.MobileNetV2": _mobilenetv2,
    "deepkd.models.tiny.TinyCNN": _tiny,
    # torchvision's ImageNet ResNets: the same blocks (bn2 / bn3 plus the shortcut feed the last ReLU)
    "torchvision.models.resnet.ResNet": _layer_ends,
}


def bn_before_relu(model: nn.Module) -> List[nn.BatchNorm2d]:
    """The BatchNorm that feeds each of ``model``'s pre-activation features after the stem
    (``Features.preact[1:]``), in order; a ConfigError for an architecture without them."""
    kind = type(model)
    rule = BN_BEFORE_RELU.get(f"{kind.__module__}.{kind.__qualname__}")
    if rule is None:
        raise ConfigError(f"ofd needs the BatchNorm before each teacher stage's ReLU, which deepkd knows only for "
                          f"the CIFAR and torchvision ResNets, WRNs, VGGs, MobileNetV2, ShuffleV1 and cnn_w*, "
                          f"not {kind.__name__}")
    modules = dict(model.named_modules())
    found = []
    for path in rule(model):
        if not isinstance(modules.get(path), nn.BatchNorm2d):
            raise ConfigError(f"ofd needs a BatchNorm before each teacher stage's ReLU, but {kind.__name__}'s "
                              f"{path!r} is a {type(modules.get(path)).__name__}")
        found.append(modules[path])
    return found


def gaussian_margin(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per channel, ``E[x | x < 0]`` of ``x ~ N(bias, weight^2)`` (``-3 |weight|`` where ``P(x < 0) <= 0.001``),
    as a float32 tensor ``[C]`` (mdistiller computes it in double precision and keeps a FloatTensor)."""
    margins = []
    for std, mean in zip(weight.detach().abs().tolist(), bias.detach().tolist()):
        if std == 0.0:
            margins.append(min(mean, 0.0))
            continue
        z = mean / std
        below = 0.5 * math.erfc(z / math.sqrt(2.0))  # Phi(-z) = P(x < 0)
        if below > TAIL:
            margins.append(mean - std * math.exp(-z * z / 2.0) / math.sqrt(2.0 * math.pi) / below)
        else:
            margins.append(-3.0 * std)
    return torch.tensor(margins, dtype=torch.float32)


def partial_l2(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """``sum_{c,h,w} (s - max(t, m))^2`` over the positions where ``s > max(t, m)`` or ``t > 0``, averaged
    over the batch; ``margin`` ``[C]``."""
    clipped = torch.maximum(teacher, margin.to(student.dtype)[:, None, None])
    keep = (student > clipped) | (teacher > 0)
    return ((student - clipped).pow(2) * keep.to(student.dtype)).mean(0).sum()


def connector(s_channels: int, t_channels: int, kernel_size: int) -> nn.Sequential:
    """mdistiller's OFD connector: conv (``kernel_size``, stride 1, padding ``(k - 1) // 2``, no bias,
    weights ~ N(0, 2 / (k^2 t_channels))) then BatchNorm (weight 1, bias 0)."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size, stride=1, padding=(kernel_size - 1) // 2, bias=False)
    bn = nn.BatchNorm2d(t_channels)
    conv.weight.data.normal_(0.0, math.sqrt(2.0 / (kernel_size * kernel_size * t_channels)))
    bn.weight.data.fill_(1.0)
    bn.bias.data.zero_()
    return nn.Sequential(conv, bn)


def _check_models(student_info: FeatureInfo, teacher_info: Optional[FeatureInfo],
                  teacher_model: Optional[nn.Module], kernel_size: int) -> None:
    if teacher_model is None or teacher_info is None:
        raise ConfigError("ofd distils from a teacher's features: add a teacher section (name and weights)")
    if not student_info.preact:
        raise ConfigError("ofd reads the student's pre-ReLU features, which this student does not expose "
                          "(Features.preact; e.g. ShuffleV2): choose another student")
    if not teacher_info.preact:
        raise ConfigError(f"ofd reads the teacher's pre-ReLU features, which {type(teacher_model).__name__} does "
                          f"not expose (Features.preact): choose another teacher")
    if min(len(student_info.channels), len(teacher_info.channels)) < 2:
        raise ConfigError("ofd distils the stages after the stem, and one of the models has none")
    if kernel_size < 1:
        raise ConfigError(f"ofd kernel_size must be at least 1, not {kernel_size}")


@register_method("ofd", paper="Heo et al., A Comprehensive Overhaul of Feature Distillation, ICCV 2019")
class OFD(Method):
    """``ce_weight CE + feat_weight sum_i partial_l2(r_i(s_i), pool(t_i), m_i) / 2^(n-1-i)`` over the
    pre-ReLU features after the stem (the module docstring); terms ``ce`` (task) and ``ofd`` (target: a
    feature term has no target/non-target split, so it rides the stream of KD's undecomposed term).
    Defaults: mdistiller's CIFAR-100 (weights 1 and 0.001, 1x1 connectors, the teacher in training mode).
    The margins are read from ``teacher_model``'s BatchNorms at build time; the teacher itself is not kept."""

    features = True

    def __init__(self, *, student_info: FeatureInfo, teacher_info: Optional[FeatureInfo] = None,
                 teacher_model: Optional[nn.Module] = None, ce_weight: float = 1.0, feat_weight: float = 0.001,
                 kernel_size: int = 1, teacher_mode: str = "train"):
        super().__init__()
        _check_models(student_info, teacher_info, teacher_model, kernel_size)
        if teacher_mode not in TEACHER_MODES:
            raise ConfigError(f"ofd teacher_mode {teacher_mode!r} is not one of {', '.join(TEACHER_MODES)}")
        self.ce_weight, self.feat_weight, self.teacher_mode = ce_weight, feat_weight, teacher_mode
        bns = bn_before_relu(teacher_model)
        t_channels = list(teacher_info.channels[1:])
        if [bn.num_features for bn in bns] != t_channels:
            raise ConfigError(f"ofd: the BatchNorms before {type(teacher_model).__name__}'s ReLUs have "
                              f"{[bn.num_features for bn in bns]} channels, its pre-ReLU features {t_channels}")
        # NOTE(paper): as mdistiller, pair the last n stages of each model (mdistiller indexes the margins from
        # the first, which only runs when the teacher has no more stages than the student: then both agree)
        n = min(len(student_info.channels), len(teacher_info.channels)) - 1
        s_channels = student_info.channels[1:][-n:]
        self.connectors = nn.ModuleList(connector(s, t, kernel_size) for s, t in zip(s_channels, t_channels[-n:]))
        for i, bn in enumerate(bns[-n:]):
            self.register_buffer(f"margin{i}", gaussian_margin(bn.weight, bn.bias))

    def margins(self) -> List[torch.Tensor]:
        """The per-channel margins ``[C_i]`` of the distilled stages, shallowest first."""
        return [getattr(self, f"margin{i}") for i in range(len(self.connectors))]

    def forward(self, student: Features, teacher: Optional[Features], target: torch.Tensor, *,
                epoch: int) -> Dict[str, LossTerm]:
        ce = F.cross_entropy(student.logits, target)
        n = len(self.connectors)
        pairs = zip(self.connectors, student.preact[1:][-n:], teacher.preact[1:][-n:], self.margins())
        loss = student.logits.new_zeros(())
        for i, (regress, s, t, margin) in enumerate(pairs):
            mapped = regress(s)
            # NOTE(paper): mdistiller average-pools the teacher to the student's size (the paper pairs
            # same-sized maps); a no-op when the sizes agree
            pooled = F.adaptive_avg_pool2d(t, mapped.shape[-2:]).detach()
            loss = loss + partial_l2(mapped, pooled, margin) / 2 ** (n - i - 1)
        return {"ce": LossTerm(self.ce_weight * ce, "task"), "ofd": LossTerm(self.feat_weight * loss, "target")}
