"""Shipped recipes: the YAML files of the installed package's ``deepkd/configs`` folder (package data).

A recipe's name is its path there without ``.yaml``, e.g. ``cifar100/resnet32x4-resnet8x4/dkd``:
``deepkd train <name>`` and ``deepkd list recipes`` work from any folder once deepkd is installed.
"""
from __future__ import annotations

import fnmatch
from importlib import resources
from pathlib import Path
from typing import List, Optional

from deepkd.errors import ConfigError, MissingFileError
from deepkd.registry import closest


def recipes_dir() -> Path:
    """The ``configs`` folder inside the installed ``deepkd`` package."""
    folder = Path(str(resources.files("deepkd") / "configs"))
    if not folder.is_dir():
        raise MissingFileError(f"the shipped recipes are missing from this deepkd installation ({folder})")
    return folder


def list_recipes(pattern: Optional[str] = None) -> List[str]:
    """Every shipped recipe's name, sorted, filtered by a shell pattern (``"*resnet8x4*"`` for ``resnet8x4``)."""
    root = recipes_dir()
    names = sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))
    return [n for n in names if fnmatch.fnmatch(n, f"*{pattern}*")] if pattern else names


def find_recipe(recipe: str | Path) -> Path:
    """The recipe file: ``recipe`` itself when it is a file, else the shipped recipe of that name
    (``.yaml`` optional); a miss names the closest shipped recipes."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = recipes_dir() / path
    for candidate in (shipped, shipped.with_name(shipped.name + ".yaml")):
        if candidate.is_file():
            return candidate
    near = closest(str(recipe).removesuffix(".yaml"), list_recipes())
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    raise ConfigError(f"recipe {str(recipe)!r} does not exist: it is neither a file nor a shipped recipe "
                      f"(deepkd list recipes){hint}")
