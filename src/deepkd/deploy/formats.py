"""The three export formats: ONNX, TorchScript and ``torch.export`` (pt2), each a writer and a reader.

A writer takes the student (eval mode), an example batch, the metadata and the path, and returns the
exporter it used; a reader returns ``(forward, metadata)`` with ``forward(images) -> logits`` on CPU
tensors. Every reader turns a truncated, damaged or foreign file into one sentence naming it.

TorchScript (``torch.jit.trace``) is deprecated by PyTorch in favour of ``torch.export``; it is kept
for runtimes that still load ``.pt`` modules (LibTorch, older mobile stacks).
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Tuple

import torch
from torch import nn

from deepkd.deploy.metadata import EXTRA_FILE, from_json, short_reason
from deepkd.deploy.onnx_format import load_onnx, quiet, save_onnx
from deepkd.errors import WeightsError

Forward = Callable[[torch.Tensor], torch.Tensor]
TRACE, EXPORT = "torch.jit.trace", "torch.export"


@dataclass(frozen=True)
class Format:
    name: str
    file_name: str  # the default file inside the run folder
    save: Callable[[nn.Module, torch.Tensor, Mapping[str, Any], Path], str]
    load: Callable[[Path], Tuple[Forward, Dict[str, Any]]]


def save_torchscript(model: nn.Module, example: torch.Tensor, metadata: Mapping[str, Any], path: Path) -> str:
    with quiet():
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps({**metadata, "exporter": TRACE})})
    return TRACE


def load_torchscript(path: Path) -> Tuple[Forward, Dict[str, Any]]:
    extra = {EXTRA_FILE: ""}
    try:
        with quiet():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as err:
        raise WeightsError(f"{str(path)!r} is damaged or not a TorchScript module ({short_reason(err)}); for a run's "
                           "checkpoint give its run folder") from None
    metadata = from_json(extra[EXTRA_FILE], str(path))
    module.eval()
    return _no_grad(module), metadata


def save_pt2(model: nn.Module, example: torch.Tensor, metadata: Mapping[str, Any], path: Path) -> str:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path), extra_files={EXTRA_FILE: json.dumps({**metadata, "exporter": EXPORT})})
    return EXPORT


def load_pt2(path: Path) -> Tuple[Forward, Dict[str, Any]]:
    extra = {EXTRA_FILE: ""}
    try:
        with _silent_logger("torch.export"), quiet():
            program = torch.export.load(str(path), extra_files=extra)
    except Exception as err:  # zip, JSON, unpickling and schema errors all mean a file torch.export cannot read
        raise WeightsError(f"{str(path)!r} is damaged or not a torch.export program ({short_reason(err)})") from None
    metadata = from_json(extra[EXTRA_FILE], str(path))
    return _no_grad(program.module()), metadata


def _no_grad(module: Callable[[torch.Tensor], torch.Tensor]) -> Forward:
    def forward(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(images)

    return forward


@contextlib.contextmanager
def _silent_logger(name: str) -> Iterator[None]:
    """torch.export logs a traceback before raising on an unreadable file; the raised error is enough."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


FORMATS = {
    "onnx": Format("onnx", "student.onnx", save_onnx, load_onnx),
    "torchscript": Format("torchscript", "student.torchscript.pt", save_torchscript, load_torchscript),
    "pt2": Format("pt2", "student.pt2", save_pt2, load_pt2),
}
SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".pt2": "pt2"}


def format_of(path: Path) -> Format:
    """The format a file's suffix names; another suffix is one sentence."""
    name = SUFFIXES.get(Path(path).suffix.lower())
    if name is None:
        raise WeightsError(f"{str(path)!r} is not a model file deepkd runs: give a run folder, or a file written by "
                           "deepkd export (.onnx, .pt2 or TorchScript .pt)")
    return FORMATS[name]
