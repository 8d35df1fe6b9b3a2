"""Fashion-MNIST from its idx files (gzipped or not, flat or torchvision's layout), written small here."""
import gzip
import hashlib
import json
import re

import numpy as np
import pytest
import torch

from deepkd.data import build_data
from deepkd.data import fashion_mnist as fm
from deepkd.data.teacher_cache import TeacherLogitCache
from deepkd.errors import ConfigError, DataError, MissingFileError
from deepkd.train.config import config_to_dict
from deepkd.train.config_errors import validate_config

TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 2


def one_sentence(message):
    return "\n" not in message and not re.search(r"[.!?]\s+[A-Z]", message)


def write_set(folder, monkeypatch, *, compress=True, seed=0):
    """Random images of 10 classes in the four idx files under ``folder``; :data:`fm.FILES` is swapped
    for their md5s and counts. Returns ``{split: (images uint8 [N, 28, 28], labels)}``."""
    rng = np.random.default_rng(seed)
    written, table = {}, {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        images = rng.integers(1, 256, (len(labels), 28, 28), dtype=np.uint8)  # no zero: padding stands out
        table.update(fm.write_idx(folder, images, labels, split, compress=compress))
        written[split] = (images, labels)
    monkeypatch.setattr(fm, "FILES", table)
    return written


def load(root, **changes):
    options = {"batch_size": 16, "download": False, **changes}
    return build_data("fashion_mnist", root=str(root), **options)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("compress", [True, False])
def test_reads_the_idx_files_pads_them_centred_and_replicates_grey(tmp_path, monkeypatch, layout, compress):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    written = write_set(folder, monkeypatch, compress=compress)
    suffix = ".gz" if compress else ""
    assert sorted(p.name for p in folder.iterdir()) == sorted(name + suffix for name in fm.FILES)
    raw = (folder / f"train-images-idx3-ubyte{suffix}").read_bytes()
    raw = gzip.decompress(raw) if compress else raw
    assert raw[:16] == bytes.fromhex("00000803 0000003c 0000001c 0000001c")  # magic 2051, 60 images, 28 x 28
    data = load(tmp_path)
    images, labels = written["train"]
    train = data.train.images
    assert train.shape == (60, 3, 32, 32) and data.test.images.shape == (20, 3, 32, 32)
    assert data.num_classes == 10 and data.input_size == 32 and data.classes[0] == "T-shirt/top"
    assert data.classes[-1] == "Ankle boot" and torch.equal(data.train.labels, torch.from_numpy(labels).long())
    for channel in range(3):  # the 28 x 28 image at rows and columns 2..29, zeros around it, in every channel
        assert torch.equal(train[:, channel, 2:30, 2:30], torch.from_numpy(images))
    assert train[:, :, :2].eq(0).all() and train[:, :, 30:].eq(0).all()
    assert train[:, :, :, :2].eq(0).all() and train[:, :, :, 30:].eq(0).all()
    assert torch.equal(data.test.images[:, 1, 2:30, 2:30], torch.from_numpy(written["test"][0]))


def test_odd_sizes_put_the_extra_pixel_below_and_right_and_grey_has_one_channel(tmp_path, monkeypatch):
    images = torch.from_numpy(write_set(tmp_path, monkeypatch)["train"][0])
    grey = load(tmp_path, image_size=33, channels=1).train.images
    assert grey.shape == (60, 1, 33, 33) and torch.equal(grey[:, 0, 2:30, 2:30], images)
    assert grey[:, 0, 30:].eq(0).all() and grey[:, 0, :, 30:].eq(0).all() and grey[:, 0, :2].eq(0).all()
    assert torch.equal(load(tmp_path, image_size=28, channels=1).train.images[:, 0], images)  # no padding


def test_one_channel_batches_are_the_grey_channel_of_the_three_channel_ones(tmp_path, monkeypatch):
    write_set(tmp_path, monkeypatch)
    grey, rgb = load(tmp_path, channels=1, seed=5), load(tmp_path, channels=3, seed=5)
    assert len(grey.mean) == 1 and len(rgb.mean) == 3 and rgb.mean == grey.mean * 3
    for (x_grey, y_grey), (x_rgb, y_rgb) in zip(grey.train.iter_epoch(1), rgb.train.iter_epoch(1)):
        assert x_grey.shape[1] == 1 and torch.equal(y_grey, y_rgb)
        assert torch.equal(x_grey[:, 0], x_rgb[:, 0]) and torch.equal(x_rgb[:, 0], x_rgb[:, 2])  # same crops, flips
    with pytest.raises(ConfigError, match="two-view methods need data.channels: 3"):
        load(tmp_path, channels=1, strong=True)


def test_train_per_class_is_a_seeded_class_balanced_subset(tmp_path, monkeypatch):
    images, labels = write_set(tmp_path, monkeypatch)["train"]
    first = load(tmp_path, train_per_class=4, subset_seed=1)
    assert first.train.images.shape == (40, 3, 32, 32) and first.test.num_samples == 20  # the test split stays whole
    assert torch.bincount(first.train.labels, minlength=10).tolist() == [4] * 10
    again, other = load(tmp_path, train_per_class=4, subset_seed=1, seed=9), load(tmp_path, train_per_class=4,
                                                                                   subset_seed=2)
    assert torch.equal(first.train.images, again.train.images)  # the run's seed does not change the subset
    assert not torch.equal(first.train.images, other.train.images)
    kept = fm.balanced_subset(torch.from_numpy(labels).long(), 4, 1)
    assert torch.equal(first.train.images[:, 0, 2:30, 2:30], torch.from_numpy(images)[kept])
    with pytest.raises(ConfigError, match=r"data.train_per_class 7 is more than the 6 training images of class"):
        load(tmp_path, train_per_class=7)


def test_crop_pad_zero_trains_on_whole_images_flipped_or_not(tmp_path, monkeypatch):
    """``crop_pad: 0``: every training view is the padded image itself or its mirror; the default 4
    shifts some; the teacher-logit cache then holds two views an image (flip or not)."""
    write_set(tmp_path, monkeypatch)

    def views(data):
        stored = data.train.images.float()
        for epoch in (1, 2):
            for index, (batch, _) in enumerate(data.train.iter_epoch(epoch)):
                raw = batch * torch.tensor(data.std)[:, None, None] + torch.tensor(data.mean)[:, None, None]
                whole = stored[data.train.batch_indices(epoch, index)] / 255.0
                for image, source in zip(raw, whole):
                    yield any(torch.allclose(image, view, atol=1e-5) for view in (source, source.flip(-1)))

    uncropped, cropped = list(views(load(tmp_path, crop_pad=0, seed=4))), list(views(load(tmp_path, seed=4)))
    assert all(uncropped) and len(uncropped) == 120 and not all(cropped)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()
    data = load(tmp_path, crop_pad=0)
    cache = TeacherLogitCache.build(teacher, data.train, batch_size=32, dtype=torch.float32)
    assert cache.logits.shape == (60, 2, 10) and cache.pad == 0
    batch, _ = next(iter(data.train.iter_epoch(1)))
    with torch.no_grad():
        torch.testing.assert_close(cache.lookup(*data.train.batch_views(1, 0)), teacher(batch), rtol=1e-5, atol=1e-5)


def test_mean_and_std_are_measured_on_the_padded_training_images(tmp_path, monkeypatch):
    write_set(tmp_path, monkeypatch)
    data = load(tmp_path, train_per_class=3)
    pixels = data.train.images[:, 0].double() / 255  # the subset, after padding
    assert data.mean == pytest.approx([pixels.mean().item()] * 3, abs=1e-12)
    assert data.std == pytest.approx([pixels.std(unbiased=False).item()] * 3, abs=1e-12)
    assert load(tmp_path).mean != data.mean


def test_a_missing_file_names_it_the_folders_its_md5_and_how_to_get_it(tmp_path, monkeypatch):
    write_set(tmp_path, monkeypatch)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MissingFileError) as info:
        load(tmp_path)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte" in message and fm.FILES["t10k-labels-idx1-ubyte"][0] in message
    assert f"{tmp_path} and {tmp_path / 'FashionMNIST' / 'raw'}" in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.download: true" in message
    assert one_sentence(message), message


