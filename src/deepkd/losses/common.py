"""Helpers shared by the method modules: argument checks, logit standardisation, the cross-entropy with
the top-k mask, the decoupled terms.

Logit standardisation (Sun et al., Logit Standardization in Knowledge Distillation, CVPR 2024) is the
``logit_stand`` option of every logit method: its distillation terms see the student's and the
teacher's logits z-scored per sample (:func:`~deepkd.losses.functional.standardize`), its
cross-entropy the raw student logits. The temperature then acts in the standardised space (the
paper's "base temperature"): the reference's CIFAR-100 and ImageNet command lines (``--logit-stand
--base-temp 2 --kd-weight 9``) set the temperature to 2 and the distillation weight to 9 (KD and
MLKD: ``kd_weight`` 9; DKD: alpha and beta multiplied by 9); each method's docstring says what its
recipe must set. The defaults are unchanged (``logit_stand=False``).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from deepkd.losses import functional as F
from deepkd.losses.base import LossTerm


def check_positive(name: str, value: float) -> None:
    """Raise unless ``value > 0``."""
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def check_non_negative(name: str, value: float) -> None:
    """Raise unless ``value >= 0``."""
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def distillation_logits(method, student_logits: torch.Tensor,
                        teacher_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``(student, teacher)`` logits a method's distillation terms see: z-scored per sample when
    ``method.logit_stand`` (the teacher's without gradient), else the very tensors given."""
    if not method.logit_stand:
        return student_logits, teacher_logits
    return F.standardize(student_logits), F.standardize(teacher_logits.detach())


def cross_entropy_and_mask(method, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           target: torch.Tensor, epoch: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """What the DKD-style methods (``dkd``, ``dtkd_dkd``, ``deepkd_kd``) compute first: the task
    cross-entropy and their dynamic top-k keep mask (``method.dtm``; None: plain NCKD). With logit
    standardisation they pass the raw student logits (the CE's) and the standardised teacher's (the
    mask ranks what NCKD distils)."""
    ce = F.cross_entropy(student_logits, target, ignore_index=method.ignore_index, validate=False)
    return ce, method.dtm.keep(teacher_logits, target, epoch, method.ignore_index)


def decoupled_terms(ce: torch.Tensor, tckd: torch.Tensor, nckd: torch.Tensor, *, ce_weight: float,
                    tckd_weight: float, nckd_weight: float) -> Dict[str, LossTerm]:
    """``{"ce": task, "tckd": target, "nckd": non_target}`` terms of a decoupled method."""
    return {"ce": LossTerm(ce_weight * ce, "task"), "tckd": LossTerm(tckd_weight * tckd, "target"),
            "nckd": LossTerm(nckd_weight * nckd, "non_target")}
