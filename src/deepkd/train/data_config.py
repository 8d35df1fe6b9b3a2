"""The ``data`` section of a recipe: classification (:class:`DataConfig`, only the keys its dataset
reads, :data:`DATASET_KEYS`; defaults are :func:`deepkd.data.build_data`'s signature), detection
(:class:`DetectionDataConfig`, ``dataset: coco | synthetic_coco``), and :data:`AnyDataConfig`, which
picks one of the two by ``dataset``.
"""
from __future__ import annotations

from typing import Annotated, Any, List, Literal, Optional, Tuple, Union

from pydantic import Discriminator, Field, Tag, model_validator

from deepkd.data import build_data, check_resize
from deepkd.data.fashion_mnist import check_image_size
from deepkd.detection.coco import CocoDetection, DetectionLoader
from deepkd.detection.download import prepare_coco
from deepkd.detection.synthetic import write_synthetic_coco
from deepkd.train.schema import _default, _Strict, check_used_keys

__all__ = ["COMMON_DATA_KEYS", "COMMON_DETECTION_KEYS", "DATASET_KEYS", "DETECTION_DATASET_KEYS", "FASHION_MNIST_KEYS",
           "FOLDER_KEYS", "AnyDataConfig", "DataConfig", "DetectionDataConfig", "DetectionSyntheticConfig",
           "SyntheticConfig"]


class SyntheticConfig(_Strict):
    """The offline synthetic set (``data.dataset: synthetic``)."""

    num_train: int = Field(_default(build_data, "synthetic_train"), gt=0)
    num_test: int = Field(_default(build_data, "synthetic_test"), gt=0)
    seed: int = _default(build_data, "synthetic_seed")
    noise: float = _default(build_data, "synthetic_noise")


FOLDER_KEYS = ("train_folder", "val_folder", "image_size", "resize", "crop", "interpolation", "mean", "std",
               "in_memory")
FASHION_MNIST_KEYS = ("image_size", "channels", "train_per_class", "subset_seed", "crop_pad")
COMMON_DATA_KEYS = ("dataset", "batch_size", "eval_batch_size", "drop_last", "flip")
DATASET_KEYS = {  # the data keys each dataset reads besides COMMON_DATA_KEYS
    "cifar100": ("root", "download"), "cifar10": ("root", "download"), "tinyimagenet": ("root", "download"),
    "fashion_mnist": ("root", "download", *FASHION_MNIST_KEYS),
    "imagenet": ("root", "num_workers", *FOLDER_KEYS), "imagefolder": ("root", "num_workers", *FOLDER_KEYS),
    "synthetic": ("synthetic",),
}


class DataConfig(_Strict):
    """The dataset and its loaders; a key the dataset does not read is an error. Image-folder keys
    left unset (null) take the teacher's (else the student's) timm pretrained data config, then the
    defaults of :class:`deepkd.data.FolderOptions`; Fashion-MNIST's take :func:`deepkd.data.build_data`'s
    (``image_size`` 32). ``eval_batch_size`` null: ``batch_size``."""

    dataset: Literal[tuple(DATASET_KEYS)] = "cifar100"
    root: Optional[str] = None
    download: bool = _default(build_data, "download")
    batch_size: int = Field(_default(build_data, "batch_size"), gt=0)
    eval_batch_size: Optional[int] = Field(_default(build_data, "eval_batch_size"), gt=0)
    num_workers: int = Field(_default(build_data, "num_workers"), ge=0)
    drop_last: bool = _default(build_data, "drop_last")
    flip: bool = _default(build_data, "flip")
    synthetic: SyntheticConfig = SyntheticConfig()
    train_folder: Optional[str] = None
    val_folder: Optional[str] = None
    image_size: Optional[int] = Field(None, gt=0)
    resize: Optional[int] = Field(None, gt=0)
    crop: Optional[Literal["random_resized", "pad_crop"]] = None
    interpolation: Optional[Literal["bilinear", "bicubic", "nearest"]] = None
    mean: Union[Literal["auto"], List[float], None] = None
    std: Optional[List[float]] = None
    in_memory: Optional[Literal["auto", "on", "off"]] = None
    channels: Literal[1, 3] = _default(build_data, "channels")
    train_per_class: Optional[int] = Field(_default(build_data, "train_per_class"), gt=0)
    subset_seed: int = _default(build_data, "subset_seed")
    crop_pad: int = Field(_default(build_data, "crop_pad"), ge=0)

    def used_keys(self) -> Tuple[str, ...]:
        """The keys this dataset reads (the ones a resolved config writes out)."""
        return COMMON_DATA_KEYS + DATASET_KEYS[self.dataset]

    @model_validator(mode="before")
    @classmethod
    def _fashion_mnist_size(cls, value: Any) -> Any:
        """Fashion-MNIST's unset ``image_size`` is :func:`deepkd.data.build_data`'s (a resolved config
        writes the size the run used; image folders resolve theirs later, from a timm model)."""
        if isinstance(value, dict) and value.get("dataset") == "fashion_mnist" and value.get("image_size") is None:
            return {**value, "image_size": _default(build_data, "image_size")}
        return value

    @model_validator(mode="after")
    def _check_used(self) -> "DataConfig":
        check_used_keys(self, DATASET_KEYS)
        if (self.mean == "auto") != (self.std is None) and self.mean is not None:
            raise ValueError("mean: auto measures std too (leave std unset); a list of means needs a list of stds")
        if self.std is not None and self.mean is None:
            raise ValueError("std is set without mean")
        check_resize(self.crop, self.resize, self.image_size)
        if self.dataset == "fashion_mnist":
            self._check_fashion_mnist()
        return self

    def _check_fashion_mnist(self) -> None:
        check_image_size(self.image_size)
        if self.train_per_class is None and self.subset_seed != _default(build_data, "subset_seed"):
            raise ValueError(f"data.subset_seed {self.subset_seed} picks the train_per_class subset, but "
                             "data.train_per_class is unset: set it or remove data.subset_seed")


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
