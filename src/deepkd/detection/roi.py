"""RoI class logits of a Faster R-CNN student and of its teacher on the student's sampled proposals.

:func:`roi_forward` does what ``GeneralizedRCNN.forward`` and the box branch of ``RoIHeads.forward``
do in training (torchvision 0.29), with torchvision's own public modules and loss, and returns the
intermediates that logit distillation needs. Its losses are bitwise those of ``model(images,
targets)`` for the same RNG state (the RPN and RoI samplers draw from the global RNG).
:func:`teacher_roi_logits` runs a frozen teacher's backbone and box head on the student's
transformed image tensor and sampled proposals (the DKD reference, mdistiller ``RCNNKD``), so both
class-logit matrices describe the same boxes, row for row.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss

from deepkd.errors import ConfigError, DataError
from deepkd.features import FeatureInfo

Target = Dict[str, torch.Tensor]


class RoIOutputs(NamedTuple):
    """What :func:`roi_forward` returns.

    - ``losses``: torchvision's loss dict, ``loss_classifier``, ``loss_box_reg``, ``loss_objectness``,
      ``loss_rpn_box_reg`` (scalars);
    - ``images``: the transformed, padded batch (``ImageList``: ``tensors [B, 3, H, W]``, ``image_sizes``);
    - ``proposals``: the sampled proposals per image, ``[n_i, 4]`` xyxy in the transformed frame;
    - ``labels``: ``int64 [N]``, ``N = sum n_i``, the class each proposal was matched to (0 = background);
    - ``class_logits``: ``[N, C]``, the box predictor's class scores of those proposals;
    - ``features``: the backbone's output levels in its order (an FPN's: ``[B, C, H_l, W_l]``, finest first).
    """

    losses: Dict[str, torch.Tensor]
    images: ImageList
    proposals: List[torch.Tensor]
    labels: torch.Tensor
    class_logits: torch.Tensor
    features: List[torch.Tensor]


class TeacherOutputs(NamedTuple):
    """What :func:`teacher_forward` returns: ``class_logits`` ``[N, C]`` on the student's proposals and
    ``features``, the teacher backbone's output levels (as :attr:`RoIOutputs.features`)."""

    class_logits: torch.Tensor
    features: List[torch.Tensor]


def check_detector(model: nn.Module, role: str = "student") -> None:
    """Raise unless ``model`` is a torchvision R-CNN with a box branch; a student must also have no
    mask or keypoint head (their losses would be left out)."""
    heads = getattr(model, "roi_heads", None)
    if not isinstance(model, GeneralizedRCNN) or heads is None or getattr(heads, "box_predictor", None) is None:
        raise ConfigError(f"the detection {role} must be a torchvision Faster/Mask R-CNN with a box branch, "
                          f"got {type(model).__name__}")
    if role == "student" and (heads.has_mask() or heads.has_keypoint()):
        raise ConfigError(f"the detection student {type(model).__name__} has a mask or keypoint head; deepkd "
                          "distils Faster R-CNN students only (use it as a teacher, or build a FasterRCNN)")


def _check_targets(targets: Sequence[Target]) -> None:
    """torchvision asserts on these deep inside its forward; a user gets one sentence instead."""
    for index, target in enumerate(targets):
        boxes = target["boxes"]
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
            raise DataError(f"target {index} of the batch: boxes must be a float [n, 4] tensor, got "
                            f"{boxes.dtype} {list(boxes.shape)}")
        if target["labels"].dtype != torch.int64:
            raise DataError(f"target {index} of the batch: labels must be int64, got {target['labels'].dtype}")
        if bool((boxes[:, 2:] <= boxes[:, :2]).any()):
            raise DataError(f"target {index} of the batch has a box of zero width or height; drop degenerate "
                            "boxes in the dataset (CocoDetection does)")


def roi_forward(model: nn.Module, images: Sequence[torch.Tensor], targets: Sequence[Target]) -> RoIOutputs:
    """The student's detector losses and the class logits of its sampled RoIs, in one forward.

    ``images``: float ``[3, H_i, W_i]`` in 0-1; ``targets``: ``{"boxes": [n_i, 4] xyxy, "labels":
    int64 [n_i]}`` in the same pixels. ``model`` is a torchvision ``FasterRCNN`` in train mode.
    Returns :class:`RoIOutputs`; ``losses`` equal ``model(images, targets)`` bit for bit.
    """
    check_detector(model)
    if not model.training:
        raise ConfigError("roi_forward needs the student in train mode (call model.train()): the RPN and RoI "
                          "samplers only run in training")
    image_list, targets = model.transform(list(images), [dict(t) for t in targets])
    _check_targets(targets)
    features = _levels(model.backbone(image_list.tensors))
    proposals, rpn_losses = model.rpn(image_list, features, targets)
    heads = model.roi_heads
    proposals, _, labels, regression_targets = heads.select_training_samples(proposals, targets)
    box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_list.image_sizes))
    class_logits, box_regression = heads.box_predictor(box_features)
    loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
    # the key order of GeneralizedRCNN.forward: detector losses, then proposal losses
    losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, **rpn_losses}
    return RoIOutputs(losses, image_list, proposals, torch.cat(labels), class_logits, list(features.values()))


