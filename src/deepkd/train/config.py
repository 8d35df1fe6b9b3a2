"""Strict run configuration: pydantic models, YAML recipes and ``key=value`` overrides.

Every section forbids unknown keys; a misspelled key at any depth is one error that names the
closest valid key. No key is silently ignored: ``optimizer`` and ``schedule`` are one model per
``name`` (a key of another choice is an error naming the choice that uses it), ``data`` rejects the
keys its ``dataset`` does not read, method arguments are checked against the method builder's
signature, and a teacher section for a method without a teacher is an error.

Defaults live in one place, the builders' signatures (the method builders,
:class:`deepkd.optim.DecoupledMomentumSGD`, :func:`deepkd.optim.step_lr`,
:func:`deepkd.optim.cosine_lr`, :func:`deepkd.data.build_data`): the schema reads them from there.
It states only what no builder offers: ``lr``, ``epochs`` and ``milestones`` (CIFAR's 240-epoch
recipe) and plain SGD's settings (torch's own defaults are not the recipes').
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from deepkd.detection.coco import CocoDetection, DetectionLoader
from deepkd.detection.download import prepare_coco
from deepkd.detection.loop import warmup_multistep_lr
from deepkd.detection.synthetic import write_synthetic_coco
from deepkd.errors import ConfigError
from deepkd.optim import DecoupledMomentumSGD, cosine_lr, step_lr
from deepkd.provenance import provenance
from deepkd.registry import closest
from deepkd.train.auto_config import AutoMomentumChecks, AutoMomentumConfig
from deepkd.train.data_config import (  # noqa: F401  (re-exported: deepkd.train.config's names before the split)
    COMMON_DATA_KEYS,
    DATASET_KEYS,
    FASHION_MNIST_KEYS,
    FOLDER_KEYS,
    DataConfig,
    SyntheticConfig,
)
from deepkd.train.schema import _choice, _default, _Strict, check_used_keys

__all__ = ["ConfigError", "RunConfig", "check_resume", "config_to_dict", "load_config", "save_config",
           "validate_config"]


# -- detection data -----------------------------------------------------------------------------------
class DetectionSyntheticConfig(_Strict):
    """The offline synthetic COCO-format shapes (``data.dataset: synthetic_coco``,
    :func:`deepkd.detection.write_synthetic_coco`), written under ``data.root`` when missing."""

    num_train: int = Field(96, gt=0)
    num_val: int = Field(48, gt=0)
    image_size: int = Field(_default(write_synthetic_coco, "size"), gt=0)
    seed: int = _default(write_synthetic_coco, "seed")


DETECTION_DATASET_KEYS = {"coco": ("root", "download"), "synthetic_coco": ("root", "synthetic")}
COMMON_DETECTION_KEYS = ("dataset", "batch_size", "eval_batch_size", "num_workers", "flip", "min_size", "max_size")


class DetectionDataConfig(_Strict):
    """Detection data (``data.dataset: coco | synthetic_coco``): loaders of
    :class:`deepkd.detection.DetectionLoader`, and the detectors' input scale. ``min_size``: the
    shorter sides drawn per training batch (multi-scale); the test uses its last entry, as torchvision's
    ``GeneralizedRCNNTransform`` does. ``eval_batch_size`` null: ``batch_size``. ``root`` null:
    ``$DEEPKD_DATA`` or ``~/.cache/deepkd`` (COCO in ``<root>/coco``, the synthetic set in
    ``<root>/synthetic_coco``)."""

    dataset: Literal[tuple(DETECTION_DATASET_KEYS)]
    root: Optional[str] = None
    download: bool = _default(prepare_coco, "download")
    batch_size: int = Field(8, gt=0)
    eval_batch_size: Optional[int] = Field(None, gt=0)
    num_workers: int = Field(_default(DetectionLoader, "workers"), ge=0)
    flip: float = Field(_default(CocoDetection, "flip"), ge=0, le=1)
    min_size: List[int] = Field([800], min_length=1)
    max_size: int = Field(1333, gt=0)
    synthetic: DetectionSyntheticConfig = DetectionSyntheticConfig()

    def used_keys(self) -> Tuple[str, ...]:
        return COMMON_DETECTION_KEYS + DETECTION_DATASET_KEYS[self.dataset]

    @model_validator(mode="after")
    def _check_used(self) -> "DetectionDataConfig":
        check_used_keys(self, DETECTION_DATASET_KEYS)
        return self


def _data_tag(value: Any) -> str:
    dataset = value.get("dataset") if isinstance(value, dict) else getattr(value, "dataset", None)
    return "detection" if dataset in DETECTION_DATASET_KEYS else "classification"


AnyDataConfig = Annotated[Union[Annotated[DataConfig, Tag("classification")],
                                Annotated[DetectionDataConfig, Tag("detection")]], Discriminator(_data_tag)]


class ModelConfig(_Strict):
    """A model by name with its ``weights``; ``weights_backbone`` (``torchvision:<ENUM>``, the
    ImageNet backbone of a detection student) only for detectors."""

    name: str
    weights: Optional[str] = None
    weights_backbone: Optional[str] = None


# -- method -------------------------------------------------------------------------------------------
def _method_builder(name: str) -> Callable:
    from deepkd.losses import registry

    try:
        return registry.METHODS.get(name)
    except KeyError as err:
        raise ValueError(str(err).strip('"')) from None


def method_needs_teacher(name: str) -> bool:
    """Registry metadata ``needs_teacher``, else the Method class attribute (a builder function: True)."""
    from deepkd.losses import registry

    builder = _method_builder(name)
    return registry.METHODS.info(name).get("needs_teacher", getattr(builder, "needs_teacher", True))


def method_views(name: str) -> int:
    """Views per training image the method takes: 2 for MLKD/CRLD (weak, strong), else 1."""
    from deepkd.losses import registry

    return registry.METHODS.info(name).get("views", getattr(_method_builder(name), "views", 1))


def is_deepkd_method(name: str) -> bool:
    """A DeepKD method: registered with its ``base`` method, or taking the base as an argument."""
    from deepkd.losses import registry

    return "base" in registry.METHODS.info(name) or "base" in inspect.signature(_method_builder(name)).parameters


class MethodConfig(BaseModel):
    """``name`` plus the method's own keyword arguments, checked against its builder signature.

    The dynamic top-k mask's ``topk_*`` arguments need ``topk: true``, and ``topk: true`` needs an
    explicit ``topk_ramp_end`` (the epoch from which NCKD keeps every class; no default fits every
    schedule).
    """

    model_config = ConfigDict(extra="allow")
    name: str = "ce"

    @model_validator(mode="after")
    def _check_arguments(self) -> "MethodConfig":
        params = inspect.signature(_method_builder(self.name)).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        valid = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        for key in self.arguments():
            if not takes_any and key not in valid:
                hint = closest(key, valid + ["name"])
                near = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ValueError(f"method {self.name!r} has no argument {key!r}{near}")
        self._check_topk()
        return self

    def _check_topk(self) -> None:
        arguments, defaults = self.arguments(), _signature_defaults(self.name)
        if arguments.get("topk"):
            if arguments.get("topk_ramp_end") is None:
                raise ValueError("topk is on but topk_ramp_end is not set: give the epoch from which "
                                 "NCKD keeps every class (deepkd's choice: the first LR decay, e.g. 150 on CIFAR-100)")
            return
        ramp = [k for k in arguments if k.startswith("topk_") and arguments[k] != defaults.get(k)]
        if ramp:
            raise ValueError(f"{ramp[0]} is set but topk is off: set method.topk: true or remove it")

    def arguments(self) -> Dict[str, Any]:
        """The keyword arguments passed to the method builder."""
        return dict(self.model_extra or {})

    def resolved_arguments(self) -> Dict[str, Any]:
        """The builder's named arguments with their signature defaults, overridden by the recipe's."""
        return {**_signature_defaults(self.name), **self.arguments()}


def _signature_defaults(name: str) -> Dict[str, Any]:
    params = inspect.signature(_method_builder(name)).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


# -- optimizer and schedule ---------------------------------------------------------------------------
LR = 0.05  # the CIFAR recipes' learning rate: neither optimizer's signature has a usable default
EPOCHS = 240  # CIFAR's 240-epoch recipe: the schedules take ``epochs`` without a default
Stream = Literal["task", "target", "non_target"]


class SGDConfig(_Strict):
    """``sgd``: torch.optim.SGD on the summed loss.

    A DeepKD method (``deepkd_*``) under plain SGD sums its three streams under one momentum, which
    is its base method (``deepkd_dkd`` trains DKD). That is an error unless ``allow_base_method:
    true`` says it is on purpose (e.g. the base-method row of an ablation); set on any other method
    it is an error too, since it would do nothing.
    """

    name: Literal["sgd"] = "sgd"
    lr: float = Field(LR, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False
    allow_base_method: bool = False


class DecoupledConfig(AutoMomentumChecks, _Strict):
    """``decoupled``: :class:`deepkd.optim.DecoupledMomentumSGD`, one momentum per gradient stream.
    A stream's steady-state step is ``lr / (1 - m)`` (x20 at m = 0.95, x5.7 at 0.825). ``stream_momentum:
    auto`` (one-view classification): coefficients from the streams' GSNR measured during training, within
    [mu - delta, mu + delta] and monotone in smoothed log-GSNR (:mod:`deepkd.optim.auto_momentum`); its
    settings ``auto_momentum`` are read only then, and it needs ``merge_equal: false`` (its default)."""

    name: Literal["decoupled"] = "decoupled"
    lr: float = Field(LR, gt=0)
    stream_momentum: Union[Literal["auto"], Dict[Stream, float]] = Field(
        default_factory=lambda: dict(_default(DecoupledMomentumSGD, "momentum")))
    auto_momentum: Optional[AutoMomentumConfig] = None
    weight_decay: float = Field(_default(DecoupledMomentumSGD, "weight_decay"), ge=0)
    weight_decay_stream: Stream = _default(DecoupledMomentumSGD, "weight_decay_stream")
    merge_equal: bool = _default(DecoupledMomentumSGD, "merge_equal")


class StepScheduleConfig(_Strict):
    """``step``: ``lr * gamma ** #(milestones < epoch)`` (:func:`deepkd.optim.step_lr`)."""

    name: Literal["step"] = "step"
    epochs: int = Field(EPOCHS, gt=0)
    milestones: List[int] = [150, 180, 210]
    gamma: float = _default(step_lr, "gamma")


