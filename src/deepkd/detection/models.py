"""Detection models: torchvision's R-CNN builders, the students of the DKD pairs, the demo models.

``create_detector(name, num_classes, weights=None, weights_backbone=None)`` builds any registered
name (``list_detectors()``):

- torchvision's builders with their COCO weights (``weights="torchvision:COCO_V1"``; box AP on
  val2017 from torchvision 0.29.1's metadata): ``fasterrcnn_resnet50_fpn`` (37.0),
  ``fasterrcnn_resnet50_fpn_v2`` (46.7), ``fasterrcnn_mobilenet_v3_large_fpn`` (32.8),
  ``fasterrcnn_mobilenet_v3_large_320_fpn`` (22.8), and as teachers ``maskrcnn_resnet50_fpn`` (37.9),
  ``maskrcnn_resnet50_fpn_v2`` (47.4);
- students with an ImageNet backbone (``weights_backbone="torchvision:IMAGENET1K_V1"``), as in
  torchdistill's ``custom_fasterrcnn_resnet_fpn``: ``fasterrcnn_resnet{18,34,101}_fpn``, the
  DKD-like ``fasterrcnn_mobilenet_v2_fpn`` (p2-p6), and ``fasterrcnn_resnet50_fpn`` above;
- ``tiny_fasterrcnn``: deepkd's CPU-sized demo model (not from any paper).

Like torchvision's builders, a model with pretrained weights uses FrozenBatchNorm2d and trains the
last 3 backbone stages; without any, BatchNorm2d and every stage train. ``weights`` may also be a
file (any format ``deepkd.models.load_weights`` reads) saved from a model built with the same
arguments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d, MultiScaleRoIAlign

from deepkd.errors import MissingFileError, WeightsError
from deepkd.registry import Registry

DETECTORS = Registry("detector")
TORCHVISION = "torchvision:"


def _double_conv(cin: int, cout: int, norm: Callable[[int], nn.Module]) -> nn.Sequential:
    """conv3x3(stride 2)-BN-ReLU, conv3x3-BN-ReLU: one stage, halving the resolution."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True))


class TinyFPNBackbone(nn.Module):
    """Stem (stride 2) + 3 stages at strides 4/8/16 (widths W, 2W, 4W) + an FPN with 2W channels.

    ``forward(x [B, 3, H, W]) -> OrderedDict {"0": [B, 2W, H/4, W/4], "1": /8, "2": /16}``.
    """

    def __init__(self, width: int, frozen_bn: bool = False):
        super().__init__()
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), norm(width),
                                  nn.ReLU(inplace=True))
        widths = [width, 2 * width, 4 * width]
        self.stages = nn.ModuleList(_double_conv(cin, cout, norm) for cin, cout in zip([width] + widths, widths))
        self.out_channels = 2 * width  # read by FasterRCNN for its RPN head
        self.fpn = FeaturePyramidNetwork(widths, self.out_channels)

    def forward(self, x: torch.Tensor):
        x = self.stem(x)
        levels = {}
        for index, stage in enumerate(self.stages):
            x = stage(x)
            levels[str(index)] = x
        return self.fpn(levels)


@DETECTORS.register("tiny_fasterrcnn")
def tiny_fasterrcnn(width: int = 16, num_classes: int = 8, *, frozen_bn: bool = False, min_size: int = 128,
                    max_size: int = 128, **kwargs: Any) -> FasterRCNN:
    """deepkd's demo Faster R-CNN for 128-px images (width 16: 341k parameters; width 4: 80k).

    One anchor size per level (16/32/64) x ratios 0.5/1/2; RoIAlign 7x7, ``TwoMLPHead`` with 128
    units; RPN pre/post-NMS 300/150 (train) and 150/75 (test), 128 anchors per image; 64 RoIs per
    image, 20 detections, score threshold 0.01. ``kwargs`` go to ``FasterRCNN``.
    """
    backbone = TinyFPNBackbone(width, frozen_bn)
    names = ["0", "1", "2"]
    # FasterRCNN assumes a 1024-wide representation when given only a box_head: pass the predictor too
    options = dict(min_size=min_size, max_size=max_size,
                   rpn_anchor_generator=AnchorGenerator(((16,), (32,), (64,)), ((0.5, 1.0, 2.0),) * 3),
                   box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
                   box_head=TwoMLPHead(backbone.out_channels * 7 * 7, 128),
                   box_predictor=FastRCNNPredictor(128, num_classes),
                   rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=150,
                   rpn_post_nms_top_n_test=75, rpn_batch_size_per_image=128, box_batch_size_per_image=64,
                   box_detections_per_img=20, box_score_thresh=0.01)
    options.update(kwargs)
    return FasterRCNN(backbone, num_classes=None, **options)


def _torchvision_builder(tv_name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 91, weights=None, weights_backbone=None, **kwargs: Any) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(tv_name, weights=weights, weights_backbone=weights_backbone,
                                            num_classes=num_classes, **kwargs)

    build.__doc__ = f"torchvision.models.detection.{tv_name} (weights_backbone None unless given)."
    return build


