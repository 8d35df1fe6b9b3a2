"""Per-stream GSNR of the student during training (``train.gsnr_every`` steps; METHODS.md 4.1)."""
from __future__ import annotations

from typing import Dict

import torch

from deepkd.losses import stream_losses
from deepkd.optim import gsnr


def measure_gsnr(run, images: torch.Tensor, targets: torch.Tensor, epoch: int) -> Dict[str, float]:
    """``{"gsnr/<stream>": overall GSNR}`` on the first ``train.gsnr_samples`` samples of the batch."""
    count = min(run.cfg.train.gsnr_samples, len(targets))
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
