"""SGD with one momentum buffer per gradient stream (DeepKD, METHODS.md 4.1).

For every stream k with coefficient m_k (dampening 0, no Nesterov)::

    v_k = g_k                    on the stream's first step
    v_k = m_k * v_k + g_k        afterwards
    theta = theta - lr * sum_k v_k

Weight decay ``wd * theta`` is added to the gradient of exactly one stream
(``weight_decay_stream``, ``"target"`` in the reference code) before its buffer update.

Streams whose coefficients are equal share one buffer (``merge_equal=True``): by linearity
``m*v_a + g_a + m*v_b + g_b = m*(v_a + v_b) + (g_a + g_b)`` and only the sum of the buffers enters
the update, so one gradient of the summed loss replaces two. A merged group is keyed by its stream
names joined with ``+`` in the order given (``"task+target"``); :meth:`merged_streams` lists them.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.optim import Optimizer

Grads = Mapping[str, Sequence[Optional[torch.Tensor]]]
DEFAULT_STREAM = "default"
DEEPKD_MOMENTUM = {"task": 0.825, "target": 0.825, "non_target": 0.95}  # RECIPES.md: resnet32x4 -> resnet8x4


def _merge(momentum: Mapping[str, float], merge_equal: bool) -> Dict[str, Tuple[str, ...]]:
    """Group stream names by coefficient: ``{"task+target": ("task", "target"), ...}``."""
    groups: Dict[float, List[str]] = {}
    for name, coefficient in momentum.items():
        key = float(coefficient) if merge_equal else name
        groups.setdefault(key, []).append(name)
    return {"+".join(names): tuple(names) for names in groups.values()}


class DecoupledMomentumSGD(Optimizer):
    """Momentum SGD over named gradient streams; :meth:`step` takes ``{stream: [grad per param]}``.

    Args:
        params: parameters or param groups (per-group ``lr`` and ``weight_decay`` allowed; a
            ``weight_decay=0`` group is the usual no-decay group).
        lr: learning rate.
        momentum: ``{stream: coefficient}`` (default DeepKD's ``task .825, target .825,
            non_target .95``); a float means one stream called ``"default"``, which then also
            carries the weight decay (``weight_decay_stream`` is ignored): plain momentum SGD.
        weight_decay: L2 coefficient added to ``weight_decay_stream``'s gradient.
        weight_decay_stream: the stream that carries weight decay (must be a key of ``momentum``).
        merge_equal: share one buffer between streams of equal coefficient (exact).
    """

    def __init__(self, params: Iterable, lr: float,
                 momentum: Union[float, Mapping[str, float]] = DEEPKD_MOMENTUM,
                 weight_decay: float = 5e-4, weight_decay_stream: str = "target",
                 merge_equal: bool = True):
        if isinstance(momentum, (int, float)):
            # One stream: it carries the decay, so a float gives plain SGD whatever the stream name.
            momentum, weight_decay_stream = {DEFAULT_STREAM: float(momentum)}, DEFAULT_STREAM
        momentum = dict(momentum)
        if not momentum:
            raise ValueError("momentum needs at least one stream: {stream name: coefficient}")
        for name, value in momentum.items():
            if not 0.0 <= value < 1.0:
                raise ValueError(f"momentum of stream {name!r} must lie in [0, 1), got {value}")
        stream = weight_decay_stream
        if stream not in momentum:
            raise ValueError(f"weight_decay_stream {stream!r} is not one of the streams {sorted(momentum)}")
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"lr must be positive and weight_decay non-negative (got {lr}, {weight_decay})")
        defaults = dict(lr=lr, weight_decay=weight_decay, stream_momentum=momentum,
                        weight_decay_stream=stream, merge_equal=merge_equal)
        super().__init__(params, defaults)

    # -- the stream layout ------------------------------------------------------------------
    @property
    def stream_momentum(self) -> Dict[str, float]:
        return dict(self.param_groups[0]["stream_momentum"])

    def merged_streams(self) -> Dict[str, Tuple[str, ...]]:
        """Buffer keys and the streams each one holds, e.g. ``{"task+target": ("task", "target")}``."""
        group = self.param_groups[0]
        return _merge(group["stream_momentum"], group["merge_equal"])

    def merge_losses(self, losses: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Sum the losses of streams that share a buffer: one gradient computation per buffer."""
        unknown = set(losses) - set(self.stream_momentum)
        if unknown:
            raise KeyError(f"loss streams {sorted(unknown)} have no momentum coefficient "
                           f"(optimizer streams: {sorted(self.stream_momentum)})")
        merged = {}
        for key, streams in self.merged_streams().items():
            present = [losses[s] for s in streams if s in losses]
            if present:
                merged[key] = present[0] if len(present) == 1 else torch.stack(present).sum()
        return merged

    def set_momentum(self, momentum: Mapping[str, float]) -> None:
        """Change coefficients mid-run (same stream names).

        When a change splits a merged buffer, the whole shared buffer goes to its first stream and
        the others restart from zero: the sum of buffers (what enters the update) is unchanged at
        that moment, but the split of past momentum between the streams is not recoverable. Build
        with ``merge_equal=False`` when you plan such changes and need exact per-stream history.
        """
        if set(momentum) != set(self.stream_momentum):
            raise ValueError(f"set_momentum needs exactly the streams {sorted(self.stream_momentum)}")
        old = self.merged_streams()
        for group in self.param_groups:
            group["stream_momentum"] = {k: float(momentum[k]) for k in group["stream_momentum"]}
        new = self.merged_streams()
        owner = {stream: key for key, streams in new.items() for stream in streams}
        for state in self.state.values():
            moved: Dict[str, torch.Tensor] = {}
            for key, streams in old.items():
                buffer = state.pop(f"momentum_buffer:{key}", None)
                if buffer is not None:
                    target = owner[streams[0]]
                    moved[target] = moved[target] + buffer if target in moved else buffer
            state.update({f"momentum_buffer:{k}": v for k, v in moved.items()})

    # -- the update -------------------------------------------------------------------------
    def _buffer_grads(self, grads: Grads, count: int) -> Dict[str, List[Optional[torch.Tensor]]]:
        """Gradients per buffer key; per-stream entries of a merged group are summed exactly."""
        layout = self.merged_streams()
        known = set(layout) | {s for streams in layout.values() for s in streams}
        unknown = set(grads) - known
        if unknown:
            raise KeyError(f"gradient streams {sorted(unknown)} are not optimizer streams or buffer keys "
                           f"{sorted(known)}")
        out: Dict[str, List[Optional[torch.Tensor]]] = {}
        for key, streams in layout.items():
            parts = [grads[key]] if key in grads else [grads[s] for s in streams if s in grads]
            for part in parts:
                if len(part) != count:
                    raise ValueError(f"got {len(part)} gradients for stream {key!r}; the optimizer has "
                                     f"{count} parameters (param_groups order)")
            out[key] = [_sum_present([part[i] for part in parts]) for i in range(count)]
        return out

    @torch.no_grad()
    def step(self, grads: Grads, closure=None):  # noqa: D401 - torch signature
        """Apply one update from ``grads`` (``{stream or buffer key: [grad or None per param]}``).

        Lists follow the parameters in ``param_groups`` order. A parameter with no gradient in any
        stream is skipped (as ``torch.optim.SGD`` skips ``grad=None``). A stream without a gradient
        for a parameter that has others leaves its buffer as is, except that the weight-decay stream
        still receives ``wd * theta``.
        """
        if closure is not None:
            raise ValueError("DecoupledMomentumSGD.step takes per-stream gradients, not a closure")
        params = [p for group in self.param_groups for p in group["params"]]
        per_key = self._buffer_grads(grads, len(params))
        index = 0
        for group in self.param_groups:
            count = len(group["params"])
            self._update_group(group, {k: v[index:index + count] for k, v in per_key.items()})
            index += count

    def _update_group(self, group: dict, grads: Dict[str, List[Optional[torch.Tensor]]]) -> None:
        layout = _merge(group["stream_momentum"], group["merge_equal"])
        dense = all(g is not None for key in layout for g in grads[key])
        warm = all(f"momentum_buffer:{key}" in self.state[p] for key in layout for p in group["params"])
        if dense and warm and group["params"]:
            self._update_foreach(group, layout, grads)
            return
        for i, param in enumerate(group["params"]):
            self._update_one(group, layout, param, {key: grads[key][i] for key in layout})

    def _update_one(self, group: dict, layout, param: torch.Tensor, grads: Dict[str, Optional[torch.Tensor]]) -> None:
        """Per-parameter update (first steps, missing gradients): the equations literally."""
        if all(g is None for g in grads.values()):
            return
        momentum, decay, state, total = group["stream_momentum"], group["weight_decay"], self.state[param], None
        for key, streams in layout.items():
            grad = grads[key]
            if decay != 0 and group["weight_decay_stream"] in streams:
                grad = param * decay if grad is None else grad.add(param, alpha=decay)
            name = f"momentum_buffer:{key}"
            buffer = state.get(name)
            if grad is not None:
                if buffer is None:
                    buffer = state[name] = torch.clone(grad).detach()
                else:
                    buffer.mul_(momentum[streams[0]]).add_(grad)
            if buffer is not None:
                total = buffer if total is None else total + buffer
        if total is not None:
            param.add_(total, alpha=-group["lr"])

    def _update_foreach(self, group: dict, layout, grads: Dict[str, List[torch.Tensor]]) -> None:
        """The same arithmetic as :meth:`_update_one`, one fused multi-tensor op per stage (fewer
        kernel launches on a GPU; identical results element by element)."""
        params, total = group["params"], None
        for key, streams in layout.items():
            stream_grads = grads[key]
            if group["weight_decay"] != 0 and group["weight_decay_stream"] in streams:
                stream_grads = torch._foreach_add(stream_grads, params, alpha=group["weight_decay"])
            buffers = [self.state[p][f"momentum_buffer:{key}"] for p in params]
            torch._foreach_mul_(buffers, group["stream_momentum"][streams[0]])
            torch._foreach_add_(buffers, stream_grads)
            total = buffers if total is None else torch._foreach_add(total, buffers)
        torch._foreach_add_(params, total, alpha=-group["lr"])


def _sum_present(parts: List[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    present = [p for p in parts if p is not None]
    if not present:
        return None
    total = present[0]
    for part in present[1:]:
        total = total + part
    return total
