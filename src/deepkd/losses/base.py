"""What every distillation method returns: named loss terms, each tagged with a gradient stream.

A method is a thin ``nn.Module`` around the pure functions of ``deepkd.losses.functional``. Its
``forward(student_logits, teacher_logits, target, *, epoch)`` returns ``{name: LossTerm}``. A plain
optimizer trains on the sum of the values; ``DecoupledMomentumSGD`` groups them by ``stream``
(``task``, ``target``, ``non_target``) and keeps one momentum buffer per stream.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
from torch import nn

from deepkd.losses.topk import DynamicTopK

STREAMS = ("task", "target", "non_target")
TEACHER_MODES = ("eval", "train")  # Method.teacher_mode
# keyword arguments a feature method's builder may declare; the trainer fills them, a recipe may not
PROVIDED = ("student_info", "teacher_info", "num_samples", "train_labels", "student_model", "teacher_model")


class LossTerm(NamedTuple):
    """One scalar loss term and the gradient stream it feeds."""

    value: torch.Tensor
    stream: str


def warmup_factor(epoch: int, warmup_epochs: float) -> float:
    """Reference distillation warm-up ``min(epoch / warmup_epochs, 1)``; epochs count from 1."""
    if warmup_epochs <= 0:
        return 1.0
    return min(float(epoch) / float(warmup_epochs), 1.0)


def total_loss(terms: Dict[str, LossTerm]) -> torch.Tensor:
    """Sum of all terms' values (what a plain optimizer backpropagates)."""
    values = [t.value for t in terms.values()]
    return torch.stack(values).sum() if len(values) > 1 else values[0]


def stream_losses(terms: Dict[str, LossTerm]) -> Dict[str, torch.Tensor]:
    """Sum the terms of each stream: ``{stream: scalar}`` in first-seen order."""
    out: Dict[str, torch.Tensor] = {}
    for term in terms.values():
        out[term.stream] = out[term.stream] + term.value if term.stream in out else term.value
    return out


class Method(nn.Module):
    """Base of every distillation method module (inheritance depth 1).

    Subclasses set ``needs_teacher`` and implement ``forward``; ``teacher_logits`` is ``None`` when
    ``needs_teacher`` is False. A method that offers DeepKD's dynamic top-k mask calls
    :meth:`init_topk` in its ``__init__``. A method with ``views = 2`` (MLKD, CRLD) takes logits
    with a leading view axis, ``[2, B, C]`` (0: the weak view, 1: the strong view), and
    ``target [B]``; the trainer then gives every training image two augmented views.

    A feature method (``features = True``: FitNet, AT, CRD, ...) takes
    :class:`~deepkd.models.features.Features` of the student and the teacher in place of their logits,
    and may own trainable modules (connectors, embeddings): the trainer optimizes them with the
    student and checkpoints them, and never exports them. Its builder may declare the keyword
    arguments of :data:`PROVIDED`: the trainer passes the student's and teacher's
    :class:`~deepkd.features.FeatureInfo`, the training set's size and labels (``[N]``, by index)
    and the two models themselves
    (to read a value at build time, such as OFD's teacher BatchNorm margins: a method must not keep
    them as submodules, or they would be trained and checkpointed with it). With ``needs_index``
    it also gets ``index=`` (each sample's position in the training set; CRD's memory bank).

    ``teacher_mode`` (one of :data:`TEACHER_MODES`) is the mode the teacher runs in for the training
    forward: ``"eval"`` (running BatchNorm statistics), or ``"train"`` (batch statistics, the running
    ones drifting as in training: mdistiller's OFD); the teacher never gets a gradient, and is in eval
    mode everywhere else (its test accuracy, the teacher-logit cache).
    """

    needs_teacher: bool = True
    views: int = 1
    features: bool = False
    needs_index: bool = False
    teacher_mode: str = "eval"

    def forward(  # pragma: no cover - abstract
        self,
        student_logits: torch.Tensor,
        teacher_logits: Optional[torch.Tensor],
        target: torch.Tensor,
        *,
        epoch: int,
    ) -> Dict[str, LossTerm]:
        raise NotImplementedError

    def init_topk(self, *, topk: bool, topk_start_fraction: float, topk_ramp_start: Optional[int],
                  topk_ramp_end: Optional[int], topk_count_target: bool, warmup_epochs: float) -> None:
        """Set ``self.dtm``, the dynamic top-k mask (:class:`~deepkd.losses.topk.DynamicTopK`) of a
        method that offers one, from that method's ``topk*`` and ``warmup_epochs`` arguments; with
        ``topk=False`` the mask is off (its ``keep`` returns None: plain NCKD)."""
        self.dtm = DynamicTopK(enabled=topk, start_fraction=topk_start_fraction, ramp_start=topk_ramp_start,
                               ramp_end=topk_ramp_end, count_target=topk_count_target, warmup_epochs=warmup_epochs)

    def topk(self, epoch: int) -> Optional[int]:
        """The dynamic top-k mask's K at ``epoch``: None when the method has no mask (it never called
        :meth:`init_topk`, so has no ``dtm``), the mask is off, or no batch was seen yet."""
        dtm = getattr(self, "dtm", None)
        return None if dtm is None else dtm.k(epoch)
