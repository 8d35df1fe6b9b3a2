"""``fitnet``: FitNets (Romero et al., ICLR 2015): a regressor maps one student stage onto the
teacher's same stage; the loss is their mean squared error (mdistiller's ``FitNet``)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from deepkd.features import FeatureInfo, Features
from deepkd.losses.base import LossTerm, Method
from deepkd.losses.feature.connectors import conv_regressor, stage_shape
from deepkd.losses.registry import register_method


@register_method("fitnet", paper="Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015")
class FitNet(Method):
    """``ce_weight CE + feat_weight MSE(regressor(f_s[hint_layer]), f_t[hint_layer])``; terms ``ce``
    (task) and ``fitnet`` (target: a feature term has no target/non-target split, so it rides the
    stream of KD's undecomposed term). Stage 0 is the stem. Defaults: mdistiller's CIFAR-100 (hint
    layer 2, weights 1 and 100)."""

    features = True

    def __init__(self, *, student_info: FeatureInfo, teacher_info: FeatureInfo, hint_layer: int = 2,
                 ce_weight: float = 1.0, feat_weight: float = 100.0):
        super().__init__()
        self.hint_layer, self.ce_weight, self.feat_weight = hint_layer, ce_weight, feat_weight
        self.regressor = conv_regressor(stage_shape(student_info, hint_layer), stage_shape(teacher_info, hint_layer))

    def forward(self, student: Features, teacher: Optional[Features], target: torch.Tensor, *,
                epoch: int) -> Dict[str, LossTerm]:
        ce = F.cross_entropy(student.logits, target)
        hint = self.regressor(student.stages[self.hint_layer])
        return {"ce": LossTerm(self.ce_weight * ce, "task"),
                "fitnet": LossTerm(self.feat_weight * F.mse_loss(hint, teacher.stages[self.hint_layer]), "target")}
