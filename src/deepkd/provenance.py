"""Which code ran: the deepkd version and, for a git checkout, its commit and whether it had changes."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional

import deepkd

UNKNOWN = "unknown"


def _git(folder: Path, *args: str) -> Optional[str]:
    """``git <args>`` run in ``folder``: its stripped output, or None when git is missing or fails."""
    try:
        done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


@functools.lru_cache(maxsize=1)
def _provenance() -> tuple:
    folder = Path(deepkd.__file__).resolve().parent
    # A package installed inside some other repository (a venv in a project checkout) is not a deepkd
    # checkout: only trust git when it tracks the package's own __init__.py.
    if not _git(folder, "ls-files", "--", "__init__.py"):
        return deepkd.__version__, UNKNOWN, UNKNOWN
    commit = _git(folder, "rev-parse", "HEAD")
    status = _git(folder, "status", "--porcelain", "--", ".")
    if commit is None or status is None:
        return deepkd.__version__, UNKNOWN, UNKNOWN
    return deepkd.__version__, commit, bool(status)


def provenance() -> Dict[str, Any]:
    """``{"version": "0.1.0", "commit": "<sha1>", "dirty": False}`` for the deepkd code running.

    ``commit`` is ``git rev-parse HEAD`` of the package's folder and ``dirty`` whether ``git status``
    shows changed or new files under it (sources and shipped recipes), both when the package is a git
    checkout (an editable install); otherwise both are ``"unknown"`` (a wheel, git missing). Computed
    once per process: the code that runs is the code imported at start.
    """
    version, commit, dirty = _provenance()
    return {"version": version, "commit": commit, "dirty": dirty}
