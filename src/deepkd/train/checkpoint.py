"""Run checkpoints: atomic writes, every piece of state needed to resume bit for bit.

A checkpoint is a plain dict loadable with ``torch.load(..., weights_only=True)``:
``format``, ``model`` (student state_dict, no DDP prefix), ``optimizer``, ``epoch`` (1-based epoch
in progress), ``batch`` (batches of that epoch already done), ``step`` (global), ``topk`` (the DTM
K at that point), ``rng`` (torch CPU/CUDA, numpy, python), ``meters`` (partial-epoch sums),
``best`` (best top-1 so far) and ``config`` (the resolved run config as plain data).
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

FORMAT = "deepkd"


def rng_state() -> Dict[str, Any]:
    """All random-number-generator states, as tensors and plain data (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    """Load a deepkd checkpoint; a missing, truncated or foreign file is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError) as err:
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or not a deepkd checkpoint "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} is not a deepkd run checkpoint (no format={FORMAT!r} key)")
    return ckpt
