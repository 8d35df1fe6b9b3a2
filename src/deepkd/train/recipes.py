"""Shipped recipes: the YAML files under the repository's ``configs/`` folder."""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import List, Optional


def recipes_dir() -> Path:
    """``configs/`` of the source checkout (editable installs) or of the current directory."""
    for candidate in (Path(__file__).resolve().parents[3] / "configs", Path.cwd() / "configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("no configs/ folder found beside the deepkd sources or in the current directory")


def list_recipes(pattern: Optional[str] = None) -> List[Path]:
    """Every shipped recipe, relative to the repository root, filtered by a shell pattern."""
    root = recipes_dir()
    paths = sorted(root.rglob("*.yaml"))
    if pattern:
        paths = [p for p in paths if fnmatch.fnmatch(str(p.relative_to(root)), f"*{pattern}*")]
    return [p.relative_to(root.parent) for p in paths]
