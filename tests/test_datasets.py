"""CIFAR-10 and Tiny-ImageNet in their real on-disk formats, and the DeviceLoader's optional rotation."""
import pickle
import tarfile
import zipfile

import pytest
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from deepkd.data import DeviceLoader, cifar
from deepkd.data import tinyimagenet as ti

C10 = cifar.DATASETS["cifar10"]
# torchvision 0.29 deprecates its JPEG codec in favour of TorchCodec; it still works, and warns on every call
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def unpickle(path):
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="latin1")


def test_cifar10_reads_the_real_layout(tmp_path):
    folder = cifar.write_cifar10_format(tmp_path / C10.folder, 53, 17, seed=3)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)])
    meta = unpickle(folder / "batches.meta")
    assert meta["label_names"][0] == "airplane" and meta["num_vis"] == 3072 and meta["num_cases_per_batch"] == 11
    batches = [unpickle(folder / f"data_batch_{i}") for i in range(1, 6)]
    assert set(batches[0]) == {"data", "labels", "filenames", "batch_label"}
    assert batches[0]["data"].dtype.name == "uint8" and batches[0]["data"].shape == (11, 3072)
    train, test, num_classes, mean, std = cifar.load("cifar10", tmp_path, download=False)
    assert num_classes == 10 and mean == C10.mean and std == C10.std
    assert train[0].shape == (53, 3, 32, 32) and train[0].dtype == torch.uint8 and test[0].shape == (17, 3, 32, 32)
    assert train[1].dtype == torch.int64 and train[1].tolist() == sum((b["labels"] for b in batches), [])
    assert test[1].tolist() == unpickle(folder / "test_batch")["labels"]
    row = batches[2]["data"][4]  # sample 4 of batch 3 = sample 11 + 11 + 4 overall
    image = train[0][26]
    for c, y, x in [(0, 0, 1), (1, 5, 7), (2, 31, 30)]:
        assert int(image[c, y, x]) == int(row[c * 1024 + y * 32 + x])  # rows are channel-major, then row, column
    assert torch.equal(image.reshape(-1), torch.from_numpy(row))


def test_cifar100_names_still_work_through_load(tmp_path):
    cifar.write_python_format(tmp_path / cifar.FOLDER, 20, 10)
    train, test, num_classes, mean, std = cifar.load("cifar100", tmp_path, download=False)
    raw = unpickle(tmp_path / cifar.FOLDER / "train")
    assert num_classes == 100 and (mean, std) == (cifar.MEAN, cifar.STD) and train[1].tolist() == raw["fine_labels"]
    assert cifar.ARCHIVE == "cifar-100-python.tar.gz" and cifar.FOLDER == "cifar-100-python"


def test_cifar10_archive_md5_is_checked(tmp_path):
    source = cifar.write_cifar10_format(tmp_path / "src" / C10.folder, 10, 5)
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = cache / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=C10.folder)
    expected_md5 = "c58f30108f718f92721af3b95e74349a"
    with pytest.raises(ValueError, match=f"{archive} has md5 [0-9a-f]{{32}}, expected {expected_md5}"):
        cifar.prepare(cache, download=False, dataset="cifar10")
    assert not (cache / C10.folder).exists()  # nothing extracted from a bad archive
    folder = cifar.prepare(cache, download=False, md5=cifar.md5sum(archive), dataset="cifar10")
    assert folder == cache / C10.folder
    assert torch.equal(cifar.read_split(folder, "test", dataset="cifar10")[0],
                       cifar.read_split(source, "test", dataset="cifar10")[0])


@pytest.mark.parametrize("which", ["cifar10", "tinyimagenet"])
def test_offline_missing_archive_is_one_sentence(tmp_path, which):
    with pytest.raises(FileNotFoundError) as info:
        cifar.load("cifar10", tmp_path, download=False) if which == "cifar10" else ti.load(tmp_path, download=False)
    message = str(info.value)
    archive, url = (C10.archive, C10.url) if which == "cifar10" else (ti.ARCHIVE, ti.URL)
    assert f"put {archive} (from {url})" in message and str(tmp_path) in message
    assert ". " not in message and "\n" not in message


