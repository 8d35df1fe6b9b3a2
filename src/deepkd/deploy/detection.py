"""``deepkd export RUN --format onnx`` for a detection run: the torchvision detector as ONNX.

torchvision's Faster R-CNN family exports to ONNX through the TorchScript-based exporter (with torch
2.14 the dynamo exporter fails at its first step, ``torch.export``, on these models): one image
``[3, H, W]`` with float pixels in [0, 1] (the detector's own transform resizes and normalises it
inside the graph), outputs
``boxes [n, 4]`` (x1, y1, x2, y2 in the input's pixels), ``labels [n]`` and ``scores [n]``; height and
width are dynamic, the batch is one image (torchvision's ONNX support is per image). The weights are
the run's ``best.pt`` (best box AP), else ``last.pt``. Before the file is kept, ONNX Runtime runs it on
``images`` validation images and each must give the same number of detections, the same labels, and
boxes and scores within ``tolerance`` relative difference (``|a - b| / max(1, |b|)``) of PyTorch's.
Only ONNX: TorchScript and pt2 exports of detectors are refused in one sentence.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from deepkd import __version__
from deepkd.deploy.onnx_format import cpu_session, quiet, require
from deepkd.errors import ExportError, MissingFileError
from deepkd.models import load_weights

OUTPUTS = ("boxes", "labels", "scores")
OPSET = 17


def export_detector(cfg, run_dir: Path, format: str, out: Optional[Path], *, tolerance: float,
                    images: int) -> Dict[str, Any]:
    """Export the detector of a detection run; returns what :func:`deepkd.deploy.export.format_report` prints."""
    if format != "onnx":
        raise ExportError(f"{str(run_dir)!r} is a detection run: detectors export to ONNX only "
                          f"(--format onnx), not {format}")
    from deepkd.engine.distributed import Dist
    from deepkd.train.detection_task import build_detection_data, build_detector

    weights = next((run_dir / n for n in ("best.pt", "last.pt") if (run_dir / n).is_file()), None)
    if weights is None:
        raise MissingFileError(f"{str(run_dir)!r} holds no best.pt or last.pt: train the detection run first")
    _, val_loader, coco, num_classes = build_detection_data(cfg, Dist(), train=False)
    model = build_detector(cfg.student.model_copy(update={"weights": None}), cfg, num_classes)
    load_weights(model, weights)
    model.eval()
    batch = _validation_images(val_loader, images)
    out = out if out is not None else run_dir / "detector.onnx"
    metadata = _metadata(cfg, weights, coco, num_classes)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    try:
        _save(model, batch[0], metadata, partial)
        parity = _compare(model, partial, batch)
        if not parity["max_rel_diff"] <= tolerance:  # NaN-safe
            raise ExportError(f"{str(out)!r} not written: the ONNX detector's boxes and scores differ from PyTorch's "
                              f"by up to {parity['max_rel_diff']:.3g} (relative) on {len(batch)} validation images, "
                              f"past the tolerance {tolerance:g} (raise it with --tolerance if that is acceptable)")
        if parity["mismatched"]:
            raise ExportError(f"{str(out)!r} not written: the ONNX detector finds other objects than PyTorch's "
                              f"(count or labels) on {parity['mismatched']} of {len(batch)} validation images")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return {"file": str(out), "format": "onnx", "task": "detection", "exporter": f"torchscript (opset {OPSET})",
            "dataset": cfg.data.dataset, "images": len(batch), "max_rel_diff": parity["max_rel_diff"],
            "detections": parity["detections"], "tolerance": tolerance, "bytes": out.stat().st_size}


def _metadata(cfg, weights: Path, coco, num_classes: int) -> Dict[str, Any]:
    """What the ONNX file says about itself (``deepkd.<key>`` properties)."""
    return {"deepkd_version": __version__, "task": "detection", "experiment": cfg.experiment, "seed": cfg.seed,
            "method": cfg.method.name, "student": cfg.student.name, "dataset": cfg.data.dataset,
            "weights": weights.name, "num_classes": num_classes,
            "classes": {str(c["id"]): c["name"] for c in coco.loadCats(coco.getCatIds())},
            "min_size": list(cfg.data.min_size), "max_size": cfg.data.max_size,
            "input": "one image [3, H, W], float pixels in [0, 1], RGB"}


def _validation_images(loader, count: int) -> List[torch.Tensor]:
    found: List[torch.Tensor] = []
    for images, _ in loader:
        found += [image.float() for image in images][: count - len(found)]
        if len(found) >= count:
            break
    if not found:
        raise ExportError("the detection run's validation split is empty: no images to check the export on")
    return found


def _save(model: nn.Module, example: torch.Tensor, metadata: Dict[str, Any], path: Path) -> None:
    onnx = require("onnx", "deepkd export --format onnx")
    dynamic = {"images": {1: "height", 2: "width"}, **{name: {0: "detections"} for name in OUTPUTS}}
    with quiet():
        torch.onnx.export(model, ([example],), str(path), dynamo=False, opset_version=OPSET, input_names=["images"],
                          output_names=list(OUTPUTS), dynamic_axes=dynamic)
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"deepkd.{key}", json.dumps(value)
    onnx.save(proto, str(path))


def _compare(model: nn.Module, path: Path, images: List[torch.Tensor]) -> Dict[str, Any]:
    """Largest relative difference of boxes and scores, the number of images whose detections (count
    or labels) differ, and PyTorch's detection count, ONNX Runtime against PyTorch."""
    session = cpu_session(path)
    worst, mismatched, detections = 0.0, 0, 0
    for image in images:
        with torch.no_grad():
            reference = model([image])[0]
        got = dict(zip(OUTPUTS, (torch.from_numpy(a) for a in session.run(list(OUTPUTS), {"images": image.numpy()}))))
        same, difference = _agree(got, reference)
        mismatched += not same
        worst, detections = max(worst, difference), detections + len(reference["boxes"])
    return {"max_rel_diff": worst, "mismatched": mismatched, "detections": detections}


def _agree(got: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> Tuple[bool, float]:
    if got["boxes"].shape != reference["boxes"].shape or not torch.equal(got["labels"], reference["labels"]):
        return False, 0.0
    difference = 0.0
    for name in ("boxes", "scores"):
        expected = reference[name].float()
        if expected.numel():
            relative = (got[name].float() - expected).abs() / expected.abs().clamp(min=1.0)
            difference = max(difference, relative.max().item())
    return True, difference