def _levels(features) -> "OrderedDict[str, torch.Tensor]":
    """A backbone's output as named levels (a single map is level ``"0"``, as torchvision names it)."""
    return OrderedDict([("0", features)]) if isinstance(features, torch.Tensor) else features


def teacher_roi_logits(teacher: nn.Module, image_tensors: torch.Tensor, proposals: Sequence[torch.Tensor],
                       image_sizes: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """The teacher's class logits ``[N, C]`` for the student's proposals: :func:`teacher_forward`'s."""
    return teacher_forward(teacher, image_tensors, proposals, image_sizes).class_logits


@torch.no_grad()
def teacher_forward(teacher: nn.Module, image_tensors: torch.Tensor, proposals: Sequence[torch.Tensor],
                    image_sizes: Sequence[Tuple[int, int]]) -> TeacherOutputs:
    """The teacher's class logits ``[N, C]`` for the student's proposals (``N = sum len(p)``) and its
    backbone's levels (:class:`TeacherOutputs`).

    ``image_tensors`` ``[B, 3, H, W]`` and ``image_sizes`` are the student's transformed batch
    (``RoIOutputs.images``): the teacher sees the student's resolution, as in the DKD reference;
    :func:`check_pair` makes sure both normalise alike. The teacher must be in eval mode
    (:func:`prepare_teacher`): a BatchNorm in train mode would use and update batch statistics.
    """
    if teacher.training:
        raise ConfigError("the detection teacher is in train mode; call deepkd.detection.prepare_teacher(teacher) "
                          "once before training")
    features = _levels(teacher.backbone(image_tensors))
    heads = teacher.roi_heads
    box_features = heads.box_head(heads.box_roi_pool(features, list(proposals), list(image_sizes)))
    class_logits, _ = heads.box_predictor(box_features)
    return TeacherOutputs(class_logits, list(features.values()))


@torch.no_grad()
def pyramid_info(model: nn.Module, size: int = 128) -> FeatureInfo:
    """A detector's backbone levels as a feature method reads them (a torchvision FPN's ``"0"`` ... ``"pool"``):
    channels and sizes from a dry run of ``model.backbone`` on one zero ``size`` x ``size`` image (small:
    a CPU dry run of a ResNet-FPN at 800 px takes seconds); no pooled vector, no pre-activations. The
    sizes follow the input: a method reads each batch's own (reviewkd's ``fpn: true``)."""
    check_detector(model, role="model")
    param = next(model.parameters())
    modes = {module: module.training for module in model.backbone.modules()}
    model.backbone.eval()  # a BatchNorm in train mode would fold the zero image into its running statistics
    try:
        levels = list(_levels(model.backbone(param.new_zeros(1, 3, size, size))).values())
    finally:
        for module, training in modes.items():
            module.training = training
    return FeatureInfo([t.shape[1] for t in levels], [tuple(t.shape[2:]) for t in levels], pooled=None, preact=False)


def prepare_teacher(teacher: nn.Module) -> nn.Module:
    """Freeze ``teacher`` for distillation: eval mode, ``requires_grad=False`` everywhere; returns it.

    Build the optimizer from the student's parameters and a feature method's only (``train_detector``
    checks it).
    """
    check_detector(teacher, role="teacher")
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def class_count(model: nn.Module) -> Optional[int]:
    """The class count (background included) of a torchvision R-CNN's box predictor, if it says."""
    score = getattr(model.roi_heads.box_predictor, "cls_score", None)
    return score.out_features if isinstance(score, nn.Linear) else None


def check_pair(student: nn.Module, teacher: nn.Module) -> None:
    """Raise unless the teacher can be distilled into the student on shared RoIs: same class count
    and layout size, same input normalisation (the teacher reads the student's normalised tensor)."""
    check_detector(student)
    check_detector(teacher, role="teacher")
    classes = class_count(student), class_count(teacher)
    if classes[0] != classes[1]:
        raise ConfigError(f"the student predicts {classes[0]} classes and the teacher {classes[1]}: both need "
                          "the same class layout (torchvision COCO models: 91, background 0)")
    for key in ("image_mean", "image_std"):
        mine, theirs = getattr(student.transform, key), getattr(teacher.transform, key)
        if list(map(float, mine)) != list(map(float, theirs)):
            raise ConfigError(f"student and teacher normalise differently (transform.{key} {list(mine)} vs "
                              f"{list(theirs)}); the teacher reads the student's normalised images")
