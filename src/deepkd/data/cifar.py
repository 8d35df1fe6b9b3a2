"""CIFAR-100: download (md5-checked), extract and read the official python pickle format."""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import urllib.request
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE = "cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER = "cifar-100-python"
MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)


def default_root() -> Path:
    """``$DEEPKD_DATA`` or ``~/.cache/deepkd``."""
    return Path(os.environ.get("DEEPKD_DATA", Path.home() / ".cache" / "deepkd"))


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """Hex MD5 digest of a file, read in ``chunk``-byte blocks (archives are ~170 MB)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as handle:
        shutil.copyfileobj(response, handle)
    tmp.replace(path)


def prepare(root: Optional[str | Path] = None, *, download: bool = True, url: str = URL,
            md5: str = MD5) -> Path:
    """The extracted ``cifar-100-python`` folder under ``root`` (downloading and checking if needed).

    ``root`` may also point directly at an already-extracted ``cifar-100-python`` folder.
    """
    root = Path(root) if root is not None else default_root()
    if (root / "train").is_file() and (root / "test").is_file():
        return root
    folder = root / FOLDER
    if (folder / "train").is_file() and (folder / "test").is_file():
        return folder
    archive = root / ARCHIVE
    if not archive.is_file():
        if not download:
            raise FileNotFoundError(_missing(root))
        root.mkdir(parents=True, exist_ok=True)
        try:
            _download(url, archive)
        except OSError as err:
            raise FileNotFoundError(f"{_missing(root)} (download failed: {err})") from None
    found = md5sum(archive)
    if found != md5:
        raise ValueError(f"{archive} has md5 {found}, expected {md5}: the file is corrupt or incomplete; delete it")
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")
    return folder


def _missing(root: Path) -> str:
    return (f"CIFAR-100 not found: put {ARCHIVE} (from {URL}) or its extracted {FOLDER}/ folder in "
            f"{root}, or set data.root")


def read_split(folder: Path, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``uint8 [N, 3, 32, 32]`` images and ``int64 [N]`` fine labels of ``train`` or ``test``."""
    with open(folder / split, "rb") as handle:
        entry = pickle.load(handle, encoding="latin1")
    data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(entry["fine_labels"], dtype=np.int64)
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


def write_python_format(folder: str | Path, num_train: int, num_test: int, seed: int = 0) -> Path:
    """Write random images in the exact ``cifar-100-python`` layout (``train``, ``test``, ``meta``
    pickles; ``data`` uint8 [N, 3072] CHW rows, ``fine_labels``, ``coarse_labels``), for tests and
    dry runs of real recipes without the real download."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("test", num_test)):
        fine = rng.integers(0, 100, count)
        entry = {"filenames": [f"{split}_{i:05d}.png" for i in range(count)], "batch_label": f"{split} batch",
                 "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                 "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8)}
        with open(folder / split, "wb") as handle:
            pickle.dump(entry, handle, protocol=2)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [f"class_{i}" for i in range(100)],
                     "coarse_label_names": [f"superclass_{i}" for i in range(20)]}, handle, protocol=2)
    return folder
