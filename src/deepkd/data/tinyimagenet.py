"""Tiny-ImageNet-200 (200 classes, 64x64; the third benchmark of DOT, Zhao et al., ICCV 2023).

The official ``tiny-imagenet-200.zip`` (http://cs231n.stanford.edu/tiny-imagenet-200.zip, 248,100,043
bytes; md5 ``90528d7ca1a48142e341f4ef8d21d0de``, the checksum published with the dataset loaders of
e.g. ContinualAI/avalanche, ``avalanche/benchmarks/datasets/tiny_imagenet``) holds::

    tiny-imagenet-200/wnids.txt                     200 WordNet ids, one a line (not sorted)
    tiny-imagenet-200/words.txt                     wnid <TAB> names
    tiny-imagenet-200/train/<wnid>/images/<wnid>_<i>.JPEG    500 a class
    tiny-imagenet-200/train/<wnid>/<wnid>_boxes.txt
    tiny-imagenet-200/val/images/val_<i>.JPEG       10,000
    tiny-imagenet-200/val/val_annotations.txt       file <TAB> wnid <TAB> x0 <TAB> y0 <TAB> x1 <TAB> y1
    tiny-imagenet-200/test/images/test_<i>.JPEG     unlabelled, unused

Labels follow the reference code (megvii-research/mdistiller, ``mdistiller/dataset/tiny_imagenet.py``):
torchvision ``ImageFolder`` over ``train/`` and over ``val/`` re-arranged into class folders, so the
class index is the wnid's position in ``sorted(wnids)`` and samples come in (class, file name) order.
A ``val/`` already re-arranged into ``val/<wnid>/...`` folders is read the same way as ``train/``.

Decoding the 110,000 JPEGs takes minutes, so :func:`read_split` keeps the decoded tensors next to the
data in ``<folder>/deepkd-<split>-uint8.pt`` (written atomically; rebuilt when the listed files or
their labels change; skipped with a warning when the folder is read-only).
"""
from __future__ import annotations

import os
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from deepkd.data.cifar import default_root, fetch_archive
from deepkd.errors import DataError, MissingFileError

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ARCHIVE = "tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
FOLDER = "tiny-imagenet-200"
NUM_CLASSES, SIZE = 200, 64
# Normalisation and training augmentation of the reference code (mdistiller/dataset/tiny_imagenet.py):
# Normalize([0.4802, 0.4481, 0.3975], [0.2302, 0.2265, 0.2262]) after RandomRotation(20) and
# RandomHorizontalFlip(0.5); no crop. As DeviceLoader options: pad=0, flip=True, rotation=20.
MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2302, 0.2265, 0.2262)
AUGMENT = {"pad": 0, "flip": True, "rotation": 20.0}
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def _complete(folder: Path) -> bool:
    return (folder / "wnids.txt").is_file() and (folder / "train").is_dir() and (folder / "val").is_dir()


def prepare(root: Optional[str | Path] = None, *, download: bool = True, url: str = URL, md5: str = MD5) -> Path:
    """The extracted ``tiny-imagenet-200`` folder under ``root`` (downloading, checking and
    extracting ``tiny-imagenet-200.zip`` if needed); ``root`` may also be that folder itself."""
    root = Path(root) if root is not None else default_root()
    for folder in (root, root / FOLDER):
        if _complete(folder):
            return folder
    archive = root / ARCHIVE
    missing = (f"Tiny-ImageNet not found: put {ARCHIVE} (from {URL}) or its extracted {FOLDER}/ folder in "
               f"{root}, or set data.root")
    fetch_archive(root, archive, url, md5, missing, download=download)
    # extract beside the target and rename at the end, so an interrupted extraction is never mistaken
    # for a complete folder on the next start
    staging = root / f".{FOLDER}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(archive) as handle:
        handle.extractall(staging)  # zipfile drops absolute paths and ".." components
    if not _complete(staging / FOLDER):
        raise DataError(f"{archive} does not contain {FOLDER}/wnids.txt, train/ and val/: delete it and "
                         "download it again")
    (staging / FOLDER).replace(root / FOLDER)
    shutil.rmtree(staging, ignore_errors=True)
    return root / FOLDER


