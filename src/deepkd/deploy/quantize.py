"""``deepkd quantize``: int8 post-training quantisation of a run's student, measured before it is kept.

The student is exported to ONNX (:func:`deepkd.deploy.export.export_run`, parity-checked), prepared by
ONNX Runtime's ``quant_pre_process`` (shape inference, graph optimisation) and quantised statically by
``onnxruntime.quantization.quantize_static``: QDQ format, int8 weights (per output channel by default),
uint8 activations (the u8s8 pair ONNX Runtime's x86 kernels run fastest), activation ranges calibrated on
``calibration`` training images as the training pipeline delivers them (the inputs the student learned
on; the test split stays unseen for the measurement). Then both files run in ONNX Runtime on the whole
test split (or its first ``images``): top-1 of each, the drop in points, and the median latency of each
at batch 1 and 32 on this machine's CPU, as a ratio measured side by side.

Why ONNX Runtime and not PyTorch's PT2E flow: measured side by side on the Fashion-MNIST student
(``benchmarks/quantize_pt2e.py``, BENCHMARKS.md "int8 settings"), both int8 models lose under 0.1 point,
but PT2E's int8 graph under ``torch.compile`` ran no faster than the compiled fp32 one (0.89x / 0.98x at
batch 1 / 32) while ONNX Runtime's int8 graph ran faster than its fp32 one (1.14x at batch 1); PT2E also
lives in ``torchao`` (one more dependency pinned to the torch version) and needs a C++ compiler at run
time, and the ONNX file ships to any ONNX Runtime. ``benchmarks/quantize_choices.py`` measures the
calibration and weight-scale choices (the defaults are the ones it supports).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch

from deepkd.deploy.export import export_run
from deepkd.deploy.metadata import check_input, to_properties
from deepkd.deploy.onnx_format import cpu_session, load_onnx, quiet, require
from deepkd.deploy.run import RunModel, load_run
from deepkd.errors import ConfigError, ExportError, UnknownNameError
from deepkd.models.cost import latencies_in_turns
from deepkd.train import build

CALIBRATIONS = ("minmax", "percentile", "entropy")
INT8_CHECK_RELATIVE = 0.02  # int8 kernels round differently across CPUs (VNNI or not): 2% of the logit scale


def quantize_run(run_dir: str | Path, out: Optional[str | Path] = None, *, calibration: int = 256,
                 calibrate: str = "minmax", per_channel: bool = True, images: Optional[int] = None,
                 batch_sizes=(1, 32), repeats: int = 50, warmup: int = 10, threads: int = 1,
                 max_drop: Optional[float] = None) -> Dict[str, Any]:
    """Write ``student.int8.onnx`` (or ``out``) for the run in ``run_dir``; returns what was measured:
    ``top1`` ({"fp32", "int8"}), ``drop`` (points), ``latency_ms`` ({"fp32", "int8"} per batch size),
    ``speedup`` (fp32/int8 per batch size), ``bytes``, ``images``, and how it was quantised.
    With ``max_drop`` (points), a larger drop keeps nothing and raises :class:`ExportError`."""
    if calibrate not in CALIBRATIONS:
        raise UnknownNameError(f"unknown calibration {calibrate!r}: choose {', '.join(CALIBRATIONS)}")
    if calibration < 1:
        raise ConfigError(f"calibration={calibration}: calibrating needs at least one training image")
    run = load_run(run_dir)
    out = Path(out) if out is not None else run.run_dir / "student.int8.onnx"
    with tempfile.TemporaryDirectory(prefix="deepkd-quantize-") as tmp:
        fp32 = Path(tmp) / "student.onnx"
        export_run(run.run_dir, "onnx", fp32)
        partial = Path(tmp) / "student.int8.onnx"
        settings = _quantize(run, fp32, partial, calibration, calibrate, per_channel)
        report = _measure(run, fp32, partial, images, batch_sizes, repeats, warmup, threads)
        if max_drop is not None and not report["drop"] <= max_drop:
            raise ExportError(f"{str(out)!r} not written: int8 top-1 {report['top1']['int8']:.2f} is "
                              f"{report['drop']:.2f} points below fp32's {report['top1']['fp32']:.2f}, past "
                              f"--max-drop {max_drop:g} (try --calibrate percentile or entropy, or more --calibration)")
        report["bytes"] = {"fp32": fp32.stat().st_size, "int8": partial.stat().st_size}
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # the temporary folder may be another disk
        shutil.copyfile(partial, staged)
        os.replace(staged, out)
    return {"file": str(out), "dataset": run.cfg.data.dataset, "student": run.cfg.student.name, **settings,
            **report}


def _quantize(run: RunModel, fp32: Path, out: Path, calibration: int, calibrate: str,
              per_channel: bool) -> Dict[str, Any]:
    """Quantise ``fp32`` into ``out`` and store the metadata (with the int8 model's own check logits)."""
    onnx = require("onnx", "deepkd quantize")
    quantization = require("onnxruntime.quantization", "deepkd quantize")
    prepared = fp32.with_name("prepared.onnx")
    with quiet():
        try:
            quantization.quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        except Exception:  # pre-processing only helps: quantise the exported graph as it is
            prepared = fp32
        reader = _Calibration(run, calibration)
        method = {"minmax": quantization.CalibrationMethod.MinMax,
                  "percentile": quantization.CalibrationMethod.Percentile,
                  "entropy": quantization.CalibrationMethod.Entropy}[calibrate]
        quantization.quantize_static(
            str(prepared), str(out), reader, quant_format=quantization.QuantFormat.QDQ, per_channel=per_channel,
            activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
            calibrate_method=method)
    settings = {"format": "QDQ", "weights": f"int8 {'per channel' if per_channel else 'per tensor'}",
                "activations": "uint8", "calibrate": calibrate, "calibration_images": reader.count,
                "calibration_source": "training split, as the training pipeline delivers it"}
    forward, _ = _session_forward(out, threads=1)
    logits = forward(check_input(run.metadata))
    tolerance = max(1e-3, INT8_CHECK_RELATIVE * max(1.0, logits.abs().max().item()))
    proto = onnx.load(str(out))
    del proto.metadata_props[:]
    metadata = {**run.metadata, "exporter": "onnxruntime.quantization.quantize_static", "quantization": settings,
                "check": {"logits": logits.tolist(), "tolerance": tolerance}}
    for key, value in to_properties(metadata).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    load_onnx(out)  # the file deepkd predict will read: it must carry complete metadata
    return settings


class _Calibration:
    """ONNX Runtime's ``CalibrationDataReader``: ``get_next()`` -> ``{"images": array}`` or None."""

    def __init__(self, run: RunModel, count: int):
        self.batches, self.count = [], 0
        for images in _training_images(run, count):
            self.batches.append({"images": images.numpy()})
            self.count += len(images)
        self.iterator = iter(self.batches)

    def get_next(self):
        return next(self.iterator, None)

    def rewind(self) -> None:
        self.iterator = iter(self.batches)


def _training_images(run: RunModel, count: int) -> Iterator[torch.Tensor]:
    """Up to ``count`` training images (the first view of a two-view method), in the training batches."""
    data = build.build_dataset(run.cfg, device=torch.device("cpu"), rank=0, world_size=1)
    have = 0
    for images, _ in data.train.iter_epoch(0):
        images = images[0] if isinstance(images, (tuple, list)) else images
        images = images.float()[: count - have].contiguous()
        yield images
        have += len(images)
        if have >= count:
            return


def _session_forward(path: Path, threads: int):
    session = cpu_session(path, threads)

    def forward(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(["logits"], {"images": images.contiguous().numpy()})[0])

    return forward, session


def _measure(run: RunModel, fp32: Path, int8: Path, images: Optional[int], batch_sizes, repeats: int, warmup: int,
             threads: int) -> Dict[str, Any]:
    """Top-1 of both files on the test split and their latency, side by side, in ONNX Runtime."""
    forwards = {"fp32": _session_forward(fp32, threads)[0], "int8": _session_forward(int8, threads)[0]}
    correct, seen = {"fp32": 0, "int8": 0}, 0
    data = build.build_dataset(run.cfg, device=torch.device("cpu"), rank=0, world_size=1)
    for batch, labels in data.test.iter_epoch(0):
        if images is not None:
            batch, labels = batch[: images - seen], labels[: images - seen]
        for name, forward in forwards.items():
            correct[name] += (forward(batch.float()).argmax(-1) == labels).sum().item()
        seen += len(labels)
        if images is not None and seen >= images:
            break
    top1 = {name: 100.0 * hits / seen for name, hits in correct.items()}
    shape = (run.metadata["channels"], run.metadata["input_size"], run.metadata["input_size"])
    per_batch = {str(b): latencies_in_turns(forwards, shape, b, repeats=repeats, warmup=warmup) for b in batch_sizes}
    latency = {name: {b: times[name] for b, times in per_batch.items()} for name in forwards}
    speedup = {b: latency["fp32"][b] / latency["int8"][b] for b in latency["fp32"]}
    return {"images": seen, "top1": top1, "drop": top1["fp32"] - top1["int8"], "latency_ms": latency,
            "speedup": speedup, "threads": threads, "repeats": repeats, "warmup": warmup}


def format_quantize(report: Dict[str, Any]) -> str:
    """The lines ``deepkd quantize`` prints."""
    top1, lines = report["top1"], []
    lines.append(f"int8 ({report['format']}, weights {report['weights']}, activations {report['activations']}, "
                 f"{report['calibrate']} calibration on {report['calibration_images']} training images)")
    lines.append(f"top-1 on {report['images']} test images of {report['dataset']}: fp32 {top1['fp32']:.2f}, "
                 f"int8 {top1['int8']:.2f} ({-report['drop']:+.2f} points)")
    for batch, ratio in report["speedup"].items():
        fp32, int8 = report["latency_ms"]["fp32"][batch], report["latency_ms"]["int8"][batch]
        lines.append(f"ONNX Runtime CPU latency, batch {batch}: fp32 {fp32:.2f} ms, int8 {int8:.2f} ms "
                     f"({ratio:.2f}x faster)")
    threads = f"{report['threads']} thread{'s' if report['threads'] != 1 else ''}"
    lines.append(f"latency: median of {report['repeats']} runs each, in turns, after {report['warmup']} warm-up "
                 f"runs, {threads}")
    size = report["bytes"]
    lines.append(f"wrote {report['file']} ({size['int8'] / 1e6:.2f} MB; fp32 {size['fp32'] / 1e6:.2f} MB)")
    return "\n".join(lines)
