"""An offline COCO-format detection set, generated on demand (demo, tests, benchmarks).

Each image: a uniform random background, 1-4 annotated non-overlapping objects of 10-42 px from 4
categories = {red, blue} x {rectangle, ellipse} (colour jitter +-40), and 0-2 unannotated
triangles in the same colours as distractors, so shape matters as well as colour. The category
ids 1, 3, 4, 7 have gaps like COCO's, which exercises the id-as-label path (``num_classes`` = 8).
Not from any paper: deepkd's plumbing benchmark for CPU-sized detectors.
"""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np

CATEGORIES = [{"id": 1, "name": "red_rectangle", "supercategory": "shape"},
              {"id": 3, "name": "blue_rectangle", "supercategory": "shape"},
              {"id": 4, "name": "red_ellipse", "supercategory": "shape"},
              {"id": 7, "name": "blue_ellipse", "supercategory": "shape"}]
NUM_CLASSES = 8  # max category id + 1, background 0
_COLOURS = {"red": (210, 40, 40), "blue": (40, 40, 210)}
_KINDS = {1: ("red", "rectangle"), 3: ("blue", "rectangle"), 4: ("red", "ellipse"), 7: ("blue", "ellipse")}

Box = Tuple[int, int, int, int]  # x, y, w, h


def _colour(rng: np.random.Generator, name: str) -> Tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-40, 41), 0, 255)) for c in _COLOURS[name])


def _place(rng: np.random.Generator, size: int, taken: List[Box]) -> Union[Box, None]:
    """A free box of 10-42 px, not touching any taken box (30 tries, else None)."""
    for _ in range(30):
        w, h = (int(v) for v in rng.integers(10, 43, 2))
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        if all(x + w + 1 < a or a + c + 1 < x or y + h + 1 < b or b + d + 1 < y for a, b, c, d in taken):
            return x, y, w, h
    return None


def _polygon(kind: str, box: Box) -> List[float]:
    """The outline as a flat COCO polygon ``[x1, y1, x2, y2, ...]``."""
    x, y, w, h = box
    if kind == "rectangle":
        points = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    elif kind == "triangle":
        points = [(x + w / 2, y), (x + w, y + h), (x, y + h)]
    else:
        points = [(x + w / 2 + w / 2 * math.cos(t), y + h / 2 + h / 2 * math.sin(t))
                  for t in np.linspace(0, 2 * math.pi, 16, endpoint=False)]
    return [round(float(v), 2) for point in points for v in point]


def _area(polygon: List[float]) -> float:
    xs, ys = np.array(polygon[0::2]), np.array(polygon[1::2])
    return round(float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))), 2)


def _draw_image(rng: np.random.Generator, size: int, image_id: int, first_ann: int):
    """One image (PIL) and its annotations."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(70, 190, 3)))
    draw, taken, annotations = ImageDraw.Draw(image), [], []
    objects = [int(rng.choice(list(_KINDS))) for _ in range(int(rng.integers(1, 5)))]
    distractors = int(rng.integers(0, 3))
    for category in objects + [0] * distractors:
        box = _place(rng, size, taken)
        if box is None:
            continue
        taken.append(box)
        colour, kind = _KINDS[category] if category else (str(rng.choice(list(_COLOURS))), "triangle")
        polygon = _polygon(kind, box)
        fill = _colour(rng, colour)
        if kind == "ellipse":
            draw.ellipse([box[0], box[1], box[0] + box[2], box[1] + box[3]], fill=fill)
        else:
            draw.polygon(list(zip(polygon[0::2], polygon[1::2])), fill=fill)
        if category:
            annotations.append({"id": first_ann + len(annotations), "image_id": image_id, "category_id": category,
                                "bbox": [float(v) for v in box], "area": _area(polygon), "iscrowd": 0,
                                "segmentation": [polygon]})
    return image, annotations


def write_synthetic_coco(root: Union[str, Path], split: str, count: int, size: int = 128, seed: int = 0) -> Path:
    """Write ``root/<split>/NNNNNN.jpg`` (JPEG q90) and ``root/annotations/instances_<split>.json``.

    The JSON (``info``, ``licenses``, ``images``, ``annotations``, ``categories``) is a pure function
    of ``(split, count, size, seed)``; JPEG bytes may vary with the Pillow version. Returns the JSON's
    path. 144 images take well under a second.
    """
    root = Path(root)
    image_dir, ann_dir = root / split, root / "annotations"
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])  # train and val differ for one seed
    images, annotations = [], []
    for index in range(count):
        image_id, name = index + 1, f"{index + 1:06d}.jpg"
        picture, anns = _draw_image(rng, size, image_id, len(annotations) + 1)
        picture.save(image_dir / name, quality=90)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        annotations.extend(anns)
    data = {"info": {"description": f"deepkd synthetic shapes, split {split}, seed {seed}", "version": "1.0"},
            "licenses": [], "images": images, "annotations": annotations, "categories": CATEGORIES}
    path = ann_dir / f"instances_{split}.json"
    path.write_text(json.dumps(data))
    return path
