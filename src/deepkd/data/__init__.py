"""Data: CIFAR-100, ImageFolder trees (ImageNet), the offline synthetic set, device-resident loaders."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from deepkd.data import cifar, synthetic
from deepkd.data.device_loader import DeviceLoader

__all__ = ["DataBundle", "DeviceLoader", "build_data"]


@dataclass
class DataBundle:
    """What the trainer needs: the two loaders and the dataset's facts."""

    train: Any
    test: Any
    num_classes: int
    input_size: int
    mean: Sequence[float]
    std: Sequence[float]


def _device_bundle(train, test, num_classes, mean, std, *, batch_size, eval_batch_size, device, seed,
                   drop_last, rank, world_size) -> DataBundle:
    common = dict(mean=mean, std=std, device=device, rank=rank, world_size=world_size)
    train_loader = DeviceLoader(*train, batch_size=batch_size, train=True, seed=seed, drop_last=drop_last, **common)
    test_loader = DeviceLoader(*test, batch_size=eval_batch_size, train=False, seed=seed, **common)
    return DataBundle(train_loader, test_loader, num_classes, train[0].shape[-1], mean, std)


def build_data(dataset: str, *, root: Optional[str] = None, batch_size: int = 64, eval_batch_size: Optional[int] = None,
               device="cpu", seed: int = 0, download: bool = True, num_workers: int = 2, rank: int = 0,
               world_size: int = 1, drop_last: bool = False, synthetic_train: int = 10000,
               synthetic_test: int = 2000, synthetic_seed: int = 0, synthetic_noise: float = 1.5) -> DataBundle:
    """Loaders for ``cifar100``, ``synthetic`` or ``imagenet``/``imagefolder`` (``root/train``, ``root/val``)."""
    options = dict(batch_size=batch_size, eval_batch_size=eval_batch_size or batch_size, device=device, seed=seed,
                   drop_last=drop_last, rank=rank, world_size=world_size)
    if dataset == "synthetic":
        train = synthetic.generate(synthetic_train, seed=synthetic_seed, split="train", noise=synthetic_noise)
        test = synthetic.generate(synthetic_test, seed=synthetic_seed, split="test", noise=synthetic_noise)
        pixels = train[0].float() / 255.0
        mean = pixels.mean(dim=(0, 2, 3)).tolist()
        std = pixels.std(dim=(0, 2, 3)).tolist()
        return _device_bundle(train, test, synthetic.NUM_CLASSES, mean, std, **options)
    if dataset == "cifar100":
        folder = cifar.prepare(root, download=download)
        train, test = cifar.read_split(folder, "train"), cifar.read_split(folder, "test")
        return _device_bundle(train, test, 100, cifar.MEAN, cifar.STD, **options)
    if dataset in ("imagenet", "imagefolder"):
        from deepkd.data.imagefolder import build_imagefolder

        return build_imagefolder(root, num_workers=num_workers, **options)
    raise ValueError(f"unknown dataset {dataset!r}: choose cifar100, synthetic, imagenet or imagefolder")
