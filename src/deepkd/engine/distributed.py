"""Multi-process data parallelism for the student, explicit and small.

Started by ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment). deepkd averages
gradients itself with one coalesced all-reduce per gradient stream instead of wrapping the student
in ``DistributedDataParallel``: DDP's hooks fire only on ``.backward()`` into ``.grad``, while a
DeepKD step takes per-stream gradients with ``torch.autograd.grad``. Averaging each stream before
the momentum update is exactly what the decoupled optimizer needs, and the plain path shares it.
The teacher is never wrapped: every rank runs its own frozen copy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """Join the process group when launched by torchrun; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_device(device: torch.device) -> Tuple[torch.device, Dist]:
    """Join the process group (:func:`init_distributed`); under torchrun on GPUs, each rank takes the
    GPU of its local rank."""
    ctx = init_distributed(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    return device, ctx


def shutdown_distributed(ctx: Dist) -> None:
    """Leave the process group together: a rank that tears gloo down while another still writes
    its files can abort ("terminate called without an active exception")."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def average_gradients(grads: Sequence[Optional[torch.Tensor]], ctx: Dist) -> List[Optional[torch.Tensor]]:
    """Mean over ranks of one stream's gradient list, in one coalesced all-reduce."""
    grads = list(grads)
    if not ctx.enabled:
        return grads
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    flat = _flatten_dense_tensors(present)
    dist.all_reduce(flat)
    flat.div_(ctx.world_size)
    reduced = iter(_unflatten_dense_tensors(flat, present))
    return [None if g is None else next(reduced) for g in grads]


def broadcast_module(module: nn.Module, ctx: Dist, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters (and buffers, e.g. BatchNorm statistics) to every rank."""
    if not ctx.enabled:
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


def average_batchnorm_statistics(module: nn.Module, ctx: Dist) -> None:
    """Replace every BatchNorm's running mean and variance by their mean over ranks, in place.

    Called before each evaluation and each checkpoint, so the logged test accuracy, ``best.pt``,
    ``last.pt`` and ``student.safetensors`` all use one set of statistics (timm's ``distribute_bn``
    with reduce; chosen over DDP's per-step broadcast of rank 0's buffers, which costs a collective
    every step and discards the other ranks' batches). The running averages are linear in their
    updates, so averaging them now or at the end gives the same statistics up to rounding, and
    training-mode forwards use batch statistics anyway. ``train.sync_batchnorm`` makes the batch
    statistics themselves global.
    """
    if not ctx.enabled:
        return
    stats = [t for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
             for t in (m.running_mean, m.running_var) if t is not None]
    if not stats:
        return
    flat = _flatten_dense_tensors(stats)
    dist.all_reduce(flat)
    flat.div_(ctx.world_size)
    for tensor, averaged in zip(stats, _unflatten_dense_tensors(flat, stats)):
        tensor.copy_(averaged)


def all_reduce_sum(tensor: torch.Tensor, ctx: Dist) -> torch.Tensor:
    """Sum of a (metric) tensor over ranks; returned unchanged in a single process."""
    if ctx.enabled:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor
