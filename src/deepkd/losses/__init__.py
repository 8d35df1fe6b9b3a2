"""Distillation losses: pure functions (``functional``) and one thin module per method."""
from deepkd.losses.base import STREAMS, LossTerm, Method, stream_losses, total_loss, warmup_factor

__all__ = ["STREAMS", "LossTerm", "Method", "stream_losses", "total_loss", "warmup_factor"]
