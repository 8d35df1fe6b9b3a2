"""``deepkd download teachers``: a tar in the exact layout of mdistiller's ``cifar_teachers.tar``, written
here from small randomly initialised deepkd models, downloaded from a ``file://`` URL, extracted,
verified and found by name; corrupt, wrong-shape and escaping members and an unreachable URL fail
with one sentence."""
import argparse
import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch

from deepkd.cli import main
from deepkd.models import create_model, load_weights
from deepkd.models.teachers import (
    CHECKPOINT,
    KNOWN_TEACHERS,
    MANIFEST,
    TEACHERS_URL,
    download_teachers,
    find_teacher,
    missing_teacher_message,
    sha256sum,
    teachers_dir,
    verify_teachers,
)

SMALL = ("resnet8", "resnet20", "wrn_16_1")
UNREACHABLE = "http://127.0.0.1:9/cifar_teachers.tar"  # port 9 (discard): nothing listens, refused at once


def one_sentence(message):
    """No line break and no full stop followed by a new capitalised sentence."""
    return "\n" not in message and not re.search(r"[.!?]\s+[A-Z]", message)


def checkpoint_bytes(model, *, legacy=False):
    """A ``torch.save`` of ``{"model": state_dict, ...}`` like CRD's ``train_teacher.py`` writes; the legacy
    (pre-zip) one also carries the run's argparse options and a numpy-1.x scalar accuracy."""
    state = {"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(71.5)}
    if not legacy:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()
    state.update(opt=argparse.Namespace(model="resnet20", learning_rate=0.05), accuracy=np.float64(71.5))
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=False)
    # numpy 1.x, which wrote the 2019 files, pickled scalars as numpy.core.multiarray.scalar; protocol 2
    # stores globals as text lines, so renaming numpy 2's numpy._core keeps the pickle valid
    data = buffer.getvalue().replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
    assert b"numpy.core.multiarray\nscalar" in data
    return data


def add_file(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path, members):
    """``members``: ``{arcname: bytes}`` in the given order, with ``cifar_teachers/`` folder entries."""
    with tarfile.open(path, "w") as tar:
        for folder in sorted({n.rsplit("/", 1)[0] for n in members if n.startswith("cifar_teachers/")}):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in members.items():
            add_file(tar, name, data)
    return path


def member(name):
    return f"cifar_teachers/{name}_vanilla/{CHECKPOINT}"


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: create_model(name, num_classes=100).eval() for name in SMALL}


@pytest.fixture(scope="module")
def good_tar(tmp_path_factory, models):
    members = {member(n): checkpoint_bytes(m, legacy=n == "resnet20") for n, m in models.items()}
    members[member("notamodel")] = checkpoint_bytes(models["resnet8"])  # deepkd has no such model: skipped
    return write_tar(tmp_path_factory.mktemp("release") / "cifar_teachers.tar", members)


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, good_tar):
    root = tmp_path_factory.mktemp("cache")
    return root, download_teachers(root, url=good_tar.as_uri())


def test_download_extracts_verifies_and_writes_manifest(downloaded):
    root, folder = downloaded
    assert folder == teachers_dir(root) == root / "cifar_teachers"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert sorted(manifest["teachers"]) == sorted(SMALL)
    assert list(manifest["skipped"]) == ["notamodel_vanilla"]
    for name, entry in manifest["teachers"].items():
        path = folder / entry["file"]
        assert entry["file"] == f"{name}_vanilla/{CHECKPOINT}"
        assert entry["bytes"] == path.stat().st_size and entry["sha256"] == sha256sum(path)
    assert manifest["published_checksum"] is None and len(manifest["archive_sha256"]) == 64
    assert not (root / "cifar_teachers.tar").exists()  # a downloaded tar is removed once verified
    assert not list(root.glob("*.part")) and not list(root.glob(".cifar_teachers*"))


def test_found_teacher_gives_the_saved_logits(downloaded, models):
    root, folder = downloaded
    x = torch.randn(4, 3, 32, 32)
    for name, model in models.items():
        path = find_teacher(name, root)
        assert path == folder / f"{name}_vanilla" / CHECKPOINT
        loaded = load_weights(create_model(name, num_classes=100), path).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert find_teacher("resnet56", root) is None


def test_verified_teachers_are_not_downloaded_again(downloaded):
    root, folder = downloaded
    assert download_teachers(root, url=UNREACHABLE) == folder  # would raise if it tried the network


def test_changed_checkpoint_is_caught_by_find_teacher(tmp_path, good_tar):
    folder = download_teachers(tmp_path, url=good_tar.as_uri())
    path = folder / "wrn_16_1_vanilla" / CHECKPOINT
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights: still loads, so only the hash sees it
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as err:
        find_teacher("wrn_16_1", tmp_path)
    assert str(path) in str(err.value) and "has changed" in str(err.value) and one_sentence(str(err.value))
    assert find_teacher("resnet8", tmp_path) is not None


