"""The optimisation tail shared by every training step (classification and detection).

Given the method's named loss terms (each tagged with its gradient stream), one call does what the
optimizer needs: with :class:`~deepkd.optim.DecoupledMomentumSGD`, one gradient pass per distinct
momentum (streams with equal coefficients merged), averaged across ranks, then ``step(grads)``;
with a plain optimizer, ``backward`` of the summed loss, averaged across ranks, then ``step()``.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch

from deepkd.engine.distributed import Dist, average_gradients
from deepkd.losses import LossTerm, stream_losses, total_loss
from deepkd.optim import DecoupledMomentumSGD, stream_grads


def optimize(terms: Dict[str, LossTerm], optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter],
             ctx: Dist) -> None:
    """Backward and step for ``terms``; ``params`` are the optimizer's parameters in order."""
    if isinstance(optimizer, DecoupledMomentumSGD):
        losses = optimizer.merge_losses(stream_losses(terms))  # equal momenta share one pass
        grads = stream_grads(losses, list(params))
        optimizer.step({key: average_gradients(g, ctx) for key, g in grads.items()})
        return
    optimizer.zero_grad(set_to_none=True)
    total_loss(terms).backward()
    if ctx.enabled:
        for param, grad in zip(params, average_gradients([p.grad for p in params], ctx)):
            param.grad = grad
    optimizer.step()
