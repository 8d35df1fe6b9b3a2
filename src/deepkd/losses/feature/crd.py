"""``crd``: Contrastive Representation Distillation (Tian et al., ICLR 2020), equal to mdistiller's ``CRD``.

The pooled features of the student and the teacher are embedded (``linear`` then L2 norm) into
``feat_dim``: ``v_s``, ``v_t``. Two memory banks ``[N, feat_dim]`` hold one embedding per training sample
(``memory_s``: the student's, ``memory_t``: the teacher's). For each sample ``i`` of the batch,
``K + 1`` bank rows ``j_0 .. j_K`` are read (``j_0``: the positive, ``j_1..K``: the negatives) and

    P_s[i, k] = exp(memory_t[j_k] . v_s[i] / T) / Z_s,     P_t[i, k] = exp(memory_s[j_k] . v_t[i] / T) / Z_t,
    L(P) = -1/B sum_i [ log(P[i, 0] / (P[i, 0] + K/N + eps)) + sum_{k>=1} log((K/N) / (P[i, k] + K/N + eps)) ],

``crd = feat_weight (L(P_s) + L(P_t))`` with ``eps = 1e-7``. ``Z_s``, ``Z_t`` are set once, from the first
batch: ``N`` times the mean of its unnormalised ``exp`` scores (a buffer, so a resumed run keeps them).
After the loss, without gradient, each bank's rows of the batch's samples become
``normalize(momentum * memory[index] + (1 - momentum) * v)``.

Sampling (mdistiller's ``CIFAR100InstanceSample``, done here by the method with torch's global RNG on the
loss's device, so the seed fixes it and a resume repeats it): the negatives are ``K`` distinct samples
of other classes than the sample's own; the positive is the sample itself (``mode: exact``) or a sample
of its class drawn uniformly (``mode: relax``). The bank rows written are always the sample's own.
mdistiller draws the negatives with replacement when ``K`` exceeds a class's negatives; deepkd refuses
such a ``K`` instead.

NOTE(paper): the paper writes one critic ``h(T, S) = e^{t.s/T} / (e^{t.s/T} + K/N)``; mdistiller (as the
authors' code) divides ``e^{t.s/T}`` by a constant ``Z`` fixed from the first batch, contrasts in both
directions (two banks, two terms) and draws the negatives from other classes only.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deepkd.errors import ConfigError
from deepkd.features import FeatureInfo, Features
from deepkd.losses.base import LossTerm, Method
from deepkd.losses.registry import register_method

EPS = 1e-7  # mdistiller's ContrastLoss
MODES = ("exact", "relax")


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Each row divided by its Euclidean norm (no epsilon, as mdistiller's ``Normalize``)."""
    return x / x.pow(2).sum(1, keepdim=True).pow(0.5)  # pow, not sqrt: the same gradient rounding


class Embed(nn.Module):
    """CRD's embedding head: flatten, ``linear`` (``dim_in -> dim_out``), L2 norm."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1).to(self.linear.weight.dtype)  # a mixed-precision pooled feature
        return l2_normalize(self.linear(x))


def nce_loss(scores: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``L(P)`` of the module docstring for normalised scores ``P`` ``[B, K + 1]`` (column 0: the positive);
    the noise distribution is uniform over the ``N = num_samples`` training samples."""
    noise = (scores.shape[1] - 1) / float(num_samples)  # K * Pn
    positive, negative = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(positive / (positive + (noise + EPS)))
    # a tensor numerator: Python's ``scalar / tensor`` is ``reciprocal * scalar``, one ulp off mdistiller's
    log_d0 = torch.log(torch.full_like(negative, noise) / (negative + (noise + EPS)))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def _check(student_info: FeatureInfo, teacher_info: Optional[FeatureInfo], mode: str, num_samples: int,
           train_labels: torch.Tensor) -> None:
    if mode not in MODES:
        raise ConfigError(f"crd mode {mode!r} is not one of {', '.join(MODES)}")
    if student_info.pooled is None or teacher_info is None or teacher_info.pooled is None:
        raise ConfigError("crd needs the pooled features (the classifier's input) of both the student and the "
                          "teacher, and one of the two models does not expose them")
    if train_labels.dim() != 1 or len(train_labels) != num_samples or num_samples == 0:
        raise ConfigError(f"crd needs one label per training sample: {num_samples} samples but labels of shape "
                          f"{tuple(train_labels.shape)}")
    if train_labels.min() < 0:
        raise ConfigError("crd needs class labels 0, 1, ...: the training labels hold a negative value")


