"""Per-stream gradients in one call, and the gradient signal-to-noise ratio (GSNR) of each stream."""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

StreamGrads = Dict[str, List[Optional[torch.Tensor]]]
# First parameter of each parameter list whose graph failed the batched product (weak: a deleted
# model drops its entry).
_BATCHED_FAILED = WeakTensorKeyDictionary()


def stream_grads(losses: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor], *,
                 retain_graph: bool = False, batched: Union[bool, str] = "auto") -> StreamGrads:
    """Gradients of each named scalar loss w.r.t. ``params``: ``{name: [grad or None per param]}``.

    ``batched=True`` computes all of them with one vector-Jacobian product over a batch of one-hot
    cotangents (``torch.autograd.grad(..., is_grads_batched=True)``, vmap over the backward graph);
    when an operation of the graph has no batching rule it falls back to separate passes and
    remembers the failure for these parameters (later calls go straight to separate passes).
    ``batched=False`` always uses separate ``torch.autograd.grad`` passes sharing one forward graph
    (the exact reference). ``batched="auto"`` (default) uses the batched product off the CPU and
    separate passes on the CPU, where they measured faster (BENCHMARKS.md, stream_grads).
    Parameters a loss does not reach get ``None``.
    """
    names = list(losses)
    params = list(params)
    if not names:
        return {}
    if batched == "auto":
        batched = bool(params) and params[0].device.type != "cpu"
    elif not isinstance(batched, bool):
        raise ValueError(f"batched must be True, False or 'auto', got {batched!r}")
    known_failure = bool(params) and params[0] in _BATCHED_FAILED
    if batched and len(names) > 1 and not known_failure:
        try:
            return _batched(losses, names, params, retain_graph)
        except RuntimeError:
            # No batching rule for some op of the graph: exact separate passes below, and do not
            # pay for the failed attempt again with the same parameters (the same model).
            if params:
                _BATCHED_FAILED[params[0]] = True
    grads: StreamGrads = {}
    for index, name in enumerate(names):
        keep = retain_graph or index < len(names) - 1
        grads[name] = list(torch.autograd.grad(losses[name], params, retain_graph=keep, allow_unused=True))
    return grads


def _batched(losses, names, params, retain_graph) -> StreamGrads:
    stacked = torch.stack([losses[n] for n in names])
    eye = torch.eye(len(names), dtype=stacked.dtype, device=stacked.device)
    rows = torch.autograd.grad(stacked, params, grad_outputs=eye, is_grads_batched=True,
                               retain_graph=True if retain_graph else None, allow_unused=True)
    return {name: [None if g is None else g[i] for g in rows] for i, name in enumerate(names)}


def gsnr(model: nn.Module, loss_fn: Callable[..., Mapping[str, torch.Tensor]], inputs: torch.Tensor,
         targets: torch.Tensor, *, extra: Sequence[torch.Tensor] = (),
         params: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    """Gradient signal-to-noise ratio per stream from per-sample gradients (METHODS.md 4.1).

    ``loss_fn(logits [1, C], target [1], *extra_i) -> {stream: scalar}`` is evaluated on each sample
    alone (``extra``: per-sample tensors such as teacher logits, sliced like the inputs)
    through ``torch.func.vmap(torch.func.grad(...))``; for every parameter element j,
    ``GSNR_j = mean_i(g_ij)^2 / var_i(g_ij)`` (population variance over the n samples; elements
    with zero variance are left out). Returned per stream: ``{"overall": mean over all elements,
    <param name>: mean over that tensor's elements}``. BatchNorm layers use their running
    statistics (the model is put in eval mode for the measurement: a single sample has no batch
    statistics), so the measured gradients are those of the eval-mode network.
    """
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad and (params is None or n in params)]
    detached = {n: p.detach() for n, p in model.named_parameters() if n in names}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            streams = list(loss_fn(model(inputs[:1]), targets[:1], *(e[:1] for e in extra)).keys())
        result = {}
        for stream in streams:
            def sample_loss(weights, x, y, *rest, stream=stream):
                logits = functional_call(model, (weights, buffers), (x[None],))
                return loss_fn(logits, y[None], *(r[None] for r in rest))[stream]

            in_dims = (None, 0, 0) + (0,) * len(extra)
            per_sample = vmap(grad(sample_loss), in_dims=in_dims)(detached, inputs, targets, *extra)
            result[stream] = _ratio(per_sample)
        return result
    finally:
        model.train(was_training)


def _ratio(per_sample: Dict[str, torch.Tensor]) -> Dict[str, float]:
    out, all_values = {}, []
    for name, g in per_sample.items():
        g = g.flatten(1).double()
        mean, var = g.mean(0), g.var(0, unbiased=False)
        keep = var > 0
        ratio = mean[keep] ** 2 / var[keep]
        if ratio.numel():
            out[name] = float(ratio.mean())
            all_values.append(ratio)
    out["overall"] = float(torch.cat(all_values).mean()) if all_values else float("nan")
    return out