def read_wnids(folder: Path) -> List[str]:
    """The sorted wnids of ``folder/wnids.txt``: ``wnids[label]`` is the class of ``label``."""
    path = Path(folder) / "wnids.txt"
    wnids = sorted({line.strip() for line in path.read_text().splitlines() if line.strip()})
    if not wnids:
        raise DataError(f"{path} lists no classes: re-extract {ARCHIVE}")
    return wnids


def _images_under(directory: Path) -> List[Path]:
    """Image files under ``directory``, recursively, in ImageFolder's order (sorted walk, sorted names)."""
    found = []
    for base, _, names in sorted(os.walk(directory, followlinks=True)):
        found += [Path(base) / n for n in sorted(names) if Path(n).suffix.lower() in _IMAGE_SUFFIXES]
    return found


def _class_folders(directory: Path, wnids: List[str]) -> Tuple[List[Path], List[int]]:
    files, labels = [], []
    for label, wnid in enumerate(wnids):
        if not (directory / wnid).is_dir():
            raise MissingFileError(f"{directory / wnid} is missing (class {wnid} of wnids.txt): re-extract {ARCHIVE}")
        found = _images_under(directory / wnid)
        files += found
        labels += [label] * len(found)
    return files, labels


def _annotated_val(val: Path, wnids: List[str]) -> Tuple[List[Path], List[int]]:
    index = {wnid: i for i, wnid in enumerate(wnids)}
    path = val / "val_annotations.txt"
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, wnid = line.split("\t")[:2]
        if wnid not in index:
            raise DataError(f"{path} line {number} names class {wnid!r}, which is not in wnids.txt")
        pairs.append((index[wnid], name))
    pairs.sort()  # ImageFolder's order over the val set re-arranged into class folders
    return [val / "images" / name for _, name in pairs], [label for label, _ in pairs]


def list_split(folder: Path, split: str) -> Tuple[List[Path], List[int]]:
    """The image files and labels of ``train`` or ``val`` (see the module docstring for the order)."""
    folder = Path(folder)
    wnids = read_wnids(folder)
    if split == "train":
        return _class_folders(folder / "train", wnids)
    if split != "val":
        raise DataError(f"unknown Tiny-ImageNet split {split!r}: choose train or val")
    if (folder / "val" / "val_annotations.txt").is_file() and (folder / "val" / "images").is_dir():
        return _annotated_val(folder / "val", wnids)
    return _class_folders(folder / "val", wnids)


def decode(path: Path) -> torch.Tensor:
    """One image file as uint8 ``[3, 64, 64]`` (grayscale JPEGs are expanded to RGB)."""
    from torchvision.io import ImageReadMode, decode_image  # torchvision is the optional "vision" extra

    try:
        image = decode_image(torch.from_numpy(np.fromfile(path, dtype=np.uint8)), mode=ImageReadMode.RGB)
    except (OSError, RuntimeError, ValueError) as err:
        raise DataError(f"{path} cannot be read as an image ({err}): replace it from {ARCHIVE}") from None
    if tuple(image.shape) != (3, SIZE, SIZE):
        raise DataError(f"{path} is {tuple(image.shape[1:])} pixels, not {SIZE}x{SIZE}: replace it from {ARCHIVE}")
    return image


def _load_cache(path: Path, labels: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None
    if not isinstance(cached, dict) or cached.get("files") != len(labels):
        return None
    if not isinstance(cached.get("labels"), torch.Tensor) or not torch.equal(cached["labels"], labels):
        return None
    return cached["images"], cached["labels"]


def _save_cache(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"files": len(labels), "images": images, "labels": labels}, tmp)
        tmp.replace(path)  # atomic: a reader sees the old cache or the whole new one
    except OSError as err:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write the decoded-image cache {path} ({err}); the JPEGs will be decoded "
                      "again next time", stacklevel=2)


