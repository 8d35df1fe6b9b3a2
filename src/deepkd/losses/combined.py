"""A method that is the sum of several: ``method.name: dkd+reviewkd`` (DKD's best COCO row),
``deepkd_dkd+fitnet``, ``kd+at``, ...

Each part keeps its own arguments (the recipe's ``method.<part>`` section) and its terms keep their
streams, so under DeepKD's decoupled optimizer a feature part's term rides the ``target`` stream
(every feature method puts its term there, as KD's undecomposed term) while DKD's TCKD and NCKD keep
theirs. The task term is counted once: the first part's ``ce`` is kept and every later part's ``ce``
is dropped (each part alone would add its own cross-entropy); a later term whose name is already
taken is renamed ``<part>.<term>``. When any part reads features, every part gets the models'
:class:`~deepkd.features.Features` and a logit part takes their ``logits``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from deepkd.errors import ConfigError
from deepkd.losses.base import LossTerm, Method


class Combined(Method):
    """The sum of ``parts`` (``{name: Method}``, in the recipe's order); see the module docstring."""

    def __init__(self, parts: Dict[str, Method]):
        super().__init__()
        views = {part.views for part in parts.values()}
        if len(views) > 1 or (views == {2} and any(part.features for part in parts.values())):
            raise ValueError(f"methods {' + '.join(parts)} cannot be combined: a two-view method (mlkd, crld) "
                             "takes two augmented views per image, which the others do not")
        self.parts = nn.ModuleDict(parts)
        self.views = views.pop()
        self.features = any(part.features for part in parts.values())
        self.needs_teacher = any(part.needs_teacher for part in parts.values())
        self.needs_index = any(part.needs_index for part in parts.values())
        modes = {name: part.teacher_mode for name, part in parts.items() if part.needs_teacher}
        training = [name for name, mode in modes.items() if mode == "train"]
        if training and len(training) < len(modes):  # one teacher forward serves every part
            raise ConfigError(f"methods {' + '.join(parts)} share one teacher forward, but {', '.join(training)} "
                              "runs it in training mode and the others in eval mode: set "
                              f"method.{training[0]}.teacher_mode: eval")
        self.teacher_mode = "train" if training else "eval"

    def forward(self, student, teacher, target: torch.Tensor, *, epoch: int,
                index: Optional[torch.Tensor] = None) -> Dict[str, LossTerm]:
        out: Dict[str, LossTerm] = {}
        for name, part in self.parts.items():
            inputs = (student, teacher) if part.features or not self.features else (
                student.logits, teacher.logits if teacher is not None else None)
            extra = {"index": index} if part.needs_index else {}
            for key, term in part(*inputs, target, epoch=epoch, **extra).items():
                if key == "ce" and "ce" in out:
                    continue  # the task term once: the first part's
                out[f"{name}.{key}" if key in out else key] = term
        return out

    def topk(self, epoch: int) -> Optional[int]:
        """The first part's dynamic top-k K that is not None."""
        return next((k for k in (part.topk(epoch) for part in self.parts.values()) if k is not None), None)
