"""One run from a recipe: what ``deepkd train`` does once its arguments are parsed, for any caller.

:func:`run_recipe` reads a recipe (a shipped recipe's name or a YAML file) with ``key.path=value``
overrides, or takes a run folder to continue, and trains (:func:`deepkd.train.loop.train`, which
claims the folder and checks a resume against the config stored in ``last.pt``). ``deepkd train``
(:mod:`deepkd.cli`), ``deepkd sweep``'s in-process jobs (:mod:`deepkd.commands.sweep`) and a user's
own script call it the same way::

    from deepkd.train.runner import run_recipe
    summary = run_recipe("cifar100/resnet32x4-resnet8x4/dkd", ["optimizer.lr=0.1"])
    summary = run_recipe("runs/dkd/seed0", resume=True)   # continue a run folder
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from deepkd.engine.run_folder import stored_config
from deepkd.errors import ConfigError
from deepkd.train.config import apply_overrides, load_config
from deepkd.train.config_errors import validate_config
from deepkd.train.loop import train
from deepkd.train.run_config import RunConfig


def recipe_config(recipe: str | Path, overrides: Sequence[str] = (), *,
                  resume: bool = False) -> Tuple[RunConfig, Optional[Path]]:
    """The run's config and folder (None: the recipe's own, ``<output_dir>/<experiment>/seed<seed>``).

    ``recipe`` is a shipped recipe's name, a YAML file, or (with ``resume``) a run folder, whose
    config is the one stored in its ``last.pt``. With ``resume``, :func:`deepkd.train.loop.train` checks
    that the config is the stored one except for how the run is watched
    (:func:`deepkd.train.config.check_resume`); a run folder without ``resume`` is a
    :class:`~deepkd.errors.ConfigError`.
    """
    if Path(recipe).is_dir():
        if not resume:
            raise ConfigError(f"{str(recipe)!r} is a run folder: add --resume to continue it")
        run_dir = Path(recipe)
        last = run_dir / "last.pt"
        cfg = validate_config(apply_overrides(copy.deepcopy(stored_config(last)), overrides), str(last))
    else:
        cfg, run_dir = load_config(recipe, overrides), None
    return cfg, run_dir


def run_recipe(recipe: str | Path, overrides: Sequence[str] = (), *, resume: bool = False) -> Dict[str, Any]:
    """Train one run of ``recipe`` (a shipped recipe's name, a YAML file, or with ``resume`` a run
    folder) with ``overrides`` (``"optimizer.lr=0.1"``); ``resume`` continues from the run folder's
    ``last.pt`` when there is one (:func:`recipe_config`). Returns the run's summary, also written to
    its ``summary.json``."""
    cfg, run_dir = recipe_config(recipe, overrides, resume=resume)
    return train(cfg, resume=resume, run_dir=run_dir)