@register_method("crd", paper="Tian et al., Contrastive Representation Distillation, ICLR 2020")
class CRD(Method):
    """``ce_weight CE + feat_weight (L(P_s) + L(P_t))`` (module docstring); terms ``ce`` (task) and ``crd``
    (target: a feature term has no target/non-target split, so it rides the stream of KD's undecomposed
    term). Embedding input sizes: the student's and teacher's pooled features. Defaults: mdistiller's
    CIFAR-100 (mode exact, feat_dim 128, nce_k 16384, momentum 0.5, temperature 0.07, weights 1 and 0.8)."""

    features = True
    needs_index = True

    def __init__(self, *, student_info: FeatureInfo, teacher_info: FeatureInfo, num_samples: int,
                 train_labels: torch.Tensor, mode: str = "exact", feat_dim: int = 128, nce_k: int = 16384,
                 nce_momentum: float = 0.5, nce_temperature: float = 0.07, ce_weight: float = 1.0,
                 feat_weight: float = 0.8):
        super().__init__()
        _check(student_info, teacher_info, mode, num_samples, train_labels)
        if feat_dim < 1 or nce_k < 1 or nce_temperature <= 0 or not 0.0 <= nce_momentum <= 1.0:
            raise ConfigError(f"crd needs feat_dim >= 1, nce_k >= 1, nce_temperature > 0 and 0 <= nce_momentum <= 1, "
                              f"got {feat_dim}, {nce_k}, {nce_temperature}, {nce_momentum}")
        self.mode, self.num_samples, self.k = mode, int(num_samples), int(nce_k)
        self.temperature, self.momentum = float(nce_temperature), float(nce_momentum)
        self.ce_weight, self.feat_weight = ce_weight, feat_weight
        self._index_classes(train_labels.detach().to("cpu", torch.int64))
        # mdistiller's order of random draws at build: the two embeddings, then the student's bank, the teacher's
        self.embed_s = Embed(student_info.pooled, feat_dim)
        self.embed_t = Embed(teacher_info.pooled, feat_dim)
        bound = 1.0 / math.sqrt(feat_dim / 3)  # uniform in [-bound, bound): unit norm in expectation
        self.register_buffer("memory_s", torch.rand(num_samples, feat_dim).mul_(2 * bound).add_(-bound))
        self.register_buffer("memory_t", torch.rand(num_samples, feat_dim).mul_(2 * bound).add_(-bound))
        self.register_buffer("z", torch.full((2,), -1.0))  # Z_s, Z_t; negative: not set yet

    def _index_classes(self, labels: torch.Tensor) -> None:
        """The training set sorted by class (``order``; class ``c`` at ``order[start[c]:start[c] + count[c]]``):
        per-class index tensors in one piece, moved with the method, rebuilt from the labels (not checkpointed)."""
        count = torch.bincount(labels)
        present = count[count > 0]
        eligible = self.num_samples - int(present.max())
        if self.k > eligible:
            raise ConfigError(f"crd nce_k={self.k} exceeds the {eligible} samples outside the largest class, "
                              f"the negatives a sample of that class can draw: lower method.nce_k")
        self.width = self.num_samples - int(present.min())  # the most negatives any sample has
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("class_count", count, persistent=False)
        self.register_buffer("class_start", torch.cumsum(count, 0) - count, persistent=False)

    def sample_contrast(self, index: torch.Tensor) -> torch.Tensor:
        """The bank rows ``[B, K + 1]`` that samples ``index`` ``[B]`` are contrasted with: column 0 the positive,
        then ``K`` distinct negatives drawn uniformly from the other classes (torch's global RNG on the
        method's device)."""
        index = index.to(self.order.device)
        labels = self.labels[index]
        count, start = self.class_count[labels][:, None], self.class_start[labels][:, None]
        # a uniform K-subset of positions 0 .. N - count - 1 in the class-sorted order, own class skipped
        keys = torch.rand(len(index), self.width, dtype=torch.float64, device=index.device)
        position = torch.arange(self.width, device=index.device)
        keys.masked_fill_(position >= self.num_samples - count, 2.0)  # beyond this sample's negatives: last
        chosen = keys.topk(self.k, dim=1, largest=False).indices  # the K smallest keys, in order (= argsort[:K])
        negatives = self.order[chosen + count * (chosen >= start)]
        if self.mode == "exact":
            positive = index
        else:  # relax: a sample of the same class, uniformly (possibly itself)
            draw = torch.rand(len(index), dtype=torch.float64, device=index.device)
            offset = torch.minimum((draw * count[:, 0]).long(), count[:, 0] - 1)
            positive = self.order[start[:, 0] + offset]
        return torch.cat([positive[:, None], negatives], dim=1)

    def contrast_loss(self, pooled_s: torch.Tensor, pooled_t: torch.Tensor, index: torch.Tensor,
                      contrast_index: torch.Tensor) -> torch.Tensor:
        """``L(P_s) + L(P_t)`` for samples ``index`` contrasted with bank rows ``contrast_index`` ``[B, K + 1]``
        (unweighted); sets Z on the first call, then updates both banks' rows ``index``."""
        v_s, v_t = self.embed_s(pooled_s), self.embed_t(pooled_t.detach())
        index, contrast_index = index.to(self.memory_s.device), contrast_index.to(self.memory_s.device)
        # exp(memory . v / T): the student's embedding against the teacher's bank, and the other way round
        out_s = torch.exp(self._scores(self.memory_t, contrast_index, v_s) / self.temperature)
        out_t = torch.exp(self._scores(self.memory_s, contrast_index, v_t) / self.temperature)
        with torch.no_grad():
            estimate = torch.stack([out_s.mean(), out_t.mean()]).to(self.z.dtype) * self.num_samples
            self.z.copy_(torch.where(self.z < 0, estimate, self.z))  # set once, from the first batch
        loss = nce_loss(out_s / self.z[0], self.num_samples) + nce_loss(out_t / self.z[1], self.num_samples)
        self._update_memory(v_s, v_t, index)
        return loss

    @staticmethod
    def _scores(memory: torch.Tensor, contrast_index: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``memory[contrast_index[i, k]] . v[i]``, ``[B, K + 1]`` (the bank rows are a copy: no gradient)."""
        rows = memory.index_select(0, contrast_index.reshape(-1)).view(*contrast_index.shape, -1)
        return torch.bmm(rows.to(v.dtype), v.unsqueeze(2)).squeeze(2)

    @torch.no_grad()
    def _update_memory(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor) -> None:
        """Rows ``index`` of each bank move towards the batch's embeddings, then back onto the unit sphere."""
        for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            row = memory.index_select(0, index).mul_(self.momentum)
            row.add_(v.to(memory.dtype) * (1 - self.momentum))
            memory.index_copy_(0, index, l2_normalize(row))

    def forward(self, student: Features, teacher: Optional[Features], target: torch.Tensor, *, epoch: int,
                index: torch.Tensor) -> Dict[str, LossTerm]:
        ce = F.cross_entropy(student.logits, target)
        crd = self.contrast_loss(student.pooled, teacher.pooled, index, self.sample_contrast(index))
        return {"ce": LossTerm(self.ce_weight * ce, "task"), "crd": LossTerm(self.feat_weight * crd, "target")}
