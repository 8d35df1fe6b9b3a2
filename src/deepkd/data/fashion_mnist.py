"""Fashion-MNIST (Zalando): 60,000 training and 10,000 test 28x28 grey images of 10 clothing classes.

The four released idx files are read from ``data.root``: a folder holding them, or torchvision's
layout ``<root>/FashionMNIST/raw/``; each may be gzipped (``name.gz``, as released and as Debian's
``dataset-fashion-mnist`` ships them in ``/usr/share/datasets/fashion-mnist``) or not (``name``, as
torchvision extracts them). A file is checked by its CONTENT, the md5 of its uncompressed bytes
(Debian recompressed the archives, so the ``.gz`` checksums differ from Zalando's), and by its idx
header: magic 2051 (images) or 2049 (labels), big-endian int32 counts, 28x28 images, a count that
fits the byte length and the split, labels in 0..9.

The images are zero-padded, centred, to ``image_size`` (32 by default, so the CIFAR model zoo and the
CIFAR augmentation, a padded random crop and flip, run unchanged) and replicated to ``channels``
(3, or 1 for a model that takes grey). ``train_per_class`` keeps a class-balanced subset of the
training split, drawn by ``subset_seed`` (independent of the run's seed); the test split (10,000) is
the validation set. ``mean``/``std`` are measured on the (subset) training images after padding.
"""
from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from deepkd.errors import ConfigError, DataError, MissingFileError

SIDE = 28
NUM_CLASSES = 10
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
TORCHVISION_FOLDER = Path("FashionMNIST") / "raw"
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # idx: 0x00000803 (uint8, 3 dims), 0x00000801 (uint8, 1 dim)
# Each released file's content: md5 of the UNCOMPRESSED bytes and its item count (tests swap this table).
FILES: Dict[str, Tuple[str, int]] = {
    "train-images-idx3-ubyte": ("f4a8712d7a061bf5bd6d2ca38dc4d50a", 60000),
    "train-labels-idx1-ubyte": ("9018921c3c673c538a1fc5bad174d6f9", 60000),
    "t10k-images-idx3-ubyte": ("8181f5470baa50b63fa0f6fddb340f0a", 10000),
    "t10k-labels-idx1-ubyte": ("15d484375f8d13e6eb1aabb0c3f46965", 10000),
}
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_GET_IT = ("apt-get install dataset-fashion-mnist (read from /usr/share/datasets/fashion-mnist when data.root is "
           "unset), or data.download: true (torchvision's download into <root>/FashionMNIST/raw)")


def check_image_size(image_size: int) -> None:
    """``image_size`` must hold the 28x28 images (they are padded, never cropped or resized)."""
    if image_size < SIDE:
        raise ConfigError(f"data.image_size {image_size} is smaller than Fashion-MNIST's {SIDE}x{SIDE} images: set "
                          f"{SIDE} or more (the default 32 pads them for the CIFAR models)")


def _complete(folder: Path) -> bool:
    return all(_find(name, [folder]) is not None for name in FILES)


def resolve_root(root: Optional[str | Path]) -> Path:
    """``root``; unset: Debian's folder when it holds the files, else the download folder."""
    from deepkd.data.cifar import default_root

    if root is not None:
        return Path(root)
    return DEBIAN_ROOT if _complete(DEBIAN_ROOT) else default_root()


def _folders(root: Path) -> List[Path]:
    return [root, root / TORCHVISION_FOLDER]


def _find(name: str, folders: Sequence[Path]) -> Optional[Path]:
    """The first of ``name``, ``name.gz`` in ``folders`` (torchvision keeps both: the extracted one is read)."""
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _download(root: Path, name: str) -> None:
    """torchvision's download of the four files into ``<root>/FashionMNIST/raw`` (md5-checked by it)."""
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(root), train=True, download=True)
    except (OSError, RuntimeError, ValueError) as err:
        # torchvision lists every mirror it tried on lines of their own
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        raise MissingFileError(f"Fashion-MNIST file {name} is not in {_looked(root)} and torchvision's download into "
                               f"{root / TORCHVISION_FOLDER} failed ({reason[:300].rstrip('.:')}): apt-get install "
                               f"dataset-fashion-mnist and leave data.root unset, or put the four files in {root} by "
                               "hand") from None


def locate(root: Path, *, download: bool) -> Dict[str, Path]:
    """The path of each file of :data:`FILES` under ``root``, downloaded first when missing and allowed."""
    found = {name: _find(name, _folders(root)) for name in FILES}
    missing = [name for name, path in found.items() if path is None]
    if missing and download:
        _download(root, missing[0])
        found = {name: _find(name, _folders(root)) for name in FILES}
        missing = [name for name, path in found.items() if path is None]
    if missing:
        raise MissingFileError(_missing(missing[0], root))
    return found


def _looked(root: Path) -> str:
    return " and ".join(str(folder) for folder in _folders(root))


def _missing(name: str, root: Path) -> str:
    return (f"Fashion-MNIST file {name} (or {name}.gz, content md5 {FILES[name][0]}) is not in {_looked(root)}: "
            f"get it with {_GET_IT}")


def _header_problem(data: bytes, name: str) -> Optional[str]:
    """Why ``data`` is not the idx file ``name`` (magic, sizes, count), or None."""
    images = "images" in name
    magic, head = (IMAGE_MAGIC, 16) if images else (LABEL_MAGIC, 8)
    if len(data) < head:
        return f"{len(data)} bytes, shorter than the {head}-byte idx header"
    found, count, *dims = struct.unpack(">4i" if images else ">2i", data[:head])
    if found != magic:
        return f"magic {found}, not the idx {'image' if images else 'label'} file's {magic}"
    if images and dims != [SIDE, SIDE]:
        return f"{dims[0]}x{dims[1]} images, not {SIDE}x{SIDE}"
    expected = head + count * (SIDE * SIDE if images else 1)
    if len(data) != expected:
        return f"{len(data)} bytes where its header's {count} items take {expected}: truncated or padded"
    if count != FILES[name][1]:
        return f"{count} items, not {FILES[name][1]}"
    return None


