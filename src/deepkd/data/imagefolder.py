"""ImageNet and any ``root/{train,val}/<class>/*.jpg`` tree: PIL decoding in DataLoader workers.

Training: RandomResizedCrop 224 (scale 0.08-1, ratio 3/4-4/3, torchvision's sampling with its
centre-crop fallback) + horizontal flip; validation: shorter side resized to 256, centre crop 224;
then normalisation. torchvision is not needed (its wheel does not import on every CPU build).
Sample ``i`` of epoch ``e`` draws its crop from a generator seeded by ``(seed, e, i)``, and the
epoch's order is a seeded permutation sharded across ranks like ``DistributedSampler``, so runs
resume exactly at any batch.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def scan(folder: Path) -> Tuple[List[Tuple[str, int]], List[str]]:
    """``(path, class index)`` pairs and the sorted class names of one split folder."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist (expected <root>/train/<class>/*.jpg "
                                "and <root>/val/<class>/*.jpg)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    samples = [(str(f), index) for index, name in enumerate(classes)
               for f in sorted((folder / name).iterdir()) if f.suffix.lower() in EXTENSIONS]
    if not samples:
        raise FileNotFoundError(f"no images under {str(folder)!r}")
    return samples, classes


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """``(left, top, w, h)`` by torchvision's rule: 10 tries of area/log-ratio, then a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _to_tensor(image, mean, std) -> torch.Tensor:
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    return (array.float() / 255.0 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class ImageFolderDataset(Dataset):
    """Items are ``(seed, epoch, index)`` triples so that augmentation is a pure function of them."""

    def __init__(self, samples, *, train: bool, size: int = 224, resize: int = 256, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        self.samples, self.train, self.size, self.resize, self.mean, self.std = samples, train, size, resize, mean, std

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: Tuple[int, int, int]):
        from PIL import Image

        seed, epoch, index = item
        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("RGB")
            if self.train:
                rng = random.Random(f"{seed}:{epoch}:{index}")
                left, top, w, h = random_resized_crop_box(*image.size, rng)
                image = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
                if rng.random() < 0.5:
                    image = image.transpose(Image.FLIP_LEFT_RIGHT)
            else:
                width, height = image.size
                short = min(width, height)
                new = (max(1, round(width * self.resize / short)), max(1, round(height * self.resize / short)))
                image = image.resize(new, Image.BILINEAR)
                left, top = (new[0] - self.size) // 2, (new[1] - self.size) // 2
                image = image.crop((left, top, left + self.size, top + self.size))
        return _to_tensor(image, self.mean, self.std), label


class ImageFolderLoader:
    """``iter_epoch(epoch, start_batch)`` over a folder; ``batch_size`` is global, split across ranks."""

    def __init__(self, samples, *, batch_size: int, train: bool, seed: int = 0, num_workers: int = 2,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, **dataset_options):
        self.dataset = ImageFolderDataset(samples, train=train, **dataset_options)
        self.batch_size, self.train, self.seed, self.num_workers = batch_size, train, seed, num_workers
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.local_batch = max(1, batch_size // world_size)

    @property
    def num_samples(self) -> int:
        """Images in the split (all ranks together)."""
        return len(self.dataset)

    def _indices(self, epoch: int) -> List[int]:
        """This rank's share of the epoch's order: strided like DistributedSampler; training pads by
        wrapping so every rank has as many batches, evaluation does not (no sample counted twice)."""
        count = len(self.dataset)
        order = (torch.randperm(count, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch)).tolist()
                 if self.train else list(range(count)))
        if self.world_size > 1:
            total = math.ceil(count / self.world_size) * self.world_size if self.train else count
            order = (order + order[:total - count])[self.rank::self.world_size]
        return order

    def __len__(self) -> int:
        count = len(self._indices(1)) if self.world_size > 1 else len(self.dataset)
        full, rest = divmod(count, self.local_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches ``start_batch ..`` of ``epoch``: CPU (float32 ``[b, 3, 224, 224]``, int64 ``[b]``)."""
        indices = self._indices(epoch)
        batches = [indices[i:i + self.local_batch] for i in range(0, len(indices), self.local_batch)][:len(self)]
        items = [[(self.seed, epoch, index) for index in batch] for batch in batches[start_batch:]]
        loader = DataLoader(self.dataset, batch_sampler=items, num_workers=self.num_workers,
                            persistent_workers=False, pin_memory=torch.cuda.is_available())
        yield from loader


def build_imagefolder(root, *, batch_size: int, eval_batch_size: int, device, seed: int, drop_last: bool,
                      rank: int, world_size: int, num_workers: int = 2):
    """A :class:`deepkd.data.DataBundle` for ``root/train`` and ``root/val`` (any class count)."""
    from deepkd.data import DataBundle

    if root is None:
        raise FileNotFoundError("data.root is not set: point it at a folder holding train/ and val/ class folders")
    root = Path(root)
    train_samples, classes = scan(root / "train")
    val_samples, val_classes = scan(root / "val")
    if val_classes != classes:
        raise ValueError(f"{root}/val has classes that differ from {root}/train ({len(val_classes)} vs {len(classes)})")
    common = dict(seed=seed, num_workers=num_workers, rank=rank, world_size=world_size)
    train = ImageFolderLoader(train_samples, batch_size=batch_size, train=True, drop_last=drop_last, **common)
    test = ImageFolderLoader(val_samples, batch_size=eval_batch_size, train=False, **common)
    return DataBundle(train, test, len(classes), 224, IMAGENET_MEAN, IMAGENET_STD)
