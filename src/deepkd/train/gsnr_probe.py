"""Per-stream GSNR of the student during training (``train.gsnr_every`` steps; METHODS.md 4.1), and
the momenta it sets under ``optimizer.stream_momentum: auto`` (:class:`deepkd.optim.GSNRMomentum`)."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from deepkd.engine.distributed import all_reduce_sum
from deepkd.losses import stream_losses
from deepkd.optim import gsnr


def measure_gsnr(run, images: torch.Tensor, targets: torch.Tensor, epoch: int,
                 samples: Optional[int] = None) -> Dict[str, float]:
    """``{"gsnr/<stream>": overall GSNR}`` on the first ``samples`` (default ``train.gsnr_samples``)
    samples of the batch."""
    count = min(samples or run.cfg.train.gsnr_samples, len(targets))
    images, targets = images[:count], targets[:count]
    extra = ()
    if run.teacher is not None:
        with torch.no_grad():
            extra = (run.teacher(images).float(),)

    def per_sample(logits, target, *teacher_logits):
        terms = run.method(logits.float(), teacher_logits[0] if teacher_logits else None, target, epoch=epoch)
        return stream_losses(terms)

    result = gsnr(run.student, per_sample, images, targets, extra=extra)
    return {f"gsnr/{stream}": values["overall"] for stream, values in result.items()}


def adapt_momentum(run, images: torch.Tensor, targets: torch.Tensor, epoch: int, step: int) -> None:
    """``stream_momentum: auto``: when due, measure the streams' GSNR on this batch (averaged over the
    ranks, so every rank sets the same coefficients), update the rule, set the optimizer's momenta
    and append both to the gsnr log. Nothing to do without the rule or between measurements."""
    rule = run.auto_momentum
    if rule is None or not rule.due(step):
        return
    measured = measure_gsnr(run, images, targets, epoch, samples=rule.samples)
    if run.ctx.enabled:  # a NaN on any rank makes the average NaN: no measurement anywhere
        values = torch.tensor(list(measured.values()), dtype=torch.float64, device=run.device)
        measured = dict(zip(measured, (all_reduce_sum(values, run.ctx) / run.ctx.world_size).tolist()))
    momenta = rule.update({key.removeprefix("gsnr/"): value for key, value in measured.items()})
    run.optimizer.set_momentum(momenta)
    if run.writer is not None:
        run.writer.log_gsnr({"step": step, "epoch": epoch, **measured, **momentum_record(run)})


def momentum_record(run) -> Dict[str, float]:
    """``{"momentum/<stream>": coefficient}`` under ``stream_momentum: auto`` (else empty)."""
    if getattr(run, "auto_momentum", None) is None:
        return {}
    return {f"momentum/{stream}": value for stream, value in run.optimizer.stream_momentum.items()}
