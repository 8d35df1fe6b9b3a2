"""An offline, procedurally generated CIFAR-shaped benchmark on which distillation matters.

100 classes in 20 superclasses of 5 (CIFAR-100's structure). Each superclass has a smooth random
colour template; each class adds its own smaller smooth template; each image is its class template
randomly shifted and flipped, contrast- and colour-jittered, plus pixel noise. Classes of one
superclass resemble each other, so a teacher's probabilities over the non-target classes carry
information a one-hot label lacks: the dark knowledge KD and DKD transfer.
Everything is a deterministic function of the seed; any number of images.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

NUM_CLASSES, NUM_SUPERCLASSES, SIZE = 100, 20, 32


def _smooth(generator: torch.Generator, count: int, grid: int) -> torch.Tensor:
    """``count`` smooth random RGB fields ``[count, 3, 32, 32]``: a coarse grid upsampled bicubically."""
    coarse = torch.randn(count, 3, grid, grid, generator=generator)
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False)


def class_templates(seed: int = 0, class_scale: float = 0.6) -> torch.Tensor:
    """The 100 class templates ``[100, 3, 32, 32]``: superclass field + a smaller per-class field."""
    generator = torch.Generator().manual_seed(seed)
    superclass = _smooth(generator, NUM_SUPERCLASSES, 4)
    own = _smooth(generator, NUM_CLASSES, 6)
    return superclass.repeat_interleave(NUM_CLASSES // NUM_SUPERCLASSES, dim=0) + class_scale * own


def _shift(images: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Shift each image by its own random offset (edge pixels repeated)."""
    count = images.shape[0]
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (count,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (count,), generator=generator)
    rows = (dy[:, None] + torch.arange(SIZE))[:, None, :, None].expand(count, 3, SIZE, padded.shape[-1])
    taken = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(SIZE))[:, None, None, :].expand(count, 3, SIZE, SIZE)
    return taken.gather(3, cols)


def generate(count: int, *, seed: int = 0, split: str = "train", noise: float = 1.5,
             template_seed: int | None = None, class_scale: float = 0.6) -> Tuple[torch.Tensor, torch.Tensor]:
    """``count`` images ``uint8 [N, 3, 32, 32]`` and labels ``int64 [N]`` (balanced classes).

    ``split`` selects an independent sample stream ("train", "test") over the same templates.
    ``noise``: standard deviation of the per-pixel noise relative to the template's (~1); larger is
    harder. ``class_scale``: size of each class's own template relative to its superclass's; smaller
    makes the classes of a superclass more alike (harder, and more for a teacher to teach).
    """
    templates = class_templates(seed if template_seed is None else template_seed, class_scale)
    offset = {"train": 1, "test": 2}.get(split)
    if offset is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    generator = torch.Generator().manual_seed(seed * 1000 + offset)
    labels = torch.arange(count) % NUM_CLASSES
    labels = labels[torch.randperm(count, generator=generator)]
    images = _shift(templates[labels], generator, 4)
    flip = torch.rand(count, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    contrast = 0.7 + 0.6 * torch.rand(count, 1, 1, 1, generator=generator)
    colour = 0.3 * torch.randn(count, 3, 1, 1, generator=generator)
    images = images * contrast + colour + noise * torch.randn(images.shape, generator=generator)
    pixels = (128.0 + 42.0 * images).round().clamp(0, 255).to(torch.uint8)
    return pixels, labels
