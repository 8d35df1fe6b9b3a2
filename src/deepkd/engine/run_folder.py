"""Claiming a run folder: what every run does before its first write, for any task.

``<output_dir>/<experiment>/seed<seed>`` holds one run. :func:`claim_run_folder` takes the folder's
lock on rank 0 (:mod:`deepkd.engine.lock`; ``RANK``, set by torchrun, names rank 0 before the process
group exists), refuses a folder that already holds a run unless resuming, removes the temporary
files of a writer killed mid-save, and on a resume checks the config against the stored one (the
``check`` the caller gives: :func:`deepkd.train.config.check_resume` for ``deepkd train``). This is
the one place a resume is checked.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import yaml

from deepkd.engine.checkpoint import load_checkpoint, remove_stale_temporaries
from deepkd.engine.lock import acquire_run_lock
from deepkd.errors import MissingFileError, RunExistsError

CheckResume = Callable[[Dict[str, Any], str], None]  # (stored config, where it is stored): raise to refuse


def run_directory(cfg: Any) -> Path:
    """``<output_dir>/<experiment>/seed<seed>`` of a config: one folder per seed, so summaries group seeds."""
    return Path(cfg.output_dir) / cfg.experiment / f"seed{cfg.seed}"


def stored_config(last: str | Path) -> Dict[str, Any]:
    """The config a run folder's ``last.pt`` was trained with: the checkpoint's own, or the folder's
    ``config.yaml`` (checkpoints written before detection stored theirs)."""
    last = Path(last)
    ckpt = load_checkpoint(last)
    if ckpt.get("config") is not None:
        return ckpt["config"]
    path = last.parent / "config.yaml"
    if not path.is_file():
        raise MissingFileError(f"{str(last)!r} holds no config and {str(path)!r} is missing: cannot check --resume")
    return yaml.safe_load(path.read_text())


@contextlib.contextmanager
def claim_run_folder(run_dir: str | Path, *, resume: bool, check: Optional[CheckResume] = None) -> Iterator[bool]:
    """``with claim_run_folder(run_dir, resume=..., check=...) as resuming:`` the folder is this run's
    for the block; ``resuming`` is True when ``resume`` was asked and ``last.pt`` exists, and then
    ``check(stored config, str(last.pt))`` has accepted the stored run."""
    run_dir = Path(run_dir)
    last = run_dir / "last.pt"
    main = int(os.environ.get("RANK", "0")) == 0
    with acquire_run_lock(run_dir) if main else contextlib.nullcontext():
        if not resume and last.exists():
            raise RunExistsError(f"run directory {str(run_dir)!r} already holds a checkpoint; "
                                 "pass --resume to continue it or choose another experiment name")
        if main:
            remove_stale_temporaries(run_dir)  # of a writer killed mid-save; the lock says it is gone
        resuming = resume and last.exists()
        if resuming and check is not None:
            check(stored_config(last), str(last))
        yield resuming
