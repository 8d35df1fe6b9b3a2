"""Training meters kept on the device: per-term loss sums, correct and seen counts, added every step
without a host sync, averaged (and all-reduced across processes) once per epoch, saved in checkpoints so
that a resumed epoch reports what an uninterrupted one would."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from deepkd.train.distributed import Dist, all_reduce_sum


class Meters:
    """Sums kept on the device (no host sync per step); saved in checkpoints for exact resume."""

    def __init__(self, device: torch.device, state: Optional[Dict[str, torch.Tensor]] = None):
        self.device = device
        self.sums: Dict[str, torch.Tensor] = {k: v.to(device) for k, v in (state or {}).items()}

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().to(self.device, torch.float64)
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def update(self, terms: Dict[str, torch.Tensor], logits: torch.Tensor, targets: torch.Tensor) -> None:
        count = torch.tensor(float(targets.numel()), device=self.device)
        loss = torch.stack(list(terms.values())).sum()
        for name, value in terms.items():
            self.add(f"loss/{name}", value * count)
        self.add("loss", loss * count)
        self.add("correct", (logits.argmax(-1) == targets).sum())
        self.add("count", count)

    def state(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.sums.items()}

    def averages(self, ctx: Dist) -> Dict[str, float]:
        reduced = {k: all_reduce_sum(v, ctx) for k, v in self.sums.items()}
        count = max(float(reduced.get("count", torch.tensor(1.0))), 1.0)
        out = {f"train_{k}": float(v) / count for k, v in reduced.items() if k.startswith("loss")}
        out["train_top1"] = 100.0 * float(reduced.get("correct", torch.tensor(0.0))) / count
        return out