class CosineScheduleConfig(_Strict):
    """``cosine``: linear warm-up, then cosine to ``min_lr`` (:func:`deepkd.optim.cosine_lr`)."""

    name: Literal["cosine"] = "cosine"
    epochs: int = Field(EPOCHS, gt=0)
    warmup_epochs: int = Field(_default(cosine_lr, "warmup_epochs"), ge=0)
    warmup_start_factor: float = _default(cosine_lr, "warmup_start_factor")
    min_lr: float = _default(cosine_lr, "min_lr")


class MultiStepIterScheduleConfig(_Strict):
    """``multistep_iter`` (detection): :func:`deepkd.detection.warmup_multistep_lr` over optimizer
    steps: a linear warm-up of ``warmup_iterations`` from ``warmup_factor``, x ``gamma`` at each
    milestone iteration. ``epochs`` passes over the data, cut at ``max_iterations`` when set (the run
    then ends, evaluated, mid-epoch); methods see the 1-based epoch in progress."""

    name: Literal["multistep_iter"] = "multistep_iter"
    epochs: int = Field(gt=0)
    max_iterations: Optional[int] = Field(None, gt=0)
    milestones: List[int] = list(_default(warmup_multistep_lr, "milestones"))
    gamma: float = _default(warmup_multistep_lr, "gamma")
    warmup_iterations: int = Field(_default(warmup_multistep_lr, "warmup_iterations"), ge=0)
    warmup_factor: float = Field(_default(warmup_multistep_lr, "warmup_factor"), gt=0, le=1)


