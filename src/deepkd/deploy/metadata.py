"""The metadata an exported student carries, and the check that its file still computes what it did.

The metadata is one JSON-able dict: who the model is (experiment, seed, method, student, teacher,
dataset, deepkd version), how an image becomes its input (``input_size``, ``resize``, ``crop``,
``interpolation``, ``channels``, ``mean``, ``std``; see :func:`deepkd.deploy.run.preprocessing`), its
class names, and ``check``: the PyTorch student's logits on :func:`check_input`. ONNX keeps each key as
a ``metadata_props`` entry ``deepkd.<key>`` (a JSON value, so tools such as Netron show them one by
one); TorchScript and ``torch.export`` archives keep the whole dict as the extra file ``deepkd.json``.

Why a check: a flipped byte inside a weight leaves an ONNX or TorchScript file loadable (the formats
hold no checksum of their tensors), so a loader alone cannot tell a damaged file from a good one.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, Dict, Mapping

import torch

from deepkd.errors import WeightsError

INPUT_NAME, OUTPUT_NAME = "images", "logits"
EXTRA_FILE = "deepkd.json"
PREFIX = "deepkd."
# The stored check logits come from PyTorch on the exporting machine; another machine's kernels round
# differently, so a file counts as damaged only past 10x the export tolerance, and never below 1e-4 of
# the logits' scale (damage moves logits far more: a flipped byte in a weight, by whole units).
CHECK_SLACK, CHECK_RELATIVE = 10.0, 1e-4


def check_tolerance(tolerance: float, logits: torch.Tensor) -> float:
    """How far a file's logits on :func:`check_input` may move before it counts as damaged."""
    return max(CHECK_SLACK * tolerance, CHECK_RELATIVE * max(1.0, logits.abs().max().item()))


def check_input(metadata: Mapping[str, Any]) -> torch.Tensor:
    """``[2, channels, input_size, input_size]`` float32 of amplitude 2 (normalised-image range): a
    fixed formula, not a random generator, so every torch version builds the same tensor."""
    shape = (2, metadata["channels"], metadata["input_size"], metadata["input_size"])
    index = torch.arange(math.prod(shape), dtype=torch.float64)
    return (2.0 * torch.sin(0.618 * index) * torch.cos(0.017 * index)).float().reshape(shape)


def to_properties(metadata: Mapping[str, Any]) -> Dict[str, str]:
    """ONNX ``metadata_props``: ``deepkd.<key>`` -> the value as JSON."""
    return {PREFIX + key: json.dumps(value) for key, value in metadata.items()}


def from_properties(properties: Mapping[str, str], source: str) -> Dict[str, Any]:
    """The metadata dict back from ``deepkd.<key>`` properties; a file without them is not deepkd's."""
    try:
        metadata = {key[len(PREFIX):]: json.loads(value) for key, value in properties.items()
                    if key.startswith(PREFIX)}
    except json.JSONDecodeError:
        raise WeightsError(f"{source!r} has damaged deepkd metadata: export it again with deepkd export") from None
    return _complete(metadata, source)


def from_json(text: str | bytes, source: str) -> Dict[str, Any]:
    """The metadata dict of a TorchScript or pt2 archive's ``deepkd.json`` (empty: not deepkd's)."""
    try:
        metadata = json.loads(text) if text else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsError(f"{source!r} has damaged deepkd metadata: export it again with deepkd export") from None
    return _complete(metadata if isinstance(metadata, dict) else {}, source)


def _complete(metadata: Dict[str, Any], source: str) -> Dict[str, Any]:
    needed = ("num_classes", "classes", "input_size", "resize", "crop", "interpolation", "channels", "mean", "std",
              "check")
    if metadata.get("task") == "detection":
        raise WeightsError(f"{source!r} is a detector (deepkd export of a detection run): deepkd predict reads "
                           "classifiers; run it with ONNX Runtime (input images [3, H, W] in [0, 1]; outputs boxes, "
                           "labels, scores)")
    if not metadata:
        raise WeightsError(f"{source!r} holds no deepkd metadata (class names, input size, normalisation): it was "
                           "not written by deepkd export")
    missing = [key for key in needed if key not in metadata]
    if missing:
        raise WeightsError(f"{source!r} lacks the deepkd metadata {', '.join(missing)}: export it again with "
                           "deepkd export")
    return metadata


def verify(forward: Callable[[torch.Tensor], torch.Tensor], metadata: Mapping[str, Any], source: str) -> float:
    """Run the model on :func:`check_input` and compare with the stored logits; returns the largest
    |difference|. Past ``check.tolerance`` (or a wrong shape, or NaN) the file is damaged."""
    check = metadata["check"]
    expected = torch.tensor(check["logits"], dtype=torch.float32)
    got = _run(forward, check_input(metadata), source)
    difference = (got - expected).abs().max().item() if got.shape == expected.shape else math.inf
    if not difference <= check["tolerance"]:  # NaN-safe
        raise WeightsError(f"{source!r} no longer computes the logits stored at its export (max |difference| "
                           f"{difference:.3g} > {check['tolerance']:.3g} on its check input): the file is damaged, "
                           "export it again")
    return difference


def short_reason(err: BaseException) -> str:
    """The first sentence of an error's first line (at most 160 characters), for a one-sentence message."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return re.split(r"(?<=[.!?])\s", line)[0].rstrip(".")[:160]


def _run(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, source: str) -> torch.Tensor:
    try:
        return forward(images).float()
    except (RuntimeError, ValueError) as err:  # a damaged graph that still loaded (ONNX Runtime: RuntimeError)
        raise WeightsError(f"{source!r} is damaged: running it on its check input fails "
                           f"({short_reason(err)})") from None