def read_file(path: Path, name: str) -> np.ndarray:
    """``uint8 [N, 28, 28]`` images or ``uint8 [N]`` labels of the idx file ``path`` (gzipped or not),
    checked against :data:`FILES`; a corrupt file stops with one sentence naming it."""
    expected = FILES[name][0]
    fix = f"delete it and get it again with {_GET_IT.replace('install', 'install --reinstall', 1)}"
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path} is not a readable gzip file ({str(err) or type(err).__name__}; its content "
                            f"should have md5 {expected}): {fix}") from None
    found = hashlib.md5(data).hexdigest()
    problem = _header_problem(data, name)
    if found != expected or problem:
        detail = problem or "its bytes differ from the released file's"
        raise DataError(f"{path} is corrupt: its content has md5 {found}, expected {expected} ({detail}); {fix}")
    if "images" in name:
        return np.frombuffer(data, np.uint8, offset=16).reshape(-1, SIDE, SIDE)
    labels = np.frombuffer(data, np.uint8, offset=8)
    if labels.max(initial=0) >= NUM_CLASSES:
        raise DataError(f"{path} has labels outside 0..{NUM_CLASSES - 1} (found {labels.max()}) although its "
                        f"content md5 {found} is the expected one: {fix}")
    return labels


def read_split(paths: Dict[str, Path], split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``uint8 [N, 28, 28]`` images and ``int64 [N]`` labels of ``train`` or ``test``."""
    image_name, label_name = SPLITS[split]
    images, labels = read_file(paths[image_name], image_name), read_file(paths[label_name], label_name)
    if len(images) != len(labels):
        raise DataError(f"{paths[image_name]} holds {len(images)} images but {paths[label_name]} {len(labels)} "
                        f"labels: get both again with {_GET_IT}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def balanced_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``per_class`` samples of every class, drawn by a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(NUM_CLASSES):
        members = torch.nonzero(labels == label).flatten()
        if len(members) < per_class:
            raise ConfigError(f"data.train_per_class {per_class} is more than the {len(members)} training images "
                              f"of class {CLASSES[label]!r}: set {len(members)} or fewer")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def pad(images: torch.Tensor, image_size: int, channels: int) -> torch.Tensor:
    """``uint8 [N, 28, 28]`` -> ``uint8 [N, channels, image_size, image_size]``: zero-padded, centred
    (an odd margin puts its extra pixel below and right, as torchvision's CenterCrop does), grey
    replicated to every channel."""
    margin = image_size - SIDE
    before = margin // 2
    padded = torch.nn.functional.pad(images, (before, margin - before, before, margin - before))
    return padded[:, None].expand(-1, channels, -1, -1).contiguous()


def grey_stats(images: torch.Tensor, image_size: int) -> Tuple[float, float]:
    """Mean and (population) std in [0, 1] units of ``uint8 [N, 28, 28]`` images zero-padded to
    ``image_size``: exact integer sums of a pixel histogram (padding adds zeros to the count only)."""
    histogram = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    count = len(images) * image_size * image_size
    mean = float((histogram * values).sum()) / count
    square = float((histogram * values * values).sum()) / count
    return mean, max(square - mean * mean, 0.0) ** 0.5


def load(root: Optional[str | Path], *, download: bool, image_size: int, channels: int,
         train_per_class: Optional[int], subset_seed: int):
    """``(train, test, num_classes, mean, std)``: ``train``/``test`` are ``(uint8 [N, channels, S, S],
    int64 [N])`` with ``S = image_size`` (N = 60,000 or ``10 * train_per_class``, and 10,000);
    ``mean``/``std`` have one entry per channel (the grey statistics, repeated)."""
    check_image_size(image_size)
    if channels not in (1, 3):
        raise ConfigError(f"data.channels {channels} is neither 1 (grey) nor 3 (grey replicated to RGB)")
    paths = locate(resolve_root(root), download=download)
    train_images, train_labels = read_split(paths, "train")
    test_images, test_labels = read_split(paths, "test")
    if train_per_class is not None:
        keep = balanced_subset(train_labels, train_per_class, subset_seed)
        train_images, train_labels = train_images[keep], train_labels[keep]
    mean, std = grey_stats(train_images, image_size)
    train = (pad(train_images, image_size, channels), train_labels)
    test = (pad(test_images, image_size, channels), test_labels)
    return train, test, NUM_CLASSES, [mean] * channels, [std] * channels


def write_idx(folder: str | Path, images: np.ndarray, labels: np.ndarray, split: str, *,
              compress: bool = True) -> Dict[str, Tuple[str, int]]:
    """Write ``uint8 [N, 28, 28]`` images and their labels as the split's two idx files (``.gz`` or
    not) in ``folder``, for tests and dry runs; returns their :data:`FILES` entries."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image_name, label_name = SPLITS[split]
    header = struct.pack(">4i", IMAGE_MAGIC, len(images), SIDE, SIDE)
    contents = {image_name: header + images.astype(np.uint8).tobytes(),
                label_name: struct.pack(">2i", LABEL_MAGIC, len(labels)) + labels.astype(np.uint8).tobytes()}
    for name, data in contents.items():
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (folder / name).write_bytes(data)
    return {name: (hashlib.md5(data).hexdigest(), len(images)) for name, data in contents.items()}
