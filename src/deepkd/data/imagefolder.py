"""Image folders (ImageNet, Tiny-ImageNet-style trees, a user's own images) on torchvision.

``root/<train_folder>/<class>/*`` and ``root/<val_folder>/<class>/*`` are scanned by
``torchvision.datasets.ImageFolder`` (its class order and extensions), decoded by
``torchvision.io.decode_image`` and augmented by ``torchvision.transforms.v2``:

- training, ``crop="random_resized"``: RandomResizedCrop(image_size) + flip (the ImageNet recipe);
  ``crop="pad_crop"``: resize + centre crop to image_size, RandomCrop with ``pad`` zero padding + flip
  (the CIFAR recipe, for small images);
- evaluation: shorter side resized to ``resize`` (``pad_crop``: to ``image_size``, the geometry
  training sees), centre crop ``image_size``;
- then float in [0, 1] and normalisation by ``mean``/``std``.

What deepkd adds on top (torchvision's loaders do not have it): sample ``i`` of epoch ``e`` is
augmented under a torch RNG seeded by ``(seed, e, i)`` (forked, so the caller's RNG is untouched),
the epoch's order is a seeded permutation sharded across ranks like ``DistributedSampler``, so a
run resumes exactly at any batch; small sets (``in_memory``) are decoded once at training
resolution into the device-resident :class:`~deepkd.data.DeviceLoader`; ``mean="auto"`` measures
the training split once and caches the result.

torchvision 0.29 marks ``torchvision.io``'s image decoders deprecated in favour of TorchCodec; they
ship and work in the pinned release, and :func:`decode` is the one place that would change.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from deepkd.errors import DataError, MissingFileError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IN_MEMORY_BYTES = 4 << 30  # "auto": decode once into memory when the uint8 training set fits this


def scan(folder: Path) -> Tuple[List[Tuple[str, int]], List[str]]:
    """``(path, class index)`` pairs and the sorted class names of one split folder."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not folder.is_dir():
        raise MissingFileError(f"image folder {str(folder)!r} does not exist (expected one sub-folder of images "
                                "per class)")
    try:
        classes, index = find_classes(str(folder))
        samples = make_dataset(str(folder), index, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:
        raise MissingFileError(f"{folder}: {err}") from None
    return samples, classes


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


class TwoViews:
    """Two independently augmented views of one image, stacked ``[2, ...]`` (weak, strong)."""

    def __init__(self, weak, strong):
        self.weak, self.strong = weak, strong

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.weak(image), self.strong(image)])


