"""CIFAR-10 and CIFAR-100: download (md5-checked), extract and read the official python pickle format.

One table, :data:`DATASETS`, holds what differs between the two sets (URL, md5, folder, batch files,
label key); every function takes ``dataset=`` and defaults to ``"cifar100"``, so the module-level
CIFAR-100 names (``URL``, ``MD5``, ``FOLDER``, ``ARCHIVE``, ``MEAN``, ``STD``) keep their meaning.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from deepkd.errors import DataError, MissingFileError


@dataclass(frozen=True)
class CifarSpec:
    """What differs between CIFAR-10 and CIFAR-100 (``splits`` maps a split to its pickle files)."""

    title: str
    url: str
    md5: str
    folder: str
    splits: dict
    label_key: str
    num_classes: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]

    @property
    def archive(self) -> str:
        """The archive's file name, the last part of ``url``."""
        return self.url.rsplit("/", 1)[-1]


# mean/std: per-channel statistics of each set's 50,000 training images, in [0, 1] pixel units.
DATASETS = {
    "cifar100": CifarSpec("CIFAR-100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                          "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
                          {"train": ("train",), "test": ("test",)}, "fine_labels", 100,
                          (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "cifar10": CifarSpec("CIFAR-10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                         "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
                         {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
                         "labels", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_C100 = DATASETS["cifar100"]
URL, MD5, FOLDER, ARCHIVE, MEAN, STD = _C100.url, _C100.md5, _C100.folder, _C100.archive, _C100.mean, _C100.std


def _spec(dataset: str) -> CifarSpec:
    if dataset not in DATASETS:
        raise ValueError(f"unknown CIFAR dataset {dataset!r}: choose {' or '.join(sorted(DATASETS))}")
    return DATASETS[dataset]


def default_root() -> Path:
    """``$DEEPKD_DATA`` or ``~/.cache/deepkd``."""
    return Path(os.environ.get("DEEPKD_DATA", Path.home() / ".cache" / "deepkd"))


def file_digest(path: Path, algorithm: str = "md5", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in ``chunk``-byte blocks (archives are hundreds of MB)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def md5sum(path: Path) -> str:
    """Hex MD5 digest of a file (the checksum CIFAR and Tiny-ImageNet publish)."""
    return file_digest(path, "md5")


def download_file(url: str, path: Path) -> None:
    """Fetch ``url`` into ``path`` through ``path.part``, so an interrupted download leaves no ``path``."""
    tmp = path.with_name(path.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as handle:
        shutil.copyfileobj(response, handle)
    tmp.replace(path)


_download = download_file  # the name earlier versions used


def fetch_archive(root: Path, archive: Path, url: str, md5: str, missing: str, *, download: bool) -> None:
    """Make sure ``archive`` exists (downloading it if allowed) and has the expected ``md5``.

    ``missing`` is the one-sentence message raised (as ``FileNotFoundError``) when the archive is
    absent and cannot be downloaded; a wrong checksum raises ``ValueError`` naming the file.
    """
    if not archive.is_file():
        if not download:
            raise MissingFileError(missing)
        root.mkdir(parents=True, exist_ok=True)
        try:
            download_file(url, archive)
        except OSError as err:
            raise MissingFileError(f"{missing} (download failed: {err})") from None
    found = md5sum(archive)
    if found != md5:
        raise DataError(f"{archive} has md5 {found}, expected {md5}: the file is corrupt or incomplete; delete it")


def _complete(folder: Path, spec: CifarSpec) -> bool:
    return all((folder / name).is_file() for names in spec.splits.values() for name in names)


def prepare(root: Optional[str | Path] = None, *, download: bool = True, url: Optional[str] = None,
            md5: Optional[str] = None, dataset: str = "cifar100") -> Path:
    """The extracted folder (``cifar-100-python`` or ``cifar-10-batches-py``) under ``root``,
    downloading and checking the archive if needed.

    ``root`` may also point directly at an already-extracted folder. ``url``/``md5`` default to
    the official ones of ``dataset``.
    """
    spec = _spec(dataset)
    root = Path(root) if root is not None else default_root()
    for folder in (root, root / spec.folder):
        if _complete(folder, spec):
            return folder
    archive = root / spec.archive
    fetch_archive(root, archive, url or spec.url, md5 or spec.md5, _missing(root, spec), download=download)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")
    return root / spec.folder


def _missing(root: Path, spec: CifarSpec) -> str:
    return (f"{spec.title} not found: put {spec.archive} (from {spec.url}) or its extracted {spec.folder}/ "
            f"folder in {root}, or set data.root")


def read_split(folder: Path, split: str, *, dataset: str = "cifar100") -> Tuple[torch.Tensor, torch.Tensor]:
    """``uint8 [N, 3, 32, 32]`` images and ``int64 [N]`` labels of ``train`` or ``test``.

    CIFAR-100 gives the 100 fine labels; CIFAR-10's training batches 1..5 are concatenated in order.
    """
    spec = _spec(dataset)
    images, labels = [], []
    for name in spec.splits[split]:
        data, found = _read_batch(Path(folder) / name, spec)
        images.append(data)
        labels.append(found)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _read_batch(path: Path, spec: CifarSpec) -> Tuple[np.ndarray, np.ndarray]:
    """One pickle file's ``uint8 [n, 3, 32, 32]`` rows (CHW) and labels; a truncated, foreign or
    inconsistent file is named in one sentence."""
    fix = f"delete {path.parent} and extract {spec.folder} from the archive again"
    try:
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")  # python-2 pickles of numpy arrays
        data = np.asarray(entry["data"], dtype=np.uint8)
        found = np.asarray(entry[spec.label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError) as err:
        reason = f"no {err} entry" if isinstance(err, KeyError) else type(err).__name__
        raise DataError(f"{path} is truncated or not a {spec.title} pickle ({reason}): {fix}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(found):
        raise DataError(f"{path} holds {list(data.shape)} pixels for {len(found)} labels, not [N, 3072] "
                        f"for N labels: {fix}")
    if len(found) and (found.min() < 0 or found.max() >= spec.num_classes):
        raise DataError(f"{path} has labels outside 0..{spec.num_classes - 1} (found {found.min()}..{found.max()}): "
                        f"it is not {spec.title}; {fix}")
    return data.reshape(-1, 3, 32, 32), found


def load(dataset: str, root: Optional[str | Path] = None, *, download: bool = True):
    """``(train, test, num_classes, mean, std)`` of ``cifar10`` or ``cifar100``.

    ``train``/``test`` are ``(uint8 [N, 3, 32, 32], int64 [N])``; N = 50,000 / 10,000.
    """
    spec = _spec(dataset)
    folder = prepare(root, download=download, dataset=dataset)
    train, test = (read_split(folder, split, dataset=dataset) for split in ("train", "test"))
    return train, test, spec.num_classes, spec.mean, spec.std


def _dump(path: Path, entry: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(entry, handle, protocol=2)


def write_python_format(folder: str | Path, num_train: int, num_test: int, seed: int = 0) -> Path:
    """Write random images in the exact ``cifar-100-python`` layout (``train``, ``test``, ``meta``
    pickles; ``data`` uint8 [N, 3072] CHW rows, ``fine_labels``, ``coarse_labels``), for tests and
    dry runs of real recipes without the real download."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("test", num_test)):
        fine = rng.integers(0, 100, count)
        _dump(folder / split, {"filenames": [f"{split}_{i:05d}.png" for i in range(count)],
                               "batch_label": f"{split} batch", "fine_labels": fine.tolist(),
                               "coarse_labels": (fine // 5).tolist(),
                               "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8)})
    _dump(folder / "meta", {"fine_label_names": [f"class_{i}" for i in range(100)],
                            "coarse_label_names": [f"superclass_{i}" for i in range(20)]})
    return folder


def _cifar10_batch(rng: np.random.Generator, count: int, label: str, names: Sequence[str]) -> dict:
    labels = rng.integers(0, 10, count)
    return {"batch_label": label, "labels": labels.tolist(),
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "filenames": [f"{CIFAR10_CLASSES[c]}_s_{n}.png" for c, n in zip(labels, names)]}


def write_cifar10_format(folder: str | Path, num_train: int, num_test: int, seed: int = 0) -> Path:
    """Write random images in the exact ``cifar-10-batches-py`` layout, for tests and dry runs.

    Files and keys as in the real archive: ``data_batch_1`` .. ``data_batch_5`` (``num_train`` split
    over the five as evenly as possible) and ``test_batch``, each ``{"batch_label", "labels",
    "data": uint8 [n, 3072] CHW rows, "filenames"}``; ``batches.meta`` ``{"label_names",
    "num_cases_per_batch", "num_vis"}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = [len(part) for part in np.array_split(np.arange(num_train), 5)]
    start = 0
    for i, count in enumerate(counts, start=1):
        names = [f"{start + j:06d}" for j in range(count)]
        _dump(folder / f"data_batch_{i}", _cifar10_batch(rng, count, f"training batch {i} of 5", names))
        start += count
    names = [f"{j:06d}" for j in range(num_test)]
    _dump(folder / "test_batch", _cifar10_batch(rng, num_test, "testing batch 1 of 1", names))
    _dump(folder / "batches.meta", {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": max(counts),
                                    "num_vis": 3072})
    return folder
