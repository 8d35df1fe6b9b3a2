"""COCO-format detection data on pycocotools: dataset, seeded flips, aspect-ratio batches, loaders.

Images come out as float ``[3, H, W]`` in 0-1 at their own size: resizing, normalisation and
padding stay in the model's ``GeneralizedRCNNTransform``, so the teacher reads the very tensor the
student reads, and multi-scale training is the model's ``min_size`` tuple (a resize in the dataset
would be undone by the transform). Labels are the raw category ids (torchvision's convention:
``num_classes = max id + 1``, 91 for COCO, background 0).

Every random choice is a pure function of ``(seed, epoch, index)`` (flip) or ``(seed, epoch)``
(batch order), so a run resumed at batch ``b`` of an epoch sees exactly the batches and flips of
an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deepkd.data.imagefolder import decode
from deepkd.errors import DataError, MissingFileError

Item = Union[int, Tuple[int, int]]  # an index, or (epoch, index) for a training draw


def load_coco(ann_file: Union[str, Path]):
    """``pycocotools.coco.COCO`` of a JSON file, quietly; a missing or broken file is one sentence."""
    from pycocotools.coco import COCO

    path = Path(ann_file)
    if not path.is_file():
        raise MissingFileError(f"COCO annotation file {str(path)!r} does not exist")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            return COCO(str(path))
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{str(path)!r} is not a COCO instances file ({type(err).__name__}: {err})") from None


def coco_target(annotations: Sequence[dict], width: int, height: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``boxes float32 [n, 4]`` xyxy clamped to the image and ``labels int64 [n]`` (category ids) of
    one image's annotations; crowd regions and boxes with no width or height are left out."""
    boxes, labels = [], []
    for ann in annotations:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x2 > x1 and y2 > y1:
            boxes.append([x1, y1, x2, y2])
            labels.append(ann["category_id"])
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64))


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mirror ``image [3, H, W]`` and its xyxy ``boxes [n, 4]`` left-right (torchvision.transforms.v2)."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as TF

    box = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:]))
    return TF.horizontal_flip(image), TF.horizontal_flip(box).as_subclass(torch.Tensor)


class CocoDetection(Dataset):
    """A COCO instances file and its image folder.

    ``dataset[i]`` (evaluation) or ``dataset[(epoch, i)]`` (training: flipped with probability
    ``flip``, decided by ``(seed, epoch, i)``) -> ``(image float [3, H, W] in 0-1, {"boxes" [n, 4]
    xyxy float32, "labels" int64 [n], "image_id" int})``. ``train=True`` drops images without a
    usable box (torchvision cannot train on them); evaluation keeps every image.
    """

    def __init__(self, image_dir: Union[str, Path], ann_file: Union[str, Path], train: bool, *, flip: float = 0.5,
                 seed: int = 0):
        self.image_dir, self.train, self.flip, self.seed = Path(image_dir), train, flip, seed
        if not self.image_dir.is_dir():
            raise MissingFileError(f"COCO image folder {str(self.image_dir)!r} does not exist")
        self.coco = load_coco(ann_file)
        ids = sorted(self.coco.getImgIds())
        if train:
            ids = [i for i in ids if len(self._target(i)[0])]
        if not ids:
            raise DataError(f"{str(ann_file)!r} has no {'image with a usable box' if train else 'image'}")
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def _target(self, image_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
        info = self.coco.imgs[image_id]
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
        return coco_target(anns, info["width"], info["height"])

    def image_sizes(self) -> List[Tuple[int, int]]:
        """``(width, height)`` of every image from the annotation file (no decoding)."""
        return [(self.coco.imgs[i]["width"], self.coco.imgs[i]["height"]) for i in self.ids]

    def flipped(self, epoch: int, index: int) -> bool:
        """Whether training draw ``(epoch, index)`` is mirrored: a pure function of the seed."""
        return bool(np.random.default_rng([self.seed, epoch, index]).random() < self.flip)

    def __getitem__(self, item: Item):
        epoch, index = item if isinstance(item, tuple) else (None, item)
        image_id = self.ids[index]
        image = decode(str(self.image_dir / self.coco.imgs[image_id]["file_name"]))
        boxes, labels = self._target(image_id)
        image = image.float().div_(255)
        if epoch is not None and self.flip > 0 and self.flipped(epoch, index):
            image, boxes = hflip(image, boxes)
        return image, {"boxes": boxes, "labels": labels, "image_id": image_id}


def collate(batch):
    """A tuple of lists ``(images, targets)``: detection images keep their own sizes."""
    return tuple(list(part) for part in zip(*batch))


def aspect_ratio_batches(sizes: Sequence[Tuple[int, int]], batch_size: int, *, seed: int,
                         epoch: int) -> List[List[int]]:
    """One epoch's training batches of indices into ``sizes`` (``(width, height)`` per image).

    Detectron2's grouping (the DKD reference): a permutation seeded by ``(seed, epoch)`` is read in
    order into two buckets, landscape-or-square (w >= h) and portrait (w < h); a bucket that reaches
    ``batch_size`` becomes the next batch. Incomplete buckets at the end are dropped, so every batch
    is homogeneous and full and each index appears at most once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(len(sizes))
    buckets: Dict[bool, List[int]] = {True: [], False: []}
    batches = []
    for index in order.tolist():
        width, height = sizes[index]
        bucket = buckets[width >= height]
        bucket.append(index)
        if len(bucket) == batch_size:
            batches.append(list(bucket))
            bucket.clear()
    return batches


class DetectionLoader:
    """Batches of a :class:`CocoDetection` for one rank, as ``(images list, targets list)``.

    ``train=True``: :func:`aspect_ratio_batches` of the per-rank ``batch_size`` for each epoch, rank
    ``r`` of ``world_size`` taking batches ``r, r + world_size, ...`` (equal counts on every rank);
    ``iter_epoch(epoch, start_batch)`` resumes mid-epoch. ``train=False``: every image once, in
    order, this rank's share (``index % world_size == rank``), no flip.
    """

    def __init__(self, dataset: CocoDetection, batch_size: int, *, train: bool, seed: int = 0, workers: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size, self.train, self.seed = dataset, batch_size, train, seed
        self.workers, self.rank, self.world_size = workers, rank, world_size
        self._sizes = dataset.image_sizes()

    def batches(self, epoch: int) -> List[List[Item]]:
        """This rank's batches of ``epoch`` (items as ``dataset[...]`` takes them)."""
        if not self.train:
            mine = list(range(self.rank, len(self.dataset), self.world_size))
            return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        every = aspect_ratio_batches(self._sizes, self.batch_size, seed=self.seed, epoch=epoch)
        count = len(every) // self.world_size
        return [[(epoch, i) for i in batch] for batch in every[self.rank:count * self.world_size:self.world_size]]

    def __len__(self) -> int:
        return len(self.batches(1))

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Tuple[list, list]]:
        """The batches of ``epoch`` from ``start_batch`` on."""
        batches = self.batches(epoch)[start_batch:]
        if not batches:
            return iter(())
        # its own generator: a DataLoader draws its workers' base seed from the global RNG otherwise,
        # which the RoI samplers use (a resumed epoch would shift their draws)
        return iter(DataLoader(self.dataset, batch_sampler=batches, collate_fn=collate, num_workers=self.workers,
                               generator=torch.Generator().manual_seed(self.seed)))

    def __iter__(self):
        return self.iter_epoch(0)
