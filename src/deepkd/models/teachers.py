"""The community CIFAR-100 teachers (mdistiller's ``cifar_teachers.tar``) in deepkd's cache, found by name.

What is known, and where it was read:

- URL and layout: the README of megvii-research/mdistiller (commit a08d46f, 2023-11-05, "Training on
  CIFAR-100") says to download ``cifar_teachers.tar`` from the release tagged ``checkpoints`` and
  ``tar xvf`` it into ``./download_ckpts``; its ``mdistiller/models/cifar/__init__.py`` then reads
  ``download_ckpts/cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth``.
- Contents: that file's ``cifar_model_dict`` gives a checkpoint to exactly six models,
  :data:`KNOWN_TEACHERS` (resnet56, resnet110, resnet32x4, ResNet50, wrn_40_2, vgg13), and lists
  every student (resnet8/14/20/32/44, resnet8x4, ResNet18, wrn_16_1/16_2/40_1, vgg8/11/16/19,
  MobileNetV2, ShuffleV1/V2) with none. No listing of the tar that shows another member was found.
  The same six names are what CRD's ``scripts/fetch_pretrained_teachers.sh`` (HobbitLong/RepDistiller,
  commit b84f547) fetches one by one from shape2prog.csail.mit.edu; CRD's ``train_teacher.py`` saves
  ``ckpt_epoch_240.pth`` as ``{"epoch", "model", "accuracy", "optimizer"}`` and its README gives
  their top-1: wrn_40_2 75.61, resnet56 72.34, resnet110 74.31, resnet32x4 79.42, vgg13 74.64,
  ResNet50 79.34.
- Checksum and size: the publisher gives none in the README or the code, and a search of public
  issues and code found none from mdistiller (the release page itself was not reachable from here).
  One third-party script says "about 364 MB" and pins a SHA-256 of the resnet32x4 member; neither
  is the publisher's, so neither is used as a check. That script also allowlists
  ``argparse.Namespace`` and numpy scalars to read the files with ``weights_only=True``, hence
  :func:`deepkd.models.weights.community_checkpoint_globals` (every weights file is read with it).

Verification is therefore (a) the byte count against the server's Content-Length while downloading
and (b) for every ``<name>_vanilla/ckpt_epoch_240.pth``: a strict load into deepkd's model of that
name (100 classes) and finite logits on a zero batch. The size and SHA-256 of each verified file go
to ``verified.json``, so :func:`find_teacher` notices a file that changed afterwards.
"""
from __future__ import annotations

import json
import re
import shutil
import tarfile
import urllib.request
from pathlib import Path
from typing import Optional, Union

import torch

from deepkd.data.cifar import default_root, file_digest
from deepkd.errors import MissingFileError, WeightsError
from deepkd.models.registry import create_model, list_models, model_info
from deepkd.models.weights import load_weights

TEACHERS_URL = "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
ARCHIVE = "cifar_teachers.tar"
FOLDER = "cifar_teachers"
CHECKPOINT = "ckpt_epoch_240.pth"
MANIFEST = "verified.json"
KNOWN_TEACHERS = ("resnet56", "resnet110", "resnet32x4", "ResNet50", "wrn_40_2", "vgg13")
PathLike = Union[str, Path]


def teachers_dir(root: Optional[PathLike] = None) -> Path:
    """``<root>/cifar_teachers``; ``root`` defaults to :func:`deepkd.data.cifar.default_root`
    (``$DEEPKD_DATA`` or ``~/.cache/deepkd``) and may also name the ``cifar_teachers`` folder itself."""
    root = Path(root) if root is not None else default_root()
    return root if root.name == FOLDER else root / FOLDER


