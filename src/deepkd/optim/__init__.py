"""Optimisation: decoupled-momentum SGD, per-stream gradients, GSNR, GSNR-driven momenta, LR schedules."""
from deepkd.optim.auto_momentum import GSNRMomentum
from deepkd.optim.decoupled import DecoupledMomentumSGD
from deepkd.optim.schedules import cosine_lr, step_lr, warmup_multistep_lr
from deepkd.optim.streams import gsnr, stream_grads

__all__ = ["DecoupledMomentumSGD", "GSNRMomentum", "cosine_lr", "gsnr", "step_lr", "stream_grads",
           "warmup_multistep_lr"]
