"""Strict run configuration: pydantic models, YAML recipes and ``key=value`` overrides.

Every section forbids unknown keys; a misspelled key at any depth is one error that names the
closest valid key. Method arguments are checked against the method builder's signature, so the
defaults live in one place (the function signature), not here.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deepkd.registry import closest


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema (one sentence per problem)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Strict):
    """The offline synthetic set (``data.dataset: synthetic``)."""

    num_train: int = 10000
    num_test: int = 2000
    seed: int = 0
    noise: float = 1.5


FOLDER_KEYS = ("train_folder", "val_folder", "image_size", "resize", "crop", "interpolation", "mean", "std",
               "in_memory")


class DataConfig(_Strict):
    """The dataset and its loaders. Image-folder keys left unset (null) take the teacher's (else the
    student's) timm pretrained data config, then the defaults of :class:`deepkd.data.FolderOptions`."""

    dataset: Literal["cifar100", "cifar10", "tinyimagenet", "imagenet", "imagefolder", "synthetic"] = "cifar100"
    root: Optional[str] = None
    download: bool = True
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(256, gt=0)
    num_workers: int = Field(2, ge=0)
    drop_last: bool = False
    flip: bool = True
    synthetic: SyntheticConfig = SyntheticConfig()
    # image folders (imagenet, imagefolder) only
    train_folder: Optional[str] = None
    val_folder: Optional[str] = None
    image_size: Optional[int] = Field(None, gt=0)
    resize: Optional[int] = Field(None, gt=0)
    crop: Optional[Literal["random_resized", "pad_crop"]] = None
    interpolation: Optional[Literal["bilinear", "bicubic", "nearest"]] = None
    mean: Union[Literal["auto"], List[float], None] = None
    std: Optional[List[float]] = None
    in_memory: Optional[Literal["auto", "on", "off"]] = None

    @model_validator(mode="after")
    def _check_used(self) -> "DataConfig":
        unused = [k for k in FOLDER_KEYS if getattr(self, k) is not None]
        if unused and self.dataset not in ("imagenet", "imagefolder"):
            raise ValueError(f"dataset {self.dataset!r} does not use data.{unused[0]} (image-folder datasets only: "
                             "imagenet, imagefolder)")
        if (self.mean == "auto") != (self.std is None) and self.mean is not None:
            raise ValueError("mean: auto measures std too (leave std unset); a list of means needs a list of stds")
        if self.std is not None and self.mean is None:
            raise ValueError("std is set without mean")
        return self


class ModelConfig(_Strict):
    name: str
    weights: Optional[str] = None


class MethodConfig(BaseModel):
    """``name`` plus the method's own keyword arguments, checked against its builder signature."""

    model_config = ConfigDict(extra="allow")
    name: str = "ce"

    @model_validator(mode="after")
    def _check_arguments(self) -> "MethodConfig":
        from deepkd.losses import registry as method_registry

        try:
            builder = method_registry.METHODS.get(self.name)
        except KeyError as err:
            raise ValueError(str(err).strip('"')) from None
        params = inspect.signature(builder).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        valid = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        for key in self.arguments():
            if not takes_any and key not in valid:
                hint = closest(key, valid + ["name"])
                near = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ValueError(f"method {self.name!r} has no argument {key!r}{near}")
        return self

    def arguments(self) -> Dict[str, Any]:
        """The keyword arguments passed to the method builder."""
        return dict(self.model_extra or {})


class OptimizerConfig(_Strict):
    """``sgd``: torch.optim.SGD on the summed loss; ``decoupled``: one momentum per stream."""

    name: Literal["sgd", "decoupled"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    stream_momentum: Dict[Literal["task", "target", "non_target"], float] = {
        "task": 0.825, "target": 0.825, "non_target": 0.95}
    weight_decay: float = Field(5e-4, ge=0)
    weight_decay_stream: Literal["task", "target", "non_target"] = "target"
    nesterov: bool = False
    merge_equal: bool = True


class ScheduleConfig(_Strict):
    """``step``: lr * gamma^(#milestones < epoch); ``cosine``: linear warm-up then cosine to min_lr."""

    name: Literal["step", "cosine"] = "step"
    epochs: int = Field(240, gt=0)
    milestones: List[int] = [150, 180, 210]
    gamma: float = 0.1
    warmup_epochs: int = 0
    warmup_start_factor: float = 0.1
    min_lr: float = 0.0


class TrainConfig(_Strict):
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    gsnr_every: int = Field(0, ge=0)
    gsnr_samples: int = Field(32, gt=1)
    log_every: int = Field(50, gt=0)
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    tensorboard: Literal["auto", "on", "off"] = "auto"
    wandb: bool = False
    wandb_project: str = "deepkd"
    stop_after_steps: int = Field(0, ge=0)
    teacher_cache: bool = False
    teacher_cache_dtype: Literal["bf16", "fp32"] = "bf16"


class RunConfig(_Strict):
    """A complete, resolved run: what ``deepkd train`` reads from a recipe."""

    experiment: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = DataConfig()
    student: ModelConfig
    teacher: Optional[ModelConfig] = None
    method: MethodConfig = MethodConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()


def _fields_at(loc: Sequence[Any]) -> List[str]:
    """Valid key names of the section addressed by a pydantic error location."""
    model: Any = RunConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _describe(error: Dict[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    where = ".".join(loc) or "<root>"
    if error["type"] == "extra_forbidden":
        hint = closest(loc[-1], _fields_at(error["loc"][:-1]))
        near = f"; did you mean {'.'.join(loc[:-1] + [hint[0]])!r}?" if hint else ""
        return f"unknown key {where!r}{near}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}"


def validate_config(raw: Dict[str, Any], source: str = "config") -> RunConfig:
    """Build a :class:`RunConfig` from plain data, turning schema errors into :class:`ConfigError`."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        lines = [_describe(e) for e in err.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def parse_override(text: str) -> tuple:
    """``"optimizer.lr=0.1"`` -> ``(["optimizer", "lr"], 0.1)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


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


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML recipe (or start empty), apply overrides, validate strictly."""
    raw: Dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {str(path)!r} must hold a mapping at the top level")
        source = str(path)
    return validate_config(apply_overrides(raw, overrides), source)


def config_to_dict(cfg: RunConfig) -> Dict[str, Any]:
    """Plain nested data (str/int/float/bool/list/dict) for YAML files and checkpoints."""
    data = cfg.model_dump(mode="json")
    data["method"] = {"name": cfg.method.name, **cfg.method.arguments()}
    return data


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