OptimizerConfig = _choice("sgd", SGDConfig, DecoupledConfig)
ScheduleConfig = _choice("step", StepScheduleConfig, CosineScheduleConfig, MultiStepIterScheduleConfig)


# -- the run ------------------------------------------------------------------------------------------
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
    checkpoint_every: int = Field(0, ge=0)  # steps between mid-epoch last.pt saves; 0: epoch ends and stops only
    sync_batchnorm: bool = False  # SyncBatchNorm across ranks (CUDA); otherwise statistics averaged at tests/saves
    teacher_cache: bool = False
    teacher_cache_dtype: Literal["bf16", "fp32"] = "bf16"
    # two-view methods (MLKD, CRLD): the student runs once per view (the reference: per-view BatchNorm
    # batch statistics) or once on both views concatenated (one forward, shared batch statistics)
    student_views: Literal["separate", "concat"] = "separate"


DETECTION_TRAIN_KEYS = ("device", "precision", "stop_after_steps", "checkpoint_every", "progress", "log_every")


class RunConfig(_Strict):
    """A complete, resolved run: what ``deepkd train`` reads from a recipe."""

    experiment: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    data: AnyDataConfig = DataConfig()
    student: ModelConfig
    teacher: Optional[ModelConfig] = None
    method: MethodConfig = MethodConfig()
    optimizer: OptimizerConfig = SGDConfig()
    schedule: ScheduleConfig = StepScheduleConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _check_sections(self) -> "RunConfig":
        method = self.method.name
        if self.teacher is not None and not method_needs_teacher(method):
            raise ValueError(f"the teacher section is not used by method {method!r} (it trains without a teacher): "
                             "remove it or choose a distillation method")
        if getattr(self.optimizer, "stream_momentum", None) == "auto" and (self.detection or method_views(method) == 2):
            what = "detection" if self.detection else f"method {method!r} (its loss couples the samples of a batch)"
            raise ValueError(f"optimizer.stream_momentum: auto measures per-sample gradients, which {what} does "
                             "not have; give the coefficients")
        if self.optimizer.name == "sgd" and is_deepkd_method(method) != self.optimizer.allow_base_method:
            if self.optimizer.allow_base_method:
                raise ValueError(f"optimizer.allow_base_method is only for a DeepKD method under sgd, not {method!r}")
            raise ValueError(f"method {method!r} under optimizer 'sgd' shares one momentum between its streams, which "
                             "trains its base method: set optimizer.name: decoupled (DeepKD), or "
                             "optimizer.allow_base_method: true to train the base method on purpose")
        self._check_task()
        return self

    @property
    def detection(self) -> bool:
        """A detection run (``data.dataset: coco | synthetic_coco``)."""
        return isinstance(self.data, DetectionDataConfig)

    def _check_task(self) -> None:
        """Keys the task does not read are errors (detection reads only DETECTION_TRAIN_KEYS of train)."""
        if self.detection != (self.schedule.name == "multistep_iter"):
            raise ValueError(f"schedule {self.schedule.name!r} does not fit dataset {self.data.dataset!r}: detection "
                             "(coco, synthetic_coco) uses schedule.name: multistep_iter, classification step or cosine")
        if self.detection:
            unused = sorted(k for k in self.train.model_fields_set if k not in DETECTION_TRAIN_KEYS)
            if unused:
                raise ValueError(f"detection does not use {', '.join(f'train.{k}' for k in unused)} (only "
                                 f"{', '.join(f'train.{k}' for k in DETECTION_TRAIN_KEYS)})")
            return
        for role, model in (("student", self.student), ("teacher", self.teacher)):
            if model is not None and model.weights_backbone is not None:
                raise ValueError(f"{role}.weights_backbone is only for detectors (data.dataset coco or synthetic_coco)")
        if self.data.channels != 3:  # NOTE: no model builder takes an input channel count yet
            raise ValueError(f"data.channels {self.data.channels} gives grey images, but {self.student.name!r} and "
                             "every other model deepkd train builds takes 3 channels: set data.channels: 3 (grey "
                             "replicated), or use deepkd.data.build_data with a grey model in your own loop")
        self._check_views()

    def _check_views(self) -> None:
        """Two-view methods get a random strong view per image: no teacher-logit cache (it serves only
        crop/flip views) and no per-sample GSNR probe (their losses couple the samples of a batch)."""
        method = self.method.name
        if method_views(method) == 1:
            if "student_views" in self.train.model_fields_set:
                raise ValueError(f"train.student_views is only for two-view methods (mlkd, crld, deepkd_mlkd, "
                                 f"deepkd_crld), not {method!r}")
            return
        if self.train.teacher_cache:
            raise ValueError(f"train.teacher_cache cannot serve method {method!r}: its strong views are random "
                             "RandAugment images, not one of the cached crop/flip views; "
                             "set train.teacher_cache: false")
        if self.train.gsnr_every:
            raise ValueError(f"train.gsnr_every measures per-sample gradients, which method {method!r} does not have "
                             "(its loss couples the samples of a batch); set train.gsnr_every: 0")