@pytest.fixture
def tiny(tmp_path):
    folder = tmp_path / "data" / ti.FOLDER
    wnids = ti.write_layout(folder, num_per_class=4, num_val=12, num_classes=5, seed=1)
    assert wnids != sorted(wnids)  # so that file order and sorted order give different labels
    return folder, wnids


def color_labels(images, wnids):
    """The label each image's colour says it has (via write_layout's class_color), -1 for grayscale."""
    colors = torch.tensor([ti.class_color(p) for p in range(len(wnids))], dtype=torch.float32)
    position = torch.cdist(images.float().mean((2, 3)), colors).argmin(1)
    labels = torch.tensor([sorted(wnids).index(wnids[p]) for p in position])
    gray = (images[:, 0] == images[:, 1]).all((1, 2)) & (images[:, 1] == images[:, 2]).all((1, 2))
    return torch.where(gray, -1, labels)


def test_tinyimagenet_labels_follow_sorted_wnids(tiny):
    folder, wnids = tiny
    images, labels = ti.read_split(folder, "train")
    assert images.shape == (20, 3, 64, 64) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert labels.tolist() == [c for c in range(5) for _ in range(4)]  # ImageFolder order: class, then file
    seen = color_labels(images, wnids)
    assert (seen == -1).sum() == 5 and torch.equal(seen[seen >= 0], labels[seen >= 0])
    val_images, val_labels = ti.read_split(folder, "val")
    assert val_images.shape == (12, 3, 64, 64) and torch.equal(color_labels(val_images, wnids), val_labels)
    annotated = sorted(sorted(wnids).index(line.split("\t")[1])
                       for line in (folder / "val" / "val_annotations.txt").read_text().splitlines())
    assert val_labels.tolist() == annotated


def test_tinyimagenet_grayscale_jpeg_becomes_rgb(tiny):
    folder, wnids = tiny
    path = folder / "train" / wnids[0] / "images" / f"{wnids[0]}_0.JPEG"
    assert decode_image(str(path), mode=ImageReadMode.UNCHANGED).shape == (1, 64, 64)
    image = ti.decode(path)
    assert image.shape == (3, 64, 64) and torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_tinyimagenet_cache_is_used_then_invalidated(tiny, monkeypatch):
    folder, wnids = tiny
    first = ti.read_split(folder, "train")
    assert (folder / "deepkd-train-uint8.pt").is_file() and not list(folder.glob("*.tmp"))

    def refuse(path):
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(ti, "decode", refuse)
    second = ti.read_split(folder, "train")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    extra = folder / "train" / wnids[1] / "images" / f"{wnids[1]}_9.JPEG"
    extra.write_bytes((folder / "train" / wnids[1] / "images" / f"{wnids[1]}_1.JPEG").read_bytes())
    with pytest.raises(AssertionError, match="decoded"):
        ti.read_split(folder, "train")  # one more file: the cache no longer applies
    monkeypatch.undo()
    assert len(ti.read_split(folder, "train")[1]) == 21


def test_tinyimagenet_corrupt_jpeg_names_the_file(tiny):
    folder, _ = tiny
    path = folder / "val" / "images" / "val_7.JPEG"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    with pytest.raises(ValueError, match=f"{path} cannot be read as an image"):
        ti.read_split(folder, "val")


def test_tinyimagenet_unknown_wnid_in_val_annotations(tiny):
    folder, _ = tiny
    annotations = folder / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    lines[2] = lines[2].replace(lines[2].split("\t")[1], "n99999999")
    annotations.write_text("\n".join(lines) + "\n")
    message = "val_annotations.txt line 3 names class 'n99999999', which is not in wnids.txt"
    with pytest.raises(ValueError, match=message):
        ti.read_split(folder, "val")


