"""Run checkpoints: atomic writes, every piece of state needed to resume bit for bit.

A checkpoint is a plain dict loadable with ``torch.load(..., weights_only=True)``:
``format``, ``model`` (student state_dict, no DDP prefix), ``optimizer``, ``epoch`` (1-based epoch
in progress), ``batch`` (batches of that epoch already done), ``step`` (global), ``topk`` (the DTM
K at that point), ``rng`` (torch CPU/CUDA, numpy, python), ``meters`` (partial-epoch sums),
``best`` (best top-1 so far) and ``config`` (the resolved run config as plain data).
"""
from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from deepkd.errors import MissingFileError, TrainingError, WeightsError

FORMAT = "deepkd"
TEMPORARY = ".{name}.tmp-{pid}"  # a writer's temporary file next to ``name`` (pid: one per writer)


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
    """Write to a temporary file in the same folder, fsync, rename over ``path``, fsync the folder.

    A failed write (disk full, permission denied, a signal's KeyboardInterrupt) removes the temporary
    file and leaves ``path`` as it was; an ``OSError`` becomes one :class:`TrainingError` sentence.
    """
    path = Path(path)
    tmp = path.with_name(TEMPORARY.format(name=path.name, pid=os.getpid()))
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes reach the disk before the rename can
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = _os_error(err)
        if cause is None:
            raise
        kept = "the previous checkpoint is intact" if path.exists() else "no earlier checkpoint existed there"
        raise TrainingError(f"could not write {path} ({cause.strerror or cause}); {kept}") from err
    _fsync_directory(path)


def _os_error(err: BaseException) -> Optional[OSError]:
    """The OSError behind ``err``: torch.save reports a failed write of its file as a RuntimeError
    ("unexpected pos ...") whose context is the OSError (ENOSPC, EIO, ...)."""
    for _ in range(4):
        if isinstance(err, OSError) or err is None:
            return err
        err = err.__cause__ or err.__context__
    return None


def _fsync_directory(path: Path) -> None:
    """Make the rename of ``path`` durable: without an fsync of its folder a power loss can bring
    back the old directory entry."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a folder; NTFS journals the rename
        return
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # some network file systems refuse a folder fsync
            raise TrainingError(f"wrote {path} but could not make its rename durable ({err.strerror})") from err


def remove_stale_temporaries(folder: str | Path) -> None:
    """Remove temporary files of writers killed mid-write (call only while holding the run lock)."""
    for tmp in Path(folder).glob(TEMPORARY.format(name="*", pid="*")):
        with contextlib.suppress(OSError):
            tmp.unlink()


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    """Load a deepkd checkpoint; a missing, truncated or foreign file is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError) as err:
        raise WeightsError(f"checkpoint {str(path)!r} is corrupt or not a deepkd checkpoint "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise WeightsError(f"checkpoint {str(path)!r} is not a deepkd run checkpoint (no format={FORMAT!r} key)")
    return ckpt
