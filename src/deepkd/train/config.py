"""From a recipe to a :class:`~deepkd.train.run_config.RunConfig` and back: YAML recipes and
``key=value`` overrides (:func:`load_config`), the resolved config written out
(:func:`config_to_dict`, :func:`save_config`), and the check that ``--resume`` keeps the stored run
(:func:`check_resume`).

The schema is in :mod:`deepkd.train.run_config` and its section modules, the error messages in
:mod:`deepkd.train.config_errors`; :class:`RunConfig` and :func:`validate_config` are importable
from here too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import yaml

from deepkd.errors import ConfigError
from deepkd.provenance import provenance
from deepkd.train.config_errors import validate_config
from deepkd.train.method_config import method_views
from deepkd.train.run_config import DETECTION_TRAIN_KEYS, RunConfig

__all__ = ["ConfigError", "RunConfig", "check_resume", "config_to_dict", "load_config", "save_config",
           "validate_config"]


# -- recipes and overrides ----------------------------------------------------------------------------
def parse_override(text: str) -> tuple:
    """``"optimizer.lr=0.1"`` -> ``(["optimizer", "lr"], 0.1)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value is not valid YAML") from None
    return key.strip().split("."), parsed


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Set dotted keys in a nested dict (creating sections), e.g. ``data.batch_size=128``."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return raw


def load_config(recipe: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a recipe (a YAML file, or a shipped recipe's name such as ``cifar100/resnet32x4-resnet8x4/dkd``),
    or start empty; apply overrides; validate strictly."""
    from deepkd.train.recipes import find_recipe

    raw: Dict[str, Any] = {}
    source = "overrides"
    if recipe is not None:
        path = find_recipe(recipe)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"recipe {str(path)!r} is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {str(path)!r} must hold a mapping at the top level")
        source = str(path)
    return validate_config(apply_overrides(raw, overrides), source)


def config_to_dict(cfg: RunConfig) -> Dict[str, Any]:
    """The resolved config as plain data (str/int/float/bool/list/dict) for YAML files and checkpoints:
    every key the run reads, with its default written out (method arguments too); none it ignores."""
    data = cfg.model_dump(mode="json")
    data["data"] = {k: v for k, v in data["data"].items() if k in cfg.data.used_keys()}
    data["method"] = {"name": cfg.method.name, **cfg.method.resolved_arguments()}
    if data["optimizer"].get("auto_momentum", "") is None:  # read only with stream_momentum: auto
        data["optimizer"].pop("auto_momentum")
    for role in ("student", "teacher"):  # weights_backbone: detectors only
        if data.get(role) is not None and not cfg.detection:
            data[role].pop("weights_backbone")
    if cfg.detection:
        data["train"] = {k: v for k, v in data["train"].items() if k in DETECTION_TRAIN_KEYS}
    elif method_views(cfg.method.name) == 1:
        data["train"].pop("student_views")
    return data


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """``config.yaml``: the resolved config headed by the code that ran it (``# version:``, ``# commit:``,
    ``# dirty:`` comment lines), so the file stays a recipe that ``deepkd train`` accepts."""
    header = "".join(f"# {line}\n" for line in yaml.safe_dump(provenance(), sort_keys=False).splitlines())
    Path(path).write_text(header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# -- resume -------------------------------------------------------------------------------------------
WATCH_KEYS = ("train.progress", "train.log_every", "train.tensorboard", "train.wandb", "train.wandb_project",
              "train.stop_after_steps", "train.checkpoint_every")  # how a run is watched, not what it computes
def _flatten(data: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(flat: Dict[str, Any], key: str) -> str:
    return repr(flat[key]) if key in flat else "(unset)"


def check_resume(stored: Dict[str, Any], cfg: RunConfig, source: str) -> None:
    """Raise :class:`ConfigError` unless ``cfg`` is the config stored in a checkpoint (``source``) up to
    the keys in :data:`WATCH_KEYS`; both sides are compared resolved, every default written out."""
    before = _flatten(config_to_dict(validate_config(stored, source)))
    after = _flatten(config_to_dict(cfg))
    keys = list(before) + [k for k in after if k not in before]
    changed = [k for k in keys if k not in WATCH_KEYS and (k in before, before.get(k)) != (k in after, after.get(k))]
    if changed:
        details = ", ".join(f"{k} {_show(before, k)} -> {_show(after, k)}" for k in changed)
        raise ConfigError(f"--resume would change the run stored in {source}: {details} (only "
                          f"{', '.join(WATCH_KEYS)} may change; start a new experiment for the rest)")