@pytest.mark.parametrize("fault", ["wrong_shape", "renamed_keys", "corrupt_bytes", "nan_weights"])
def test_bad_checkpoint_fails_naming_the_file(tmp_path, models, fault):
    state = {k: v.clone() for k, v in models["resnet8"].state_dict().items()}
    if fault == "wrong_shape":
        data = checkpoint_bytes(create_model("resnet8", num_classes=10))
    elif fault in ("renamed_keys", "nan_weights"):
        if fault == "renamed_keys":
            state["classifier.weight"] = state.pop("fc.weight")
        else:
            state["fc.bias"][3] = float("nan")  # loads strictly; only the forward pass shows it
        buffer = io.BytesIO()
        torch.save({"model": state}, buffer)
        data = buffer.getvalue()
    else:
        data = checkpoint_bytes(models["resnet8"])[:4096]  # a truncated file
    tar = write_tar(tmp_path / "cifar_teachers.tar", {member("resnet20"): checkpoint_bytes(models["resnet20"]),
                                                     member("resnet8"): data})
    with pytest.raises(ValueError) as err:
        download_teachers(tmp_path / "cache", url=tar.as_uri())
    message = str(err.value)
    assert str(tmp_path / "cache" / member("resnet8")) in message and one_sentence(message)
    assert {"wrong_shape": "shape mismatch", "renamed_keys": "fc.weight", "corrupt_bytes": "corrupt",
            "nan_weights": "non-finite"}[fault] in message
    assert not (tmp_path / "cache" / "cifar_teachers" / MANIFEST).exists()
    assert (tmp_path / "cache" / "cifar_teachers.tar").exists()  # kept: the user may want to inspect it


def test_verify_teachers_reports_an_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="holds no"):
        verify_teachers(tmp_path)


def test_offline_message_names_the_url_and_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        download_teachers(tmp_path, url=UNREACHABLE)
    message = str(err.value)
    assert UNREACHABLE in message and str(tmp_path / "cifar_teachers.tar") in message
    assert "--file" in message and one_sentence(message)
    assert not list(tmp_path.glob("*.part")) and not (tmp_path / "cifar_teachers").exists()


def test_cli_takes_a_local_tar(tmp_path, good_tar, capsys):
    assert main(["download", "teachers", "--root", str(tmp_path), "--file", str(good_tar)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cifar_teachers") in out and all(name in out for name in SMALL)
    assert good_tar.is_file()  # the user's own copy is never deleted
    assert find_teacher("resnet20", tmp_path) is not None


def test_cli_reports_a_missing_local_tar(tmp_path, capsys):
    assert main(["download", "teachers", "--root", str(tmp_path), "--file", str(tmp_path / "nope.tar")]) == 2
    assert "nope.tar does not exist" in capsys.readouterr().err


def test_a_file_that_is_not_a_tar_is_refused(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"<html>not found</html>" * 100)
    with pytest.raises(ValueError, match="not a complete tar archive") as err:
        download_teachers(tmp_path / "cache", file=junk)
    assert str(junk) in str(err.value) and one_sentence(str(err.value))


@pytest.mark.parametrize("escape", ["parent_path", "symlink_out"])
def test_member_escaping_the_folder_is_refused(tmp_path, models, escape):
    tar_path = tmp_path / "release" / "cifar_teachers.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tar:
        add_file(tar, member("resnet8"), checkpoint_bytes(models["resnet8"]))
        if escape == "parent_path":
            add_file(tar, "cifar_teachers/../../../evil.txt", b"owned")  # would land in tmp_path
        else:
            link = tarfile.TarInfo("cifar_teachers/resnet8_vanilla/evil")
            link.type, link.linkname = tarfile.SYMTYPE, "../../../evil.txt"
            tar.addfile(link)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError) as err:
        download_teachers(cache, file=tar_path)
    message = str(err.value)
    assert "evil" in message and "nothing was extracted" in message and one_sentence(message)
    assert not list(tmp_path.rglob("evil*")) and not (cache / "cifar_teachers" / "resnet8_vanilla").exists()


def test_missing_teacher_message_is_one_actionable_sentence(tmp_path):
    message = missing_teacher_message("resnet32x4", tmp_path)
    assert one_sentence(message) and TEACHERS_URL in message and "deepkd download teachers" in message
    assert str(tmp_path / "cifar_teachers" / "resnet32x4_vanilla" / CHECKPOINT) in message
    assert "teacher.weights" in message
    other = missing_teacher_message("resnet8x4", tmp_path)
    assert one_sentence(other) and all(name in other for name in KNOWN_TEACHERS) and "teacher.weights" in other


def test_recipe_without_teacher_weights_finds_the_cached_teacher(tmp_path, models, monkeypatch):
    from deepkd.train.build import build_teacher
    from deepkd.train.run_config import ModelConfig

    monkeypatch.setenv("DEEPKD_DATA", str(tmp_path / "cache"))
    dkd = "dkd"
    with pytest.raises(FileNotFoundError, match="deepkd download teachers"):
        build_teacher(ModelConfig(name="resnet56"), dkd, 100)
    with pytest.raises(FileNotFoundError, match="holds only"):
        build_teacher(ModelConfig(name="resnet20"), dkd, 100)
    tar = write_tar(tmp_path / "cifar_teachers.tar", {member("resnet20"): checkpoint_bytes(models["resnet20"])})
    download_teachers(file=str(tar))
    teacher = build_teacher(ModelConfig(name="resnet20"), dkd, 100)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(teacher(x), models["resnet20"](x))
    with pytest.raises(ValueError, match="teacher.weights is not set"):  # 100-class teachers only for CIFAR-100
        build_teacher(ModelConfig(name="resnet20"), dkd, 10, "cifar10")
