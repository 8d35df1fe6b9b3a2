"""ONNX: written by ``torch.onnx.export``, read by ONNX Runtime (CPU provider).

The dynamo exporter (``dynamo=True``, torch.export underneath; needs ``onnxscript``) is tried first;
when it fails, the TorchScript-based exporter (``dynamo=False``) writes the file, and the exporter
used is reported and stored as ``deepkd.exporter``. The batch dimension is dynamic. The weights stay
inside the one ``.onnx`` file (no external data: a student is far below protobuf's 2 GiB).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch
from torch import nn

from deepkd.deploy.metadata import INPUT_NAME, OUTPUT_NAME, from_properties, short_reason, to_properties
from deepkd.errors import MissingPackageError, WeightsError

INSTALL = 'pip install -c constraints.txt "deepkd[deploy]"'
OPSET = 18  # the TorchScript-based exporter's opset; the dynamo exporter picks its own


def require(package: str, purpose: str):
    """Import an optional package of the ``deploy`` extra, or say in one sentence how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise MissingPackageError(f"{purpose} needs the {package} package, which is not installed: {INSTALL}") from None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Exporters print progress and deprecation warnings; deepkd reports what matters itself."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def save_onnx(model: nn.Module, example: torch.Tensor, metadata: Mapping[str, Any], path: Path) -> str:
    """Write ``path``; returns the exporter used (``dynamo``, or ``torchscript (dynamo failed: ...)``)."""
    onnx = require("onnx", "deepkd export --format onnx")
    try:
        with quiet():
            torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: "batch"},))
        exporter = "dynamo"
    except Exception as err:  # whatever stops the new exporter, the TorchScript-based one may still work
        reason = short_reason(err)
        Path(path).unlink(missing_ok=True)
        with quiet():
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        exporter = f"torchscript (the dynamo exporter failed: {reason})"
    proto = onnx.load(str(path))
    for key, value in to_properties({**metadata, "exporter": exporter}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return exporter


def cpu_session(path: Path, threads: Optional[int] = None):
    """An ONNX Runtime session of ``path`` on the CPU, logging errors only (deepkd's own messages say
    what went wrong), with ``threads`` intra-op threads (None: ONNX Runtime's default)."""
    runtime = require("onnxruntime", f"running {str(path)!r}")
    options = runtime.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return runtime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_onnx(path: Path) -> Tuple[Callable[[torch.Tensor], torch.Tensor], Dict[str, Any]]:
    """``(forward, metadata)`` of an ONNX file run by ONNX Runtime on the CPU."""
    try:
        session = cpu_session(path)
    except MissingPackageError:
        raise
    except Exception as err:  # ONNX Runtime's own error types (InvalidProtobuf, Fail, InvalidGraph, ...)
        raise WeightsError(f"{str(path)!r} is damaged or not an ONNX model ({short_reason(err)})") from None
    metadata = from_properties(session.get_modelmeta().custom_metadata_map, str(path))
    names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise WeightsError(f"{str(path)!r} has inputs {names[0]} and outputs {names[1]}, not deepkd's "
                           f"[{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]: export it again with deepkd export")

    def forward(images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        try:
            return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])
        except Exception as err:  # ONNX Runtime's errors derive from Exception only: give them torch's type
            raise RuntimeError(f"ONNX Runtime: {short_reason(err)}") from err

    return forward, metadata