def test_download_goes_through_torchvision_then_our_reader(tmp_path, monkeypatch):
    calls = []

    class FakeFashionMNIST:  # what torchvision's download leaves: <root>/FashionMNIST/raw, extracted files
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_set(tmp_path / "FashionMNIST" / "raw", monkeypatch, compress=False)

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", FakeFashionMNIST)
    data = load(tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True)] and data.train.num_samples == 60
    load(tmp_path, download=True)
    assert len(calls) == 1  # present now: not downloaded again

    class Offline:
        def __init__(self, root, train, download):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://mirror/, got:\n"
                               "<urlopen error [Errno -2] Name or service not known>\n")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", Offline)
    with pytest.raises(MissingFileError) as info:
        load(tmp_path / "elsewhere", download=True)
    message = str(info.value)
    assert "torchvision's download into" in message and "Name or service not known" in message
    assert one_sentence(message), message


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_files_are_one_sentence_with_the_md5s_and_the_fix(tmp_path, monkeypatch):
    write_set(tmp_path, monkeypatch, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    expected = fm.FILES["train-images-idx3-ubyte"][0]
    _flip_byte(path, 500)  # one pixel
    found = hashlib.md5(path.read_bytes()).hexdigest()
    with pytest.raises(DataError) as info:
        load(tmp_path)
    message = str(info.value)
    assert f"{path} is corrupt: its content has md5 {found}, expected {expected}" in message
    assert "delete it and get it again" in message and "--reinstall dataset-fashion-mnist" in message
    assert one_sentence(message), message
    _flip_byte(path, 500)
    _flip_byte(path, 3)  # magic 2051 -> 2050
    with pytest.raises(DataError, match="magic 2050, not the idx image file's 2051") as info:
        load(tmp_path)
    assert one_sentence(str(info.value))
    _flip_byte(path, 3)
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    with pytest.raises(DataError, match=r"content has md5 [0-9a-f]{32}, expected .* bytes where its header's 60 "
                                        r"items take 47056: truncated"):
        load(tmp_path)


def test_a_broken_gzip_file_and_a_bad_header_under_a_matching_md5(tmp_path, monkeypatch):
    write_set(tmp_path, monkeypatch)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match=f"{path} is not a readable gzip file .*its content should have md5 "
                                        f"{fm.FILES['t10k-images-idx3-ubyte'][0]}") as info:
        load(tmp_path)
    assert one_sentence(str(info.value)), str(info.value)
    labels = np.full(20, 10, np.uint8)  # a label past 9, in a file whose md5 the table expects
    fm.FILES.update(fm.write_idx(tmp_path, np.zeros((20, 28, 28), np.uint8), labels, "test"))
    with pytest.raises(DataError, match=r"labels outside 0..9 \(found 10\)"):
        load(tmp_path)


