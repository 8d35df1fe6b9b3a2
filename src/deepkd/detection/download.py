"""MS-COCO 2017 on disk: the official archives, checked, extracted into ``<root>/coco``.

URLs: https://cocodataset.org/#download. COCO publishes no checksums; the md5s below are the ones
other dataset loaders verify, e.g. mlverse/torchvision ``R/dataset-coco.R`` (commit 8eca6bf) and
MLCommons-style download scripts, and the byte sizes are the servers' ``Content-Length`` as recorded
by several public download manifests. A size mismatch is caught before the (minutes-long) md5.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

from deepkd.data.cifar import default_root, fetch_archive
from deepkd.errors import DataError


@dataclass(frozen=True)
class CocoArchive:
    url: str
    md5: str
    size: int  # bytes

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


ARCHIVES = {
    "train2017": CocoArchive("http://images.cocodataset.org/zips/train2017.zip",
                             "cced6f7f71b7629ddf16f17bbcfab6b2", 19_336_861_798),
    "val2017": CocoArchive("http://images.cocodataset.org/zips/val2017.zip",
                           "442b8da7639aecaf257c1dceb8ba8c80", 815_585_330),
    "annotations": CocoArchive("http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
                               "f4bbac642086de4f52a3fdda2de5fa2c", 252_907_541),
}
SPLITS = ("train2017", "val2017")


def coco_paths(folder: Union[str, Path], split: str) -> Tuple[Path, Path]:
    """``(image folder, instances JSON)`` of ``split`` under an extracted COCO ``folder``."""
    folder = Path(folder)
    return folder / split, folder / "annotations" / f"instances_{split}.json"


def prepare_coco(root: Optional[Union[str, Path]] = None, *, splits: Sequence[str] = SPLITS,
                 download: bool = False) -> Path:
    """The folder ``<root>/coco`` holding ``train2017/``, ``val2017/`` and ``annotations/``.

    Extracted folders are used as they are; otherwise the archives in that folder are checked
    (size, md5) and extracted, after downloading them when ``download`` is True (19 GB for
    train2017). ``root`` defaults to ``$DEEPKD_DATA`` or ``~/.cache/deepkd``.
    """
    folder = (Path(root) if root is not None else default_root()) / "coco"
    for split in splits:
        if split not in SPLITS:
            raise DataError(f"unknown COCO split {split!r}: choose from {', '.join(SPLITS)}")
        image_dir, ann_file = coco_paths(folder, split)
        if not ann_file.is_file():
            _fetch_and_extract(folder, ARCHIVES["annotations"], download)
        if not image_dir.is_dir():
            _fetch_and_extract(folder, ARCHIVES[split], download)
    return folder


def _fetch_and_extract(folder: Path, archive: CocoArchive, download: bool) -> None:
    path = folder / archive.name
    missing = (f"COCO {archive.name} not found: put it (from {archive.url}) or its extracted contents in "
               f"{folder}, or allow the download")
    if path.is_file() and path.stat().st_size != archive.size:
        raise DataError(f"{path} has {path.stat().st_size} bytes, expected {archive.size}: the file is incomplete "
                        "or not the official archive; delete it")
    fetch_archive(folder, path, archive.url, archive.md5, missing, download=download)
    try:
        with zipfile.ZipFile(path) as handle:
            handle.extractall(folder)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"could not extract {path} ({err}); delete it and fetch it again") from None
