"""The run's schema: :class:`RunConfig`, every section of a recipe, and the checks across sections
(a teacher only for a distillation method, the optimizer a method needs, the keys a task reads).
The student/teacher (:class:`ModelConfig`) and ``train`` (:class:`TrainConfig`) sections are here;
the others have their own modules (:mod:`deepkd.train.data_config`, :mod:`deepkd.train.method_config`,
:mod:`deepkd.train.optim_config`).

Every section forbids unknown keys, and no key is silently ignored: ``data`` rejects the keys its
``dataset`` does not read, method arguments are checked against the method builder's signature, and
a teacher section for a method without a teacher is an error.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from deepkd.train.data_config import AnyDataConfig, DataConfig, DetectionDataConfig
from deepkd.train.method_config import (
    MethodConfig,
    is_deepkd_method,
    method_features,
    method_needs_teacher,
    method_reads_detectors,
    method_views,
)
from deepkd.train.optim_config import OptimizerConfig, ScheduleConfig, SGDConfig, StepScheduleConfig
from deepkd.train.schema import _Strict

__all__ = ["DETECTION_TRAIN_KEYS", "ModelConfig", "RunConfig", "TrainConfig"]


class ModelConfig(_Strict):
    """A model by name with its ``weights``; ``weights_backbone`` (``torchvision:<ENUM>``, the
    ImageNet backbone of a detection student) only for detectors."""

    name: str
    weights: Optional[str] = None
    weights_backbone: Optional[str] = None


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
    eval_every: int = Field(1, gt=0)  # epochs between tests on the val split; the last epoch is always tested
    sync_batchnorm: bool = False  # SyncBatchNorm across ranks (CUDA); otherwise statistics averaged at tests/saves
    teacher_cache: bool = False
    teacher_cache_dtype: Literal["bf16", "fp32"] = "bf16"
    # two-view methods (MLKD, CRLD): the student runs once per view (the reference: per-view BatchNorm
    # batch statistics) or once on both views concatenated (one forward, shared batch statistics)
    student_views: Literal["separate", "concat"] = "separate"


DETECTION_TRAIN_KEYS = ("device", "precision", "stop_after_steps", "checkpoint_every", "eval_every", "progress",
                        "log_every", "tensorboard", "wandb", "wandb_project")


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
        self._check_features()
        return self

    def _check_features(self) -> None:
        """A feature method reads the models' intermediate tensors on every step: no teacher-logit cache,
        no per-sample GSNR probe (it feeds the method logits), no ``torch.compile`` (its hooks); on
        detection, only one that reads a detector's feature pyramid."""
        method = self.method.name
        if not method_features(method):
            return
        used = [key for key, on in (("train.teacher_cache", self.train.teacher_cache),
                                    ("train.gsnr_every", self.train.gsnr_every),
                                    ("train.compile", self.train.compile),
                                    ("optimizer.stream_momentum: auto",
                                     getattr(self.optimizer, "stream_momentum", None) == "auto")) if on]
        if self.detection and not method_reads_detectors(method):
            raise ValueError(f"detection does not work with feature method {method!r} (it reads a classifier's "
                             "stages): choose a logit method or reviewkd (a detector's FPN, fpn: true)")
        if used:
            raise ValueError(f"{used[0]} does not work with feature method {method!r} (it reads the models' "
                             "intermediate features): turn it off or choose a logit method")

    @property
    def detection(self) -> bool:
        """A detection run (``data.dataset: coco | synthetic_coco``)."""
        return isinstance(self.data, DetectionDataConfig)

    @property
    def task(self) -> str:
        """The registered task that trains this config (:data:`deepkd.engine.task.TASKS`)."""
        return "detection" if self.detection else "classification"

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