for _name, _backbone in (("fasterrcnn_resnet50_fpn", "resnet50"), ("fasterrcnn_resnet50_fpn_v2", "resnet50"),
                         ("fasterrcnn_mobilenet_v3_large_fpn", "mobilenet_v3_large"),
                         ("fasterrcnn_mobilenet_v3_large_320_fpn", "mobilenet_v3_large"),
                         ("maskrcnn_resnet50_fpn", "resnet50"), ("maskrcnn_resnet50_fpn_v2", "resnet50")):
    DETECTORS.register(_name, torchvision_name=_name, backbone=_backbone)(_torchvision_builder(_name))


def _resnet_student(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int = 91, weights=None, weights_backbone=None, **kwargs: Any) -> nn.Module:
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        trained = weights_backbone is not None
        backbone = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=weights_backbone,
                                       norm_layer=FrozenBatchNorm2d if trained else nn.BatchNorm2d,
                                       trainable_layers=3 if trained else 5)
        return FasterRCNN(backbone, num_classes=num_classes, **kwargs)

    build.__doc__ = f"ResNet-{depth}-FPN Faster R-CNN (resnet_fpn_backbone, 5 levels, torchvision's heads)."
    return build


for _depth in (18, 34, 101):  # ResNet-50: torchvision's fasterrcnn_resnet50_fpn with weights_backbone
    DETECTORS.register(f"fasterrcnn_resnet{_depth}_fpn", backbone=f"resnet{_depth}")(_resnet_student(_depth))


@DETECTORS.register("fasterrcnn_mobilenet_v2_fpn", backbone="mobilenet_v2")
def fasterrcnn_mobilenet_v2_fpn(num_classes: int = 91, weights=None, weights_backbone=None, **kwargs: Any) -> nn.Module:
    """MobileNetV2-FPN Faster R-CNN with p2-p6 (``returned_layers=[1, 2, 3, 4]``, the DKD MV2 student;
    torchvision's mobile FPN default uses only the last two stages)."""
    from torchvision.models.detection.backbone_utils import mobilenet_backbone

    trained = weights_backbone is not None
    backbone = mobilenet_backbone(backbone_name="mobilenet_v2", weights=weights_backbone, fpn=True,
                                  norm_layer=FrozenBatchNorm2d if trained else nn.BatchNorm2d,
                                  trainable_layers=3 if trained else 6, returned_layers=[1, 2, 3, 4])
    return FasterRCNN(backbone, num_classes=num_classes, **kwargs)


def list_detectors(pattern: Optional[str] = None) -> List[str]:
    """Sorted registered detector names, optionally filtered by a shell pattern."""
    return DETECTORS.names(pattern)


def _enum(model_name: Optional[str], source: str, key: str, name: str):
    """The torchvision weights enum named by ``torchvision:<ENUM>`` for ``model_name``."""
    from torchvision.models import get_model_weights

    if model_name is None:
        raise WeightsError(f"{key} {source!r}: torchvision has no such weights for detector {name!r}")
    choices = get_model_weights(model_name)
    enum = source[len(TORCHVISION):].split(".")[-1]
    if enum not in choices.__members__:
        raise WeightsError(f"{key} {source!r}: torchvision has no weights {enum!r} for {model_name} (choose from "
                           f"{', '.join(choices.__members__)})")
    return choices[enum]


def create_detector(name: str, num_classes: int = 91, weights: Optional[str] = None,
                    weights_backbone: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """Build the registered detector ``name`` for ``num_classes`` classes (background included).

    ``weights``: None, ``torchvision:<ENUM>`` (e.g. ``torchvision:COCO_V1``, needs 91 classes) or a
    file. ``weights_backbone``: None or ``torchvision:<ENUM>`` of the backbone's ImageNet weights
    (e.g. ``torchvision:IMAGENET1K_V1``). Downloads go to torch's hub cache; offline, the error
    says which file to put where. ``kwargs`` reach the builder (``min_size``, ``max_size``, ...).
    """
    builder, info = DETECTORS.get(name), DETECTORS.info(name)
    file = None
    if weights is not None and not weights.startswith(TORCHVISION):
        file, weights = Path(weights), None
        if not file.is_file():
            raise MissingFileError(f"detector weights file {str(file)!r} does not exist")
    if weights is not None:
        weights = _enum(info.get("torchvision_name"), weights, "weights", name)
        if num_classes != len(weights.meta["categories"]):
            raise WeightsError(f"weights {weights} predict {len(weights.meta['categories'])} classes, not "
                               f"{num_classes}: use the COCO class layout (ids as labels, 91 classes)")
    if weights_backbone is not None:
        if not weights_backbone.startswith(TORCHVISION):
            raise WeightsError(f"weights_backbone {weights_backbone!r} must be torchvision:<ENUM> "
                               "(e.g. torchvision:IMAGENET1K_V1)")
        weights_backbone = _enum(info.get("backbone"), weights_backbone, "weights_backbone", name)
    extra = {} if weights is None and weights_backbone is None else dict(weights=weights,
                                                                          weights_backbone=weights_backbone)
    try:
        model = builder(num_classes=num_classes, **extra, **kwargs)
    except OSError as err:  # urllib's URLError is an OSError
        missing = weights or weights_backbone
        target = Path(torch.hub.get_dir()) / "checkpoints" / Path(missing.url).name
        raise MissingFileError(f"could not download {missing} from {missing.url} ({err}): put that file at "
                               f"{target}") from None
    if file is not None:
        from deepkd.models import load_weights

        load_weights(model, file, name=f"detector weights {str(file)!r}")
    model.detector_name = name
    return model
