"""Data: CIFAR-10/100, Tiny-ImageNet, Fashion-MNIST, image folders (ImageNet, a user's own), the synthetic set."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

from deepkd.data import cifar, synthetic
from deepkd.data.device_loader import DeviceLoader
from deepkd.errors import ConfigError, MissingFileError
from deepkd.registry import Registry

__all__ = ["DATASETS", "DataBundle", "DeviceLoader", "FolderOptions", "build_data", "check_resize", "register_dataset"]


@dataclass
class DataBundle:
    """What the trainer needs: the two loaders and the dataset's facts."""

    train: Any
    test: Any
    num_classes: int
    input_size: int
    mean: Sequence[float]
    std: Sequence[float]
    classes: List[str] = field(default_factory=list)

    def facts(self) -> dict:
        """What a user of the trained model needs (``data.json`` of a run): class names in label
        order, input size, the normalisation actually used (``mean: auto`` resolved)."""
        return {"num_classes": self.num_classes, "classes": list(self.classes), "input_size": self.input_size,
                "mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std]}


@dataclass
class FolderOptions:
    """How an image-folder dataset is read and augmented (``data.*`` keys of a recipe).

    ``mean="auto"``: measure the training split's channel mean and std once (cached).
    ``resize``: shorter side before the evaluation centre crop of ``random_resized`` crops (default
    ``image_size / 0.875``); ``pad_crop`` evaluates what it trains on, the image resized to
    ``image_size`` and centre-cropped, so a different ``resize`` is an error.
    ``in_memory``: ``"auto"`` decodes the set once into the device-resident loaders when its uint8
    pixels fit 4 GiB (training images as ``resize`` squares for ``random_resized`` crops, as
    ``image_size`` squares for ``pad_crop``); larger sets stream through DataLoader workers.
    """

    train_folder: str = "train"
    val_folder: str = "val"
    image_size: int = 224
    resize: Optional[int] = None
    crop: str = "random_resized"
    pad: int = 4
    interpolation: str = "bilinear"
    mean: Union[str, Sequence[float]] = (0.485, 0.456, 0.406)
    std: Optional[Sequence[float]] = (0.229, 0.224, 0.225)
    in_memory: str = "auto"

    def __post_init__(self):
        check_resize(self.crop, self.resize, self.image_size)


def check_resize(crop: Optional[str], resize: Optional[int], image_size: Optional[int]) -> None:
    """``resize`` is the evaluation resize of ``random_resized`` crops only: with ``pad_crop`` it must be
    unset (or ``image_size``), since evaluation resizes to ``image_size`` as training does."""
    if crop == "pad_crop" and resize is not None and resize != image_size:
        raise ConfigError(f"data.resize {resize} only applies to crop: random_resized (with pad_crop, evaluation "
                          "resizes to image_size as training does): remove data.resize")


DATASETS = Registry("dataset")


def register_dataset(name: Optional[str] = None, **info: Any):
    """Decorator registering a dataset builder ``builder(dataset, options, **settings) -> DataBundle``:
    ``dataset`` is the registered name, ``options`` the loader keywords of :func:`_device_bundle`
    (``batch_size``, ``eval_batch_size``, ``device``, ``seed``, ``drop_last``, ``rank``, ``world_size``,
    ``flip``, ``strong``), ``settings`` every other keyword of :func:`build_data` (``root``, ``download``,
    ``num_workers``, ``folder``, ``synthetic_*``, Fashion-MNIST's); a builder names those it reads and
    takes ``**_`` for the rest."""
    return DATASETS.register(name, **info)


def _device_bundle(train, test, num_classes, mean, std, *, batch_size, eval_batch_size, device, seed,
                   drop_last, rank, world_size, flip=True, strong=False, classes=(), crop_size=None,
                   **augment) -> DataBundle:
    """Device-resident loaders; ``crop_size``: training views are RandomResizedCrop(crop_size) + flip;
    ``strong``: training batches are two views, weak and RandAugment-strong."""
    from deepkd.data.device_crops import RandomResizedCropLoader

    common = dict(mean=mean, std=std, device=device, rank=rank, world_size=world_size)
    train_options = dict(batch_size=batch_size, seed=seed, drop_last=drop_last, flip=flip, strong=strong, **common)
    train_loader = (RandomResizedCropLoader(*train, size=crop_size, **train_options) if crop_size else
                    DeviceLoader(*train, train=True, **augment, **train_options))
    test_loader = DeviceLoader(*test, batch_size=eval_batch_size, train=False, seed=seed, **common)
    return DataBundle(train_loader, test_loader, num_classes, test[0].shape[-1], mean, std, list(classes))


def build_data(dataset: str, *, root: Optional[str] = None, batch_size: int = 64, eval_batch_size: Optional[int] = None,
               device="cpu", seed: int = 0, download: bool = True, num_workers: int = 2, rank: int = 0,
               world_size: int = 1, drop_last: bool = False, flip: bool = True, strong: bool = False,
               folder: Optional[FolderOptions] = None, synthetic_train: int = 10000, synthetic_test: int = 2000,
               synthetic_seed: int = 0, synthetic_noise: float = 1.5, image_size: int = 32, channels: int = 3,
               train_per_class: Optional[int] = None, subset_seed: int = 0, crop_pad: int = 4) -> DataBundle:
    """Loaders for ``cifar100``, ``cifar10``, ``tinyimagenet``, ``fashion_mnist``, ``synthetic``, or
    ``imagenet`` / ``imagefolder`` (``root/<train_folder>``, ``root/<val_folder>``, read as ``folder`` says):
    the builder registered under ``dataset`` in :data:`DATASETS` (:func:`register_dataset`).

    ``strong``: each training batch is ``[2, b, 3, H, W]``, a weak view (the usual augmentation) and
    a strong view (its own crop and flip, then the FixMatch RandAugment + Cutout of MLKD and CRLD).
    ``image_size``, ``channels``, ``train_per_class``, ``subset_seed``: Fashion-MNIST's 28x28 grey images
    zero-padded to ``image_size``, on ``channels`` channels, a class-balanced training subset
    (:mod:`deepkd.data.fashion_mnist`); ``crop_pad``: the zero padding of Fashion-MNIST's random training
    crop (4: the CIFAR crop; 0: no crop, flip only); image folders read their size from ``folder``.
    """
    options = dict(batch_size=batch_size, eval_batch_size=eval_batch_size or batch_size, device=device, seed=seed,
                   drop_last=drop_last, rank=rank, world_size=world_size, flip=flip, strong=strong)
    return DATASETS.get(dataset)(
        dataset, options, root=root, download=download, num_workers=num_workers, folder=folder,
        synthetic_train=synthetic_train, synthetic_test=synthetic_test, synthetic_seed=synthetic_seed,
        synthetic_noise=synthetic_noise, image_size=image_size, channels=channels, train_per_class=train_per_class,
        subset_seed=subset_seed, crop_pad=crop_pad)


@register_dataset("synthetic")
def _synthetic(dataset: str, options: dict, *, synthetic_train: int, synthetic_test: int, synthetic_seed: int,
               synthetic_noise: float, **_) -> DataBundle:
    train = synthetic.generate(synthetic_train, seed=synthetic_seed, split="train", noise=synthetic_noise)
    test = synthetic.generate(synthetic_test, seed=synthetic_seed, split="test", noise=synthetic_noise)
    pixels = train[0].float() / 255.0
    mean = pixels.mean(dim=(0, 2, 3)).tolist()
    std = pixels.std(dim=(0, 2, 3)).tolist()
    return _device_bundle(train, test, synthetic.NUM_CLASSES, mean, std, **options)


@register_dataset("cifar100")
@register_dataset("cifar10")
def _cifar(dataset: str, options: dict, *, root: Optional[str], download: bool, **_) -> DataBundle:
    train, test, num_classes, mean, std = cifar.load(dataset, root, download=download)
    return _device_bundle(train, test, num_classes, mean, std, **options)


@register_dataset("tinyimagenet")
def _tinyimagenet(dataset: str, options: dict, *, root: Optional[str], download: bool, **_) -> DataBundle:
    from deepkd.data import tinyimagenet

    train, test, num_classes, mean, std = tinyimagenet.load(root, download=download)
    return _device_bundle(train, test, num_classes, mean, std, pad=tinyimagenet.AUGMENT["pad"],
                          rotation=tinyimagenet.AUGMENT["rotation"], **options)


@register_dataset("fashion_mnist")
def _fashion_mnist(dataset: str, options: dict, *, root: Optional[str], download: bool, image_size: int,
                   channels: int, train_per_class: Optional[int], subset_seed: int, crop_pad: int, **_) -> DataBundle:
    from deepkd.data import fashion_mnist

    if options["strong"] and channels != 3:
        raise ConfigError(f"data.channels {channels}: the strong view's RandAugment works on RGB images, so "
                          "two-view methods need data.channels: 3")
    train, test, num_classes, mean, std = fashion_mnist.load(
        root, download=download, image_size=image_size, channels=channels, train_per_class=train_per_class,
        subset_seed=subset_seed)
    return _device_bundle(train, test, num_classes, mean, std, classes=fashion_mnist.CLASSES, pad=crop_pad, **options)


@register_dataset("imagefolder")
@register_dataset("imagenet")
def _image_folder(dataset: str, options: dict, *, root: Optional[str], folder: Optional[FolderOptions],
                  num_workers: int, **_) -> DataBundle:
    return _build_folder(root, folder or FolderOptions(), num_workers=num_workers, **options)


def _stored_size(opts: FolderOptions, resize: int) -> int:
    """Side of the training images kept in memory: random resized crops are taken from the
    evaluation-size square (``resize``), padded crops from the ``image_size`` square."""
    return resize if opts.crop == "random_resized" else opts.image_size


def _fits_in_memory(opts: FolderOptions, train_count: int, val_count: int, resize: int) -> bool:
    from deepkd.data.imagefolder import IN_MEMORY_BYTES

    if opts.in_memory != "auto":
        return opts.in_memory == "on"
    pixels = train_count * _stored_size(opts, resize) ** 2 + val_count * opts.image_size ** 2
    return 3 * pixels <= IN_MEMORY_BYTES


def _build_folder(root, opts: FolderOptions, *, num_workers: int, flip: bool, strong: bool, **options) -> DataBundle:
    from deepkd.data import imagefolder as folders

    if root is None:
        raise MissingFileError("data.root is not set: point it at a folder holding "
                                f"{opts.train_folder}/ and {opts.val_folder}/ class folders")
    root = Path(root)
    train_samples, val_samples, classes = folders.split_samples(root, opts.train_folder, opts.val_folder)
    resize = opts.resize or round(opts.image_size / 0.875)
    if _fits_in_memory(opts, len(train_samples), len(val_samples), resize):
        return _folder_in_memory(train_samples, val_samples, classes, opts, resize, num_workers=num_workers,
                                 flip=flip, strong=strong, **options)
    mean, std = opts.mean, opts.std
    if mean == "auto":
        mean, std = folders.measured_stats(root / opts.train_folder, train_samples, opts.image_size,
                                           num_workers=num_workers)
    augment = dict(image_size=opts.image_size, interpolation=opts.interpolation, resize=resize, crop=opts.crop,
                   pad=opts.pad, flip=flip, mean=mean, std=std)
    loader = dict(seed=options["seed"], num_workers=num_workers, rank=options["rank"],
                  world_size=options["world_size"])
    train = folders.ImageFolderLoader(train_samples, folders.build_transform(train=True, strong=strong, **augment),
                                      batch_size=options["batch_size"], train=True, drop_last=options["drop_last"],
                                      **loader)
    test = folders.ImageFolderLoader(val_samples, folders.build_transform(train=False, **augment),
                                     batch_size=options["eval_batch_size"], train=False, **loader)
    return DataBundle(train, test, len(classes), opts.image_size, mean, std, classes)


def _folder_in_memory(train_samples, val_samples, classes, opts: FolderOptions, resize: int, *, num_workers: int,
                      **options) -> DataBundle:
    """Decode both splits once (training images at their stored size, evaluation images resized and
    centre-cropped) into device-resident loaders."""
    from deepkd.data import imagefolder as folders

    stored = _stored_size(opts, resize)
    fit = folders.build_transform(train=False, image_size=stored, resize=stored, normalize=False,
                                  interpolation=opts.interpolation)
    evaluation = folders.build_transform(train=False, image_size=opts.image_size, resize=resize, crop=opts.crop,
                                         normalize=False, interpolation=opts.interpolation)
    train = folders.decode_all(train_samples, fit, num_workers=num_workers)
    test = folders.decode_all(val_samples, evaluation, num_workers=num_workers)
    mean, std = folders.channel_stats(train[0]) if opts.mean == "auto" else (opts.mean, opts.std)
    crop = dict(crop_size=opts.image_size) if opts.crop == "random_resized" else dict(pad=opts.pad)
    return _device_bundle(train, test, len(classes), mean, std, classes=classes, **crop, **options)
