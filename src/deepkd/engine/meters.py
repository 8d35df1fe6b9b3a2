"""Training meters kept on the device: sums added every step without a host sync, averaged (and
all-reduced across processes) once per epoch, saved in checkpoints so that a resumed epoch reports
what an uninterrupted one would. A task chooses the sums (its step returns them); ``count`` is the
weight they are divided by."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from deepkd.engine.distributed import Dist, all_reduce_sum


class Meters:
    """Sums kept on the device (no host sync per step); saved in checkpoints for exact resume."""

    def __init__(self, device: torch.device, state: Optional[Dict[str, torch.Tensor]] = None):
        self.device = device
        self.sums: Dict[str, torch.Tensor] = {k: v.to(device) for k, v in (state or {}).items()}

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().to(self.device, torch.float64)
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def update(self, sums: Dict[str, torch.Tensor]) -> None:
        for name, value in sums.items():
            self.add(name, value)

    def state(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.sums.items()}

    def averages(self, ctx: Dist) -> Dict[str, float]:
        """``{"train_<name>": sum / count}`` over every rank (one host sync per sum)."""
        reduced = {k: all_reduce_sum(v, ctx) for k, v in self.sums.items()}
        count = max(float(reduced.get("count", torch.tensor(1.0))), 1.0)
        return {f"train_{k}": float(v) / count for k, v in reduced.items() if k != "count"}