def sha256sum(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return file_digest(path, "sha256")


def _reason(err: BaseException) -> str:
    """The first sentence of an error's text: torch's and tarfile's own messages run to several
    sentences or lines, and deepkd's errors are one sentence."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    first = re.split(r"\.\s+(?=[A-Z])", lines[0].rstrip(": "), maxsplit=1)[0]
    return first + ")" * (first.count("(") - first.count(")"))


def _fetch(url: str, archive: Path) -> None:
    """Download to ``<archive>.part`` and rename, so an interrupted download never looks complete."""
    tmp = archive.with_name(archive.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as handle:
            expected = response.headers.get("Content-Length")
            shutil.copyfileobj(response, handle, 1 << 20)
        if expected is not None and tmp.stat().st_size != int(expected):
            raise OSError(f"got {tmp.stat().st_size} of {expected} bytes")
    except (OSError, ValueError) as err:  # URLError, HTTPError, timeouts are OSError; a bad URL ValueError
        tmp.unlink(missing_ok=True)
        raise MissingFileError(f"could not download {url} ({_reason(err)}): download it by hand and put it at "
                                f"{archive}, or run `deepkd download teachers --file <tar>` with a local copy"
                                ) from None
    tmp.replace(archive)


def _checkpoints(folder: Path) -> list:
    return sorted(folder.glob(f"*_vanilla/{CHECKPOINT}"))


def _locate(staging: Path, archive: Path) -> Path:
    """The extracted folder that holds ``<name>_vanilla/`` (the release's top level is ``cifar_teachers/``)."""
    for candidate in (staging / FOLDER, staging):
        if _checkpoints(candidate):
            return candidate
    raise WeightsError(f"{archive} holds no {FOLDER}/<name>_vanilla/{CHECKPOINT} file: it is not mdistiller's "
                     f"{ARCHIVE}")


def _extract(archive: Path, folder: Path) -> None:
    """Extract into a staging folder, then move each ``<name>_vanilla/`` into ``folder``, replacing
    only the folders the tar holds (a user's own teachers next to them are kept)."""
    staging = folder.parent / f".{FOLDER}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:  # check every member before writing any
                tarfile.data_filter(member, str(staging))
            tar.extractall(staging, members=members, filter="data")
        source = _locate(staging, archive)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)  # nothing counts as verified until verification passes
        for entry in sorted(source.iterdir()):
            target = folder / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            entry.replace(target)
    except tarfile.FilterError as err:
        raise WeightsError(f"{archive} holds the member {err.tarinfo.name!r}, which tar's safe 'data' filter "
                         f"refuses ({type(err).__name__}), so nothing was extracted") from None
    except (tarfile.TarError, EOFError) as err:
        raise WeightsError(f"{archive} is not a complete tar archive ({_reason(err)}): delete it and download "
                         f"{TEACHERS_URL} again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _verify_one(name: str, path: Path, folder: Path) -> dict:
    """Strict load into deepkd's ``name`` (100 classes) and finite logits on a zero batch."""
    model = create_model(name, num_classes=100)
    try:
        load_weights(model, path)
    except ValueError as err:  # load_weights names the file and the keys, shapes or read error
        raise WeightsError(_reason(err)) from None
    size = model_info(name).get("input_size", 32)
    with torch.no_grad():
        logits = model.eval()(torch.zeros(2, 3, size, size))
    if logits.shape != (2, 100) or not torch.isfinite(logits).all():
        raise WeightsError(f"{path} loads into {name!r} but gives {list(logits.shape)} logits with non-finite "
                         "values on a zero batch, so its weights are corrupt")
    return {"file": str(path.relative_to(folder)), "bytes": path.stat().st_size, "sha256": sha256sum(path),
            "parameters": sum(p.numel() for p in model.parameters())}


def verify_teachers(folder: PathLike) -> dict:
    """Verify every ``<name>_vanilla/ckpt_epoch_240.pth`` under ``folder``.

    Returns ``{"teachers": {name: {"file", "bytes", "sha256", "parameters"}}, "skipped": {folder_name:
    reason}}``; a folder whose name is no deepkd model is skipped. A checkpoint that fails raises
    ``ValueError`` with one sentence naming the file and the reason.
    """
    folder = Path(folder)
    found = _checkpoints(folder)
    if not found:
        raise WeightsError(f"{folder} holds no <name>_vanilla/{CHECKPOINT} checkpoint to verify")
    known = set(list_models())
    teachers, skipped = {}, {}
    for path in found:
        name = path.parent.name[: -len("_vanilla")]
        if name not in known:
            skipped[path.parent.name] = f"deepkd has no model named {name!r}"
            continue
        teachers[name] = _verify_one(name, path, folder)
    return {"teachers": teachers, "skipped": skipped}


def _write_manifest(folder: Path, report: dict, source: str, archive: Path) -> None:
    manifest = {"format": "deepkd-teachers-1", "source": source, "archive_bytes": archive.stat().st_size,
                "archive_sha256": sha256sum(archive), "published_checksum": None,
                "checks": "strict load into the deepkd model of the name (100 classes), finite logits on a zero batch",
                **report}
    tmp = folder / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(folder / MANIFEST)


def read_manifest(root: Optional[PathLike] = None) -> Optional[dict]:
    """The ``verified.json`` written by :func:`download_teachers`, or None when there is none."""
    path = teachers_dir(root) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _unchanged(folder: Path, manifest: dict) -> bool:
    entries = manifest.get("teachers", {}).values()
    return bool(entries) and all((folder / e["file"]).is_file() and (folder / e["file"]).stat().st_size == e["bytes"]
                                 for e in entries)


def download_teachers(root: Optional[PathLike] = None, *, url: str = TEACHERS_URL,
                      file: Optional[PathLike] = None) -> Path:
    """Download (or take ``file``, a local copy of the tar), extract safely, verify, and write
    ``verified.json``; returns the ``cifar_teachers`` folder.

    Already verified teachers are not downloaded again (unless ``file`` is given). A downloaded tar
    is deleted once its teachers are verified (``verified.json`` keeps its size and SHA-256); a
    ``file`` given by the user is never deleted. Offline, raises ``FileNotFoundError`` with one
    sentence naming the URL and where to put the tar.
    """
    folder = teachers_dir(root)
    manifest = read_manifest(folder)
    if file is None and manifest is not None and _unchanged(folder, manifest):
        return folder
    if file is not None:
        archive = Path(file)
        if not archive.is_file():
            raise MissingFileError(f"{archive} does not exist: download {url} and pass its path to --file")
    else:
        archive = folder.parent / ARCHIVE
        if not archive.is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            _fetch(url, archive)
    _extract(archive, folder)
    _write_manifest(folder, verify_teachers(folder), str(archive.resolve()) if file is not None else url, archive)
    if file is None:
        archive.unlink()
    return folder


def find_teacher(name: str, root: Optional[PathLike] = None) -> Optional[Path]:
    """``<cifar_teachers>/<name>_vanilla/ckpt_epoch_240.pth`` when it is in the cache, else None.

    A file recorded in ``verified.json`` whose size or SHA-256 has changed since raises ``ValueError``.
    """
    folder = teachers_dir(root)
    path = folder / f"{name}_vanilla" / CHECKPOINT
    if not path.is_file():
        return None
    entry = ((read_manifest(folder) or {}).get("teachers") or {}).get(name)
    if entry is not None:
        found_size = path.stat().st_size
        found = sha256sum(path) if found_size == entry["bytes"] else f"a size of {found_size} bytes"
        if found != entry["sha256"]:
            raise WeightsError(f"{path} has changed since `deepkd download teachers` verified it ({found}, "
                             f"expected sha256 {entry['sha256']}): delete it and run `deepkd download teachers` again")
    return path


def missing_teacher_message(name: str, root: Optional[PathLike] = None) -> str:
    """One sentence: where the teacher ``name`` was looked for and how to provide it."""
    folder = teachers_dir(root)
    if name not in KNOWN_TEACHERS:
        return (f"no checkpoint for teacher {name!r} in {folder}, and mdistiller's {ARCHIVE} holds only "
                f"{', '.join(KNOWN_TEACHERS)}: set teacher.weights to a checkpoint of a trained {name}")
    return (f"no checkpoint for teacher {name!r} in {folder}: run `deepkd download teachers`, or download "
            f"{TEACHERS_URL} and run `deepkd download teachers --file <tar>` (or extract it so that "
            f"{folder / f'{name}_vanilla' / CHECKPOINT} exists), or set teacher.weights to a checkpoint file")


def format_teachers(folder: PathLike) -> str:
    """What ``verified.json`` in ``folder`` records, one teacher a line, for the command line."""
    manifest = read_manifest(folder)
    if manifest is None:
        return f"{folder}: no {MANIFEST}, nothing verified"
    lines = [f"{name:<12} {e['parameters'] / 1e6:7.3f}M params  {e['bytes'] / 1e6:8.1f} MB  sha256 {e['sha256']}"
             for name, e in sorted(manifest["teachers"].items())]
    lines += [f"{entry:<12} skipped: {reason}" for entry, reason in sorted(manifest["skipped"].items())]
    lines.append(f"{len(manifest['teachers'])} teachers in {folder}, each loaded strictly into deepkd's model of "
                 f"its name (100 classes) with finite logits; manifest {Path(folder) / MANIFEST}; archive "
                 f"{manifest['archive_bytes']} bytes, sha256 {manifest['archive_sha256']} (no checksum is "
                 "published to compare it with)")
    return "\n".join(lines)