def test_config_reads_its_defaults_from_build_data_and_refuses_what_does_not_fit():
    cfg = validate_config({"data": {"dataset": "fashion_mnist"}, "student": {"name": "resnet8"}})
    data = config_to_dict(cfg)["data"]
    assert {k: data[k] for k in ("image_size", "channels", "train_per_class", "subset_seed")} == {
        "image_size": 32, "channels": 3, "train_per_class": None, "subset_seed": 0}
    assert "resize" not in data and "num_workers" not in data
    refused = [({"dataset": "cifar100", "train_per_class": 10}, "dataset 'cifar100' does not use "
                "data.train_per_class (only fashion_mnist)"),
               ({"dataset": "cifar100", "channels": 1}, "does not use data.channels (only fashion_mnist)"),
               ({"dataset": "fashion_mnist", "image_size": 24}, "data.image_size 24 is smaller than Fashion-MNIST's"),
               ({"dataset": "fashion_mnist", "subset_seed": 3}, "data.train_per_class is unset"),
               ({"dataset": "fashion_mnist", "crop": "pad_crop"}, "does not use data.crop"),
               ({"dataset": "fashion_mnist", "channels": 1}, "takes 3 channels: set data.channels: 3")]
    for data, match in refused:
        with pytest.raises(ConfigError, match=re.escape(match)) as info:
            validate_config({"data": data, "student": {"name": "resnet8"}})
        assert one_sentence(str(info.value)), str(info.value)
    with pytest.raises(ConfigError, match="data.image_size 27 is smaller"):
        build_data("fashion_mnist", image_size=27)


def test_one_training_step_through_the_config(tmp_path, monkeypatch):
    from deepkd.train.loop import train

    write_set(tmp_path / "data", monkeypatch)
    cfg = validate_config({
        "experiment": "fashion", "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "fashion_mnist", "root": str(tmp_path / "data"), "download": False,
                 "train_per_class": 2, "batch_size": 8},
        "student": {"name": "cnn_w4"}, "method": {"name": "ce"},
        "schedule": {"name": "step", "epochs": 1, "milestones": [1]},
        "train": {"progress": "none", "tensorboard": "off", "stop_after_steps": 1}})
    train(cfg)
    run = tmp_path / "runs" / "fashion" / "seed0"
    facts = json.loads((run / "data.json").read_text())
    assert facts["classes"] == list(fm.CLASSES) and facts["input_size"] == 32 and len(facts["mean"]) == 3
    assert "train_per_class: 2" in (run / "config.yaml").read_text()
    assert (run / "last.pt").is_file()


@pytest.mark.skipif(not fm._complete(fm.DEBIAN_ROOT), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_real_files_of_debians_package():
    """The released content (every md5 in FILES), 6,000 training images per class, the grey statistics
    of the 28 x 28 set that papers quote (0.2860, 0.3530)."""
    train, test, num_classes, mean, std = fm.load(None, download=False, image_size=28, channels=1,
                                                  train_per_class=None, subset_seed=0)
    assert train[0].shape == (60000, 1, 28, 28) and test[0].shape == (10000, 1, 28, 28) and num_classes == 10
    assert torch.bincount(train[1]).tolist() == [6000] * 10 and torch.bincount(test[1]).tolist() == [1000] * 10
    assert mean[0] == pytest.approx(0.2860, abs=1e-4) and std[0] == pytest.approx(0.3530, abs=1e-4)
