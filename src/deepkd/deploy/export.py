"""``deepkd export``: a run's student as an ONNX, TorchScript or torch.export file, checked before it is kept.

The file is written beside its final name, read back with its own runtime (ONNX Runtime, the
TorchScript loader, ``torch.export.load``) and compared with the PyTorch student on real test images
of the run's dataset, fed in batches of 1, 7 and the rest (so a batch size frozen into the graph
shows). Only a file within the tolerance replaces the final name; otherwise nothing is written. A
detection run's detector goes to ONNX through :mod:`deepkd.deploy.detection`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from deepkd.deploy.detection import export_detector
from deepkd.deploy.formats import FORMATS
from deepkd.deploy.metadata import check_input, check_tolerance, verify
from deepkd.deploy.run import load_run, read_run_config, validation_images
from deepkd.errors import ConfigError, ExportError, UnknownNameError


def export_run(run_dir: str | Path, format: str = "onnx", out: Optional[str | Path] = None, *,
               tolerance: float = 1e-4, images: int = 64) -> Dict[str, Any]:
    """Export the student of ``run_dir``; returns what was checked: ``file``, ``format``, ``exporter``,
    ``images`` (how many test images), ``max_abs_diff`` (largest |logit difference| against PyTorch),
    ``top1_agreement`` (fraction of images with the same top-1 class), ``tolerance``, ``bytes``."""
    if format not in FORMATS:
        raise UnknownNameError(f"unknown export format {format!r}: choose {', '.join(FORMATS)}")
    if images < 1:
        raise ConfigError(f"images={images}: the parity check needs at least one test image")
    chosen, out = FORMATS[format], Path(out) if out is not None else None
    cfg = read_run_config(Path(run_dir))
    if cfg.detection:
        return export_detector(cfg, Path(run_dir), format, out, tolerance=tolerance, images=images)
    run = load_run(run_dir)
    out = out if out is not None else run.run_dir / chosen.file_name
    batch = validation_images(run.cfg, images)
    example = check_input(run.metadata)
    with torch.no_grad():
        reference, check = run.model(batch).float(), run.model(example).float()
    metadata = {**run.metadata, "tolerance": tolerance,
                "check": {"logits": check.tolist(), "tolerance": check_tolerance(tolerance, check)}}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    try:
        exporter = chosen.save(run.model, example, metadata, partial)
        forward, _ = chosen.load(partial)
        verify(forward, metadata, str(partial))
        parity = compare(reference, in_batches(forward, batch))
        if not parity["max_abs_diff"] <= tolerance:  # NaN-safe
            raise ExportError(
                f"{str(out)!r} not written: the {format} model's logits differ from the PyTorch student's by up to "
                f"{parity['max_abs_diff']:.3g} on {len(batch)} test images, past the tolerance {tolerance:g} "
                "(raise it with --tolerance if that is acceptable)")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return {"file": str(out), "format": format, "exporter": exporter, "dataset": run.cfg.data.dataset,
            "images": len(batch), **parity, "tolerance": tolerance, "bytes": out.stat().st_size}


def in_batches(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """``forward`` over ``images`` in batches of 1, 7 and the rest, concatenated."""
    cuts = [0] + [c for c in (1, 8) if c < len(images)] + [len(images)]
    return torch.cat([forward(images[a:b]).float() for a, b in zip(cuts, cuts[1:])])


def compare(reference: torch.Tensor, logits: torch.Tensor) -> Dict[str, float]:
    """Largest |difference| and top-1 agreement of two ``[n, classes]`` logit tensors."""
    if logits.shape != reference.shape:
        raise ExportError(f"the exported model returns logits of shape {list(logits.shape)}, the student "
                          f"{list(reference.shape)}")
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return {"max_abs_diff": (logits - reference).abs().max().item(), "top1_agreement": agree}


def format_report(report: Dict[str, Any]) -> str:
    """The lines ``deepkd export`` prints."""
    if report.get("task") == "detection":
        return "\n".join([
            f"exporter: {report['exporter']}",
            f"parity on {report['images']} validation images of {report['dataset']}, one at a time: the same "
            f"{report['detections']} detections (count and labels), boxes and scores within "
            f"{report['max_rel_diff']:.2e} relative (tolerance {report['tolerance']:g})",
            f"wrote {report['file']} ({report['bytes'] / 1e6:.2f} MB)"])
    agreed = round(report["top1_agreement"] * report["images"])
    return "\n".join([
        f"exporter: {report['exporter']}",
        f"parity on {report['images']} test images of {report['dataset']} (batches of 1, 7 and the rest): "
        f"max |logit difference| {report['max_abs_diff']:.2e} (tolerance {report['tolerance']:g}), "
        f"top-1 agreement {100 * report['top1_agreement']:.1f}% ({agreed}/{report['images']})",
        f"wrote {report['file']} ({report['bytes'] / 1e6:.2f} MB)"])
