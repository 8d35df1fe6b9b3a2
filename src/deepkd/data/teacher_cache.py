"""Teacher logits of every augmented view, computed once and served per batch.

Under the standard CIFAR augmentation an image has exactly ``(2*pad + 1)^2 * 2`` views (9 x 9 crop
offsets x flip = 162). A frozen eval-mode teacher maps each view to fixed logits, so one pass over
all views (``N x 162`` teacher forwards, about 1.6 GB at bf16 for CIFAR-100's 50,000 images) replaces
the teacher forward of every later step, for every student, seed and method sharing the teacher.
With ``dtype=torch.float32`` the served logits are the teacher's own.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from deepkd.data.device_loader import DeviceLoader


def view_index(dy: torch.Tensor, dx: torch.Tensor, flips: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """The view number ``((dy * (2 pad + 1)) + dx) * 2 + flip`` of each sample."""
    side = 2 * pad + 1
    return (dy.long() * side + dx.long()) * 2 + flips.long()


class TeacherLogitCache:
    """``logits[sample, view]`` for a :class:`DeviceLoader`'s training images."""

    def __init__(self, logits: torch.Tensor, pad: int = 4):
        self.logits, self.pad = logits, pad

    @property
    def num_views(self) -> int:
        """Views per image: ``(2 * pad + 1) ** 2 * 2`` (crop offsets x flip)."""
        return self.logits.shape[1]

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, loader: DeviceLoader, *, batch_size: int = 1024,
              dtype: torch.dtype = torch.bfloat16, autocast_dtype: Optional[torch.dtype] = None) -> "TeacherLogitCache":
        """Run the eval-mode ``teacher`` on every view of every image of ``loader``."""
        if not loader.flip:
            raise ValueError("the teacher-logit cache expects the standard crop + flip augmentation")
        teacher.eval()
        side, count = 2 * loader.pad + 1, loader.num_samples
        logits = None
        for view in range(side * side * 2):
            dy, dx, flip = (view // 2) // side, (view // 2) % side, view % 2
            for start in range(0, count, batch_size):
                images = loader.images[start:start + batch_size]
                n = len(images)
                params = (torch.full((n,), dy), torch.full((n,), dx), torch.full((n,), bool(flip)))
                batch = loader.normalize(loader.augment(images, *params))
                with torch.autocast(batch.device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    out = teacher(batch).float()
                if logits is None:
                    logits = torch.empty(count, side * side * 2, out.shape[-1], dtype=dtype, device=out.device)
                logits[start:start + n, view] = out.to(dtype)
        return cls(logits, loader.pad)

    def lookup(self, indices: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Float32 teacher logits ``[b, C]`` of samples ``indices`` seen through the given views."""
        views = view_index(dy, dx, flips, self.pad).to(self.logits.device)
        return self.logits[indices.to(self.logits.device), views].float()

    def save(self, path: str | Path) -> None:
        """Write the logits (on the CPU) and the padding to ``path`` with ``torch.save``."""
        torch.save({"logits": self.logits.cpu(), "pad": self.pad}, path)

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "TeacherLogitCache":
        """Read a cache written by ``save`` onto ``device``."""
        data = torch.load(path, map_location=device, weights_only=True)
        return cls(data["logits"], int(data["pad"]))

    @classmethod
    def ensure(cls, path: str | Path, build: Callable[[], "TeacherLogitCache"]) -> None:
        """Write ``build()`` to ``path`` unless it is there. Processes that share the file (a sweep's
        parallel runs) take turns on ``<path>.lock``: one builds, the others wait and find it built.
        The file appears whole or not at all (written to a per-process name, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.with_suffix(".lock")):
            if path.is_file():
                return
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            build().save(tmp)
            tmp.replace(path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX ``flock``; where there is none, no lock: each
    process then builds its own copy, and the atomic rename keeps the file whole)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