# -- errors -------------------------------------------------------------------------------------------
def _models(annotation: Any) -> Dict[str, type]:
    """``{tag or class name: model}`` of the models a field may hold (a model, an optional one, a tagged union)."""
    found: Dict[str, type] = {}
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        tags = [m.tag for m in getattr(candidate, "__metadata__", ()) if isinstance(m, Tag)]
        inner = candidate.__origin__ if tags else candidate
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            found[tags[0] if tags else inner.__name__] = inner
    return found


def _walk(loc: Sequence[Any]) -> Tuple[List[str], Dict[str, type], Optional[str]]:
    """An error location as (key path without union tags, the choices of its last section, their tag)."""
    path: List[str] = []
    choices, tag = _models(RunConfig), None
    parts = [str(p) for p in loc]
    while parts:
        part = parts.pop(0)
        path.append(part)
        model = choices[tag] if tag in choices else next(iter(choices.values()))
        field = model.model_fields.get(part)
        if field is None or not _models(field.annotation):
            return path + parts, choices, tag
        choices = _models(field.annotation)
        tag = parts.pop(0) if len(choices) > 1 and parts else None
    return path, choices, tag


def _describe(error: Dict[str, Any]) -> str:
    path, choices, tag = _walk(error["loc"])
    where = ".".join(path)
    if error["type"] == "extra_forbidden":
        section, key = ".".join(path[:-1]), path[-1]
        users = [name for name, model in choices.items() if key in model.model_fields]
        if tag is not None and users:
            return f"{section} {tag!r} does not use {where} (only {', '.join(map(repr, users))})"
        fields = (choices[tag] if tag in choices else next(iter(choices.values()))).model_fields
        hint = closest(key, list(fields))
        return f"unknown key {where!r}" + (f"; did you mean {'.'.join(path[:-1] + [hint[0]])!r}?" if hint else "")
    if error["type"] == "union_tag_invalid":
        hint = closest(str(error["ctx"]["tag"]), list(choices))
        near = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"{where}.name {error['ctx']['tag']!r} is not one of {error['ctx']['expected_tags']}{near}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def validate_config(raw: Dict[str, Any], source: str = "config") -> RunConfig:
    """Build a :class:`RunConfig` from plain data, turning schema errors into :class:`ConfigError`."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        lines = [_describe(e) for e in err.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


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
