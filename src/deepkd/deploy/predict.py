"""``deepkd predict``: class probabilities of image files from a run folder or an exported student.

Each image is decoded to RGB (grey for a one-channel student) and preprocessed exactly as the run
evaluated: :func:`deepkd.data.imagefolder.build_transform` with ``train=False`` and the model's
``input_size``, ``resize``, ``crop``, ``interpolation``, ``mean`` and ``std`` (from the run folder, or
from the exported file's metadata). An exported file is first run on its check input
(:func:`deepkd.deploy.metadata.verify`), so a damaged file is refused rather than trusted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch

from deepkd.deploy.formats import format_of
from deepkd.deploy.metadata import verify
from deepkd.deploy.run import load_run
from deepkd.errors import MissingFileError


@dataclass
class Predictor:
    """``forward(images) -> logits`` and the metadata that says how to build ``images``."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    metadata: Dict[str, Any]
    source: str


def load_predictor(model: str | Path) -> Predictor:
    """A run folder (its student in PyTorch) or a file of ``deepkd export`` (in its own runtime)."""
    path = Path(model)
    if path.is_dir():
        run = load_run(path)

        def forward(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return run.model(images)

        return Predictor(forward, run.metadata, str(path))
    if not path.is_file():
        raise MissingFileError(f"model {str(path)!r} does not exist (give a run folder or a file of deepkd export)")
    forward, metadata = format_of(path).load(path)
    verify(forward, metadata, str(path))
    return Predictor(forward, metadata, str(path))


def _padded(metadata: Dict[str, Any]):
    """Fashion-MNIST's evaluation: the image at 28x28 (resized if it is not), zero-padded centred to
    ``input_size`` (:func:`deepkd.data.fashion_mnist.pad`), scaled to [0, 1], normalised."""
    from torchvision.transforms.v2 import functional as TF

    from deepkd.data.fashion_mnist import SIDE, pad

    mean = torch.tensor(metadata["mean"]).view(-1, 1, 1)
    std = torch.tensor(metadata["std"]).view(-1, 1, 1)

    def transform(pixels: torch.Tensor) -> torch.Tensor:
        grey = pixels[:1] if bool((pixels == pixels[:1]).all()) else TF.rgb_to_grayscale(pixels)  # grey as stored
        if grey.shape[-2:] != (SIDE, SIDE):
            grey = TF.resize(grey, [SIDE, SIDE], antialias=True)
        padded = pad(grey, metadata["input_size"], metadata["channels"])[0]
        return (padded.float() / 255.0 - mean) / std

    return transform


def preprocess(paths: Sequence[str | Path], metadata: Dict[str, Any]) -> torch.Tensor:
    """``[n, channels, input_size, input_size]`` float32: the images as the run's evaluation sees them."""
    from torchvision.transforms.v2 import functional as TF

    from deepkd.data.imagefolder import build_transform, decode

    if metadata["crop"] == "pad":
        transform = _padded(metadata)
    else:
        transform = build_transform(train=False, image_size=metadata["input_size"], resize=metadata["resize"],
                                    crop=metadata["crop"], interpolation=metadata["interpolation"],
                                    mean=metadata["mean"], std=metadata["std"])
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise MissingFileError(f"image {str(path)!r} does not exist")
        pixels = decode(str(path))
        if metadata["channels"] == 1:
            pixels = TF.rgb_to_grayscale(pixels)
        images.append(transform(pixels))
    return torch.stack(images)


def predict(predictor: Predictor, paths: Sequence[str | Path], *, top: int = 5,
            batch_size: int = 64) -> List[Dict[str, Any]]:
    """One record per image: ``{"image", "top": [{"class", "index", "probability"}, ...]}``, the ``top``
    most probable classes (softmax of the logits), most probable first."""
    metadata = predictor.metadata
    names = metadata["classes"] or [str(i) for i in range(metadata["num_classes"])]
    records = []
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        probabilities = predictor.forward(preprocess(chunk, metadata)).float().softmax(-1)
        values, indices = probabilities.topk(min(top, probabilities.shape[-1]), dim=-1)
        for path, row_values, row_indices in zip(chunk, values.tolist(), indices.tolist()):
            records.append({"image": str(path), "top": [{"class": names[i], "index": i, "probability": p}
                                                        for p, i in zip(row_values, row_indices)]})
    return records


def format_prediction(record: Dict[str, Any]) -> str:
    """``image: class 0.981, class 0.012, ...``"""
    return f"{record['image']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in record["top"])
