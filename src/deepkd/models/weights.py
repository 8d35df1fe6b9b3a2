"""Strict weight loading and saving in the formats users bring.

``load_weights`` accepts a plain state_dict, the community CIFAR teacher format
``{"model": state_dict}`` (``<name>_vanilla/ckpt_epoch_240.pth``), torchvision ImageNet
state_dicts, deepkd's own run checkpoints (``{"format": "deepkd", "model": ..., ...}``), a
``module.`` prefix left by DistributedDataParallel, and ``.safetensors`` files. Files are read
with ``torch.load(..., weights_only=True)``, allowing only the plain data that the community's
training scripts pickle next to the weights (``argparse.Namespace``, numpy scalars): a checkpoint that
needs arbitrary code to unpickle is refused.
"""
from __future__ import annotations

import argparse
import contextlib
import pickle
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

from deepkd.errors import MissingFileError, WeightsError

StateDict = Dict[str, torch.Tensor]


def community_checkpoint_globals():
    """A context in which ``torch.load(..., weights_only=True)`` also rebuilds what training scripts
    pickle next to the weights: ``argparse.Namespace`` (the run's options) and numpy scalars (an
    accuracy). Both rebuild plain data; no other code can run."""
    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5: plain weights_only loading
        return contextlib.nullcontext()
    scalar = np.float64(0).__reduce__()[0]
    dtypes = [getattr(getattr(np, "dtypes", None), n, None)  # numpy >= 1.25 has one class per dtype
              for n in ("Float64DType", "Float32DType", "Int64DType", "Int32DType")]
    dtypes = [d for d in dtypes if d is not None]
    # numpy 1.x (which wrote the 2019 files) names the scalar builder numpy.core, numpy 2 numpy._core
    return torch.serialization.safe_globals([argparse.Namespace, np.dtype, *dtypes,
                                             (scalar, "numpy.core.multiarray.scalar"),
                                             (scalar, "numpy._core.multiarray.scalar")])


def read_weights(path: Path) -> object:
    """The loaded object of a weights file (``.safetensors`` or a ``weights_only`` torch pickle)."""
    if not path.is_file():
        raise MissingFileError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise WeightsError(f"{str(path)!r} is not a readable .safetensors file ({err})") from None
    try:
        with community_checkpoint_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(f"{str(path)!r} needs arbitrary code to load (pickled objects, not only tensors); "
                           "deepkd loads weights with weights_only=True and refuses it "
                           f"({str(err).splitlines()[0][:160]})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise WeightsError(f"{str(path)!r} is corrupt or not a PyTorch checkpoint "
                           f"({str(err).splitlines()[0][:160]})") from None


def extract_state_dict(obj: object, source: str = "checkpoint") -> StateDict:
    """The model's state_dict inside a loaded checkpoint, with any ``module.`` prefix removed."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]  # community teachers and deepkd run checkpoints
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{source} holds no state_dict (expected a mapping of tensors, a 'model' entry or a "
                         "'state_dict' entry)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _mismatch(model: nn.Module, state: StateDict, source: str) -> List[str]:
    own = model.state_dict()
    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {list(state[k].shape)}, model {list(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if shapes:
        problems.append("shape mismatch " + "; ".join(shapes[:3]) + (" ..." if len(shapes) > 3 else ""))
    if missing:
        problems.append(f"{len(missing)} keys missing from the checkpoint (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    return problems


def load_weights(model: nn.Module, source: Union[str, Path, Mapping], *, strict: bool = True,
                 name: Optional[str] = None) -> nn.Module:
    """Load weights into ``model`` strictly; a mismatch names the file (or ``name``), keys and shapes."""
    name = name or (str(source) if isinstance(source, (str, Path)) else "state_dict")
    obj = read_weights(Path(source)) if isinstance(source, (str, Path)) else source
    state = extract_state_dict(obj, name)
    adapt = getattr(model, "adapt_state_dict", None)
    if adapt is not None:
        state = adapt(state)
    problems = _mismatch(model, state, name)
    if problems and strict:
        arch = getattr(model, "deepkd_name", type(model).__name__)
        raise WeightsError(f"{name} does not fit model {arch!r} (wrong architecture or class count?): "
                         + "; ".join(problems))
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape},
                          strict=strict)
    return model


def save_weights(model: nn.Module, path: Union[str, Path]) -> Path:
    """Save the state_dict as ``.safetensors`` or (any other suffix) a plain ``torch.save`` file."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (what the papers' parameter counts count)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
