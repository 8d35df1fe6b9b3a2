"""Fixtures shared by the test files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_jpeg_tree(root: Path, classes: int = 3, per_class: int = 4, splits=("train", "val"),
                    size_range=(40, 90), seed: int = 1) -> Path:
    """``root/<split>/class_<c>/<i>.jpg``: random RGB JPEGs of random sizes (a real image-folder tree)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            folder = Path(root) / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                size = (int(rng.integers(*size_range)), int(rng.integers(*size_range)))
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return Path(root)


@pytest.fixture
def jpeg_tree():
    """The :func:`write_jpeg_tree` writer."""
    return write_jpeg_tree