def read_split(folder: Path, split: str, *, cache: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """``uint8 [N, 3, 64, 64]`` images and ``int64 [N]`` labels of ``train`` (100,000) or ``val`` (10,000).

    With ``cache`` the decoded tensors are read from / written to ``<folder>/deepkd-<split>-uint8.pt``.
    """
    files, labels = list_split(folder, split)
    labels = torch.tensor(labels, dtype=torch.int64)
    path = Path(folder) / f"deepkd-{split}-uint8.pt"
    cached = _load_cache(path, labels) if cache else None
    if cached is not None:
        return cached
    images = torch.empty(len(files), 3, SIZE, SIZE, dtype=torch.uint8)
    for i, file in enumerate(files):
        images[i] = decode(file)
    if cache:
        _save_cache(path, images, labels)
    return images, labels


def load(root: Optional[str | Path] = None, *, download: bool = True):
    """``(train, val, 200, MEAN, STD)`` like :func:`deepkd.data.cifar.load`; train/val are
    ``(uint8 [N, 3, 64, 64], int64 [N])``. Train with the DeviceLoader options in :data:`AUGMENT`."""
    folder = prepare(root, download=download)
    return read_split(folder, "train"), read_split(folder, "val"), NUM_CLASSES, MEAN, STD


def class_color(position: int) -> Tuple[int, int, int]:
    """The mean RGB colour :func:`write_layout` gives the class on line ``position`` of wnids.txt
    (6 levels a channel, 40 apart, so up to 216 classes stay distinguishable after JPEG coding)."""
    return tuple(30 + 40 * ((position // step) % 6) for step in (1, 6, 36))


def _write_jpeg(path: Path, rng: np.random.Generator, position: int, gray: bool = False) -> None:
    from torchvision.io import encode_jpeg

    noise = rng.integers(-12, 13, (3, SIZE, SIZE))
    pixels = torch.from_numpy((np.array(class_color(position))[:, None, None] + noise).astype(np.uint8))
    if gray:  # some real Tiny-ImageNet JPEGs are single-channel
        pixels = pixels.float().mean(0, keepdim=True).round().to(torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_jpeg(pixels, quality=90).numpy().tobytes())


def _box(rng: np.random.Generator) -> str:
    x0, y0 = rng.integers(0, SIZE // 2, 2)
    x1, y1 = rng.integers(SIZE // 2, SIZE, 2)
    return f"{x0}\t{y0}\t{x1}\t{y1}"


def write_layout(folder: str | Path, num_per_class: int, num_val: int, num_classes: int = NUM_CLASSES,
                 seed: int = 0, num_test: int = 2) -> List[str]:
    """Write random 64x64 JPEGs in the exact ``tiny-imagenet-200`` layout, for tests and dry runs.

    ``folder`` becomes the ``tiny-imagenet-200`` folder: ``wnids.txt`` (unsorted, like the real
    one), ``words.txt``, ``train/<wnid>/images/<wnid>_<i>.JPEG`` and ``<wnid>_boxes.txt``,
    ``val/images/val_<i>.JPEG`` (class of val image ``i``: line ``i % num_classes`` of wnids.txt) with
    ``val_annotations.txt``, and ``num_test`` unlabelled ``test/images/test_<i>.JPEG``. Each class's
    images are noise around :func:`class_color` of its wnids.txt line; each class's first training
    image is a grayscale JPEG. Returns the wnids in wnids.txt order.
    """
    folder, rng = Path(folder), np.random.default_rng(seed)
    wnids = [f"n{n:08d}" for n in rng.choice(10 ** 8, num_classes, replace=False)]  # random, so unsorted
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (folder / "words.txt").write_text("".join(f"{w}\tsynthetic class {i}\n" for i, w in enumerate(wnids)))
    for position, wnid in enumerate(wnids):
        names = [f"{wnid}_{i}.JPEG" for i in range(num_per_class)]
        for i, name in enumerate(names):
            _write_jpeg(folder / "train" / wnid / "images" / name, rng, position, gray=i == 0)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(f"{n}\t{_box(rng)}\n" for n in names))
    lines = []
    for i in range(num_val):
        _write_jpeg(folder / "val" / "images" / f"val_{i}.JPEG", rng, i % num_classes)
        lines.append(f"val_{i}.JPEG\t{wnids[i % num_classes]}\t{_box(rng)}\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    for i in range(num_test):
        _write_jpeg(folder / "test" / "images" / f"test_{i}.JPEG", rng, i % num_classes)
    return wnids
