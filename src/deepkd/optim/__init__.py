"""Optimisation: decoupled-momentum SGD, per-stream gradients, GSNR, LR schedules."""
from deepkd.optim.decoupled import DecoupledMomentumSGD
from deepkd.optim.schedules import cosine_lr, step_lr
from deepkd.optim.streams import gsnr, stream_grads

__all__ = ["DecoupledMomentumSGD", "cosine_lr", "gsnr", "step_lr", "stream_grads"]
