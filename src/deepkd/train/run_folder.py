"""Claiming a run folder: what every ``deepkd train`` does before its first write, for any task.

``<output_dir>/<experiment>/seed<seed>`` holds one run. :func:`claim_run_folder` takes the folder's
lock on rank 0 (:mod:`deepkd.train.lock`; ``RANK``, set by torchrun, names rank 0 before the process
group exists), refuses a folder that already holds a run unless resuming, removes the temporary
files of a writer killed mid-save, and on a resume checks the config against the stored one
(:func:`deepkd.train.config.check_resume`).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import yaml

from deepkd.errors import MissingFileError, RunExistsError
from deepkd.train.checkpoint import load_checkpoint, remove_stale_temporaries
from deepkd.train.config import check_resume
from deepkd.train.lock import acquire_run_lock
from deepkd.train.run_config import RunConfig


def run_directory(cfg: RunConfig) -> Path:
    """``<output_dir>/<experiment>/seed<seed>``: one folder per seed, so summaries group seeds."""
    return Path(cfg.output_dir) / cfg.experiment / f"seed{cfg.seed}"


def stored_config(last: str | Path) -> Dict[str, Any]:
    """The config a run folder's ``last.pt`` was trained with: the checkpoint's own (classification)
    or the folder's ``config.yaml`` (detection checkpoints hold none)."""
    last = Path(last)
    ckpt = load_checkpoint(last)
    if "config" in ckpt:
        return ckpt["config"]
    path = last.parent / "config.yaml"
    if not path.is_file():
        raise MissingFileError(f"{str(last)!r} holds no config and {str(path)!r} is missing: cannot check --resume")
    return yaml.safe_load(path.read_text())


@contextlib.contextmanager
def claim_run_folder(cfg: RunConfig, run_dir: Optional[str | Path], *, resume: bool) -> Iterator[Tuple[Path, bool]]:
    """``with claim_run_folder(cfg, run_dir, resume=...) as (run_dir, resuming):`` the folder is this
    run's for the block; ``resuming`` is True when ``resume`` was asked and ``last.pt`` exists."""
    run_dir = Path(run_dir) if run_dir is not None else run_directory(cfg)
    last = run_dir / "last.pt"
    main = int(os.environ.get("RANK", "0")) == 0
    with acquire_run_lock(run_dir) if main else contextlib.nullcontext():
        if not resume and last.exists():
            raise RunExistsError(f"run directory {str(run_dir)!r} already holds a checkpoint; "
                                 "pass --resume to continue it or choose another experiment name")
        if main:
            remove_stale_temporaries(run_dir)  # of a writer killed mid-save; the lock says it is gone
        resuming = resume and last.exists()
        if resuming:  # the CLI checks this before; library callers get the same rule
            check_resume(stored_config(last), cfg, str(last))
        yield run_dir, resuming