def build_transform(*, train: bool, image_size: int, resize: int, crop: str = "random_resized", flip: bool = True,
                    pad: int = 4, interpolation: str = "bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    normalize: bool = True, strong: bool = False, randaugment: bool = False):
    """The torchvision v2 pipeline ``uint8 [3, H, W] -> float32 [3, image_size, image_size]``
    (``normalize=False``: uint8, before scaling). ``strong`` (training): :class:`TwoViews` of this
    pipeline and of the same one with the FixMatch RandAugment + Cutout after the flip
    (``randaugment``), each view with its own crop and flip."""
    from torchvision.transforms import v2

    if strong:
        options = dict(train=train, image_size=image_size, resize=resize, crop=crop, flip=flip, pad=pad,
                       interpolation=interpolation, mean=mean, std=std, normalize=normalize)
        return TwoViews(build_transform(**options), build_transform(**options, randaugment=True))

    mode = _interpolation(interpolation)
    if not train:  # pad_crop trains on the image resized to image_size: evaluate that, not a resize-crop
        side = resize if crop == "random_resized" else image_size
        steps = [v2.Resize(side, interpolation=mode, antialias=True), v2.CenterCrop(image_size)]
    elif crop == "random_resized":
        steps = [v2.RandomResizedCrop(image_size, interpolation=mode, antialias=True)]
    else:
        steps = [v2.Resize(image_size, interpolation=mode, antialias=True), v2.CenterCrop(image_size)]
        steps += [v2.RandomCrop(image_size, padding=pad)] if pad else []
    if train and flip:
        steps.append(v2.RandomHorizontalFlip())
    if randaugment:
        from deepkd.data.randaugment import FixMatchRandAugment

        steps.append(FixMatchRandAugment())
    if normalize:
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def decode(path: str) -> torch.Tensor:
    """``uint8 [3, H, W]`` RGB pixels of an image file; an unreadable file is named in one sentence."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(path, mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as err:
        # torchvision prefixes the decoder's reason with its C++ function and source location
        reason = re.sub(r"^.*\.cpp:\d+,\s*", "", (str(err).splitlines() or [type(err).__name__])[0])[:120]
        raise DataError(f"cannot decode image {path!r} ({reason}): delete or replace the file") from None


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (((seed * 1_000_003) + epoch) * 1_000_033 + index) % (2 ** 63)


def _one_sentence_errors(loader):
    """Iterate a DataLoader; a worker's "cannot decode image" error arrives wrapped with the worker's
    traceback, and is raised again as its one sentence."""
    try:
        yield from loader
    except ValueError as err:
        found = re.search(r"^[\w.]*Error: (cannot decode image .*)$", str(err), re.M)
        if found is None:
            raise
        raise DataError(found.group(1)) from None


class ImageFolderDataset(Dataset):
    """Items are ``(seed, epoch, index)`` triples, so each sample's augmentation is a pure function of them."""

    def __init__(self, samples: Sequence[Tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: Tuple[int, int, int]):
        seed, epoch, index = item
        path, label = self.samples[index]
        image = decode(path)
        with torch.random.fork_rng(devices=[]):  # v2 transforms draw from the global RNG
            torch.manual_seed(_sample_seed(seed, epoch, index))
            return self.transform(image), label


class _EpochBatches:
    """The batch sampler of the loader's one DataLoader: the main process sets each epoch's batches
    before iterating, so worker processes persist across epochs and resumes."""

    def __init__(self):
        self.batches: List[List[Tuple[int, int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ImageFolderLoader:
    """``iter_epoch(epoch, start_batch)`` over a folder; ``batch_size`` is global, split across ranks.
    ``labels`` (int64 ``[N]``, by sample index) and :meth:`batch_indices` give a method that needs them
    (CRD's memory bank) each training sample's label and each batch's sample indices."""

    def __init__(self, samples, transform, *, batch_size: int, train: bool, seed: int = 0, num_workers: int = 2,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        self.dataset = ImageFolderDataset(samples, transform)
        self.batch_size, self.train, self.seed, self.num_workers = batch_size, train, seed, num_workers
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.local_batch = max(1, batch_size // world_size)
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        self._order = (None, torch.empty(0, dtype=torch.int64))  # (epoch, this rank's order of that epoch)
        self._batches = _EpochBatches()
        # a generator of its own: each epoch's iterator draws its (unused) worker base seed from it, not from
        # the global RNG, whose draws (CRD's negatives, dropout) must not depend on where a run resumed
        self._loader = DataLoader(self.dataset, batch_sampler=self._batches, num_workers=num_workers,
                                  persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                                  generator=torch.Generator().manual_seed(seed))

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

    def batch_indices(self, epoch: int, index: int) -> torch.Tensor:
        """This rank's sample indices (CPU int64 ``[b]``, positions in the split) of batch ``index`` of
        ``epoch``: those of the images :meth:`iter_epoch` yields as that batch, whatever its ``start_batch``."""
        if self._order[0] != epoch:  # one permutation per epoch, not per batch (ImageNet: 1.28M samples)
            self._order = (epoch, torch.tensor(self._indices(epoch), dtype=torch.int64))
        return self._order[1][index * self.local_batch:(index + 1) * self.local_batch]

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches ``start_batch ..`` of ``epoch``: CPU (float32 ``[b, 3, S, S]``, int64 ``[b]``)."""
        indices = self._indices(epoch)
        batches = [indices[i:i + self.local_batch] for i in range(0, len(indices), self.local_batch)][:len(self)]
        self._batches.batches = [[(self.seed, epoch, index) for index in batch] for batch in batches[start_batch:]]
        for images, labels in _one_sentence_errors(self._loader):
            yield (images.transpose(0, 1) if images.dim() == 5 else images), labels  # two views: [2, b, ...]


def decode_all(samples, transform, *, num_workers: int, batch_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every image of a split through a deterministic uint8 transform: ``uint8 [N, 3, S, S]``, ``int64 [N]``."""
    dataset = ImageFolderDataset(samples, transform)
    batches = [[(0, 0, i) for i in range(start, min(start + batch_size, len(samples)))]
               for start in range(0, len(samples), batch_size)]
    parts = list(_one_sentence_errors(DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).long()


def channel_stats(images: torch.Tensor) -> Tuple[List[float], List[float]]:
    """Per-channel mean and std in [0, 1] units of ``uint8 [N, 3, H, W]`` (float64 sums)."""
    pixels = images.permute(1, 0, 2, 3).reshape(3, -1).double() / 255.0
    mean = pixels.mean(dim=1)
    std = (pixels.pow(2).mean(dim=1) - mean.pow(2)).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()


def measured_stats(folder: Path, samples, image_size: int, *, num_workers: int,
                   cache_dir: Optional[Path] = None) -> Tuple[List[float], List[float]]:
    """``mean: auto``: the training split's channel statistics at training resolution (resize and
    centre crop), computed once and cached under ``cache_dir`` (default ``~/.cache/deepkd/stats``)."""
    from deepkd.data.cifar import default_root

    key = json.dumps([str(folder.resolve()), len(samples), samples[-1][0], image_size])
    path = (cache_dir or default_root() / "stats") / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
    if path.is_file():
        stats = json.loads(path.read_text())
        return stats["mean"], stats["std"]
    fit = build_transform(train=False, image_size=image_size, resize=image_size, normalize=False)
    mean, std = channel_stats(decode_all(samples, fit, num_workers=num_workers)[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"folder": str(folder), "images": len(samples), "mean": mean, "std": std}))
    return mean, std


def split_samples(root: Path, train_folder: str, val_folder: str):
    """Samples of both splits and the class names; the two splits must hold the same class folders."""
    train_samples, classes = scan(root / train_folder)
    val_samples, val_classes = scan(root / val_folder)
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))[:3]
        only_val = sorted(set(val_classes) - set(classes))[:3]
        raise DataError(f"{root / val_folder} and {root / train_folder} hold different class folders "
                         f"({len(val_classes)} vs {len(classes)}; only in train: {only_train}, "
                         f"only in val: {only_val})")
    return train_samples, val_samples, classes