def test_tinyimagenet_zip_md5_extract_and_load(tiny, tmp_path):
    source, _ = tiny
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = cache / ti.ARCHIVE
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                handle.write(path, f"{ti.FOLDER}/{path.relative_to(source)}")
    with pytest.raises(ValueError, match=f"{archive} has md5 .* expected {ti.MD5}"):
        ti.prepare(cache, download=False)
    folder = ti.prepare(cache, download=False, md5=cifar.md5sum(archive))
    assert folder == cache / ti.FOLDER and sorted(p.name for p in cache.iterdir()) == [ti.FOLDER, ti.ARCHIVE]
    assert (folder / "words.txt").is_file() and len(list((folder / "train").glob("*/*_boxes.txt"))) == 5
    assert ti.prepare(folder, download=False) == folder  # the extracted folder itself also works
    expected = ti.read_split(source, "train", cache=False)
    train, val, num_classes, mean, std = ti.load(cache, download=False)
    assert torch.equal(train[0], expected[0]) and torch.equal(train[1], expected[1]) and len(val[1]) == 12
    assert num_classes == 200 and mean == (0.4802, 0.4481, 0.3975) and std == (0.2302, 0.2265, 0.2262)


def make_loader(size=32, count=40, batch=16, **kwargs):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
    options = dict(batch_size=batch, mean=(0.5,) * 3, std=(0.25,) * 3, train=True, seed=11)
    options.update(kwargs)
    return DeviceLoader(images, torch.arange(count) % 7, **options), images


def test_rotation_off_is_the_pad_crop_flip_loader():
    plain, images = make_loader()
    zero, _ = make_loader(rotation=0)
    for (x0, y0), (x1, y1) in zip(plain.iter_epoch(2), zero.iter_epoch(2)):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    x, _ = next(plain.iter_epoch(2, start_batch=1))
    chosen, dy, dx, flips = plain.batch_views(2, 1)
    for j in range(len(chosen)):  # the pre-rotation behaviour: zero pad 4, crop at (dy, dx), flip
        padded = torch.nn.functional.pad(images[chosen[j]], (4,) * 4)
        crop = padded[:, dy[j]:dy[j] + 32, dx[j]:dx[j] + 32]
        crop = crop.flip(-1) if flips[j] else crop
        torch.testing.assert_close(x[j], (crop.float() - 127.5) / 63.75)
    rotated, _ = make_loader(rotation=20)
    for index in range(len(plain)):  # the crop/flip stream does not move when rotation is on
        pairs = zip(plain.augment_params(5, index, 16), rotated.augment_params(5, index, 16))
        assert all(torch.equal(a, b) for a, b in pairs)
    assert torch.equal(plain.rotation_angles(5, 0, 16), torch.zeros(16))
    with pytest.raises(ValueError, match="teacher_cache"):
        rotated.batch_views(5, 0)


def test_rotation_equals_torchvision_and_is_a_pure_function_of_seed_epoch_index():
    data, images = make_loader(size=64, pad=0, rotation=20)
    batches = list(data.iter_epoch(3))
    resumed = list(make_loader(size=64, pad=0, rotation=20)[0].iter_epoch(3, start_batch=1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches[1:], resumed))
    order = data.order(3)[16:32]
    angles = data.rotation_angles(3, 1, 16)
    _, _, flips = data.augment_params(3, 1, 16)
    assert angles.abs().max() <= 20 and angles.abs().max() > 10 and angles.std() > 5
    assert not torch.equal(angles, data.rotation_angles(4, 1, 16))
    mismatched = 0
    for j in range(16):
        expected = TF.rotate(images[order[j]], float(angles[j]), interpolation=InterpolationMode.NEAREST)
        expected = expected.flip(-1) if flips[j] else expected
        mismatched += (((expected.float() - 127.5) / 63.75) != batches[1][0][j]).any(0).sum().item()
    assert mismatched <= 16 * 64 * 64 // 1000  # the same sampler; at most a few rounding ties differ
    unrotated = make_loader(size=64, pad=0)[0]
    assert not torch.equal(next(unrotated.iter_epoch(3))[0], batches[0][0])


def test_rotation_ranks_split_the_global_batch():
    whole, _ = make_loader(rotation=15)
    parts = [make_loader(rotation=15, rank=r, world_size=2)[0] for r in range(2)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole.iter_epoch(1), parts[0].iter_epoch(1), parts[1].iter_epoch(1)):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
