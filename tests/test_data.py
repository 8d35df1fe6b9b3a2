"""Data: the device loader's augmentation and determinism, CIFAR-100's real format, ImageFolder trees,
the synthetic set."""
import pickle
import re
import tarfile

import pytest
import torch

from deepkd.data import DeviceLoader, build_data, cifar, synthetic
from deepkd.errors import DataError


def loader(count=200, batch=32, **kwargs):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(count) % 10
    options = dict(batch_size=batch, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), train=True, seed=7)
    options.update(kwargs)
    return DeviceLoader(images, labels, **options), images, labels


def manual_augment(image, dy, dx, flip):
    padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
    padded[:, 4:36, 4:36] = image
    crop = padded[:, dy:dy + 32, dx:dx + 32]
    return crop.flip(-1) if flip else crop


def test_augmentation_equals_manual_pad_crop_flip():
    data, images, labels = loader()
    order = data.order(3)
    batch_images, batch_labels = next(data.iter_epoch(3, start_batch=2))
    dy, dx, flips = data.augment_params(3, 2, 32)
    chosen = order[64:96]
    assert torch.equal(batch_labels, labels[chosen])
    for j in range(32):
        expected = (manual_augment(images[chosen[j]], int(dy[j]), int(dx[j]), bool(flips[j])).float() - 127.5) / 63.75
        torch.testing.assert_close(batch_images[j], expected)


def test_crop_offsets_uniform_and_flip_rate():
    data, _, _ = loader()
    draws = [data.augment_params(epoch, index, 64) for epoch in range(1, 11) for index in range(20)]
    dy = torch.cat([d[0] for d in draws])
    dx = torch.cat([d[1] for d in draws])
    flips = torch.cat([d[2] for d in draws]).float()
    cells = torch.bincount(dy * 9 + dx, minlength=81).double()
    expected = len(dy) / 81
    chi2 = float(((cells - expected) ** 2 / expected).sum())
    assert chi2 < 140  # 80 degrees of freedom: p < 1e-4 above this
    assert dy.min() == 0 and dy.max() == 8 and dx.min() == 0 and dx.max() == 8
    assert abs(float(flips.mean()) - 0.5) < 0.02  # 12800 draws: 4.5 standard deviations


def test_batches_are_pure_functions_of_seed_epoch_index():
    a, _, _ = loader()
    b, _, _ = loader()
    full = list(a.iter_epoch(2))
    resumed = list(b.iter_epoch(2, start_batch=4))
    assert len(full) == len(a) == 7 and full[-1][0].shape[0] == 200 - 6 * 32  # last partial batch kept
    for (xa, ya), (xb, yb) in zip(full[4:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(full[0][1], list(a.iter_epoch(3))[0][1])
    dropped, _, _ = loader(drop_last=True)
    assert len(dropped) == 6


def test_ranks_split_the_global_batch():
    whole, _, _ = loader()
    parts = [loader(rank=r, world_size=2)[0] for r in range(2)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole.iter_epoch(1), parts[0].iter_epoch(1), parts[1].iter_epoch(1)):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def write_cifar(folder, train=50, test=20):
    return cifar.write_python_format(folder, train, test)


def test_cifar_archive_md5_extract_and_read(tmp_path):
    source = write_cifar(tmp_path / "src" / cifar.FOLDER)
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = cache / cifar.ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=cifar.FOLDER)
    digest = cifar.md5sum(archive)
    with pytest.raises(ValueError, match="md5"):
        cifar.prepare(cache, download=False)  # the real md5 does not match the tiny archive
    folder = cifar.prepare(cache, download=False, md5=digest)
    images, labels = cifar.read_split(folder, "train")
    with open(source / "train", "rb") as handle:
        raw = pickle.load(handle, encoding="latin1")
    assert images.shape == (50, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[3].reshape(-1), torch.from_numpy(raw["data"][3]))  # rows are CHW
    assert labels.tolist() == raw["fine_labels"] and len(raw["coarse_labels"]) == 50
    assert set(raw) >= {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"}
    assert cifar.prepare(folder, download=False) == folder  # an extracted folder works directly


def test_cifar_missing_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"put {cifar.ARCHIVE}.*{tmp_path}"):
        build_data("cifar100", root=str(tmp_path), download=False)


def test_cifar_build_data(tmp_path):
    write_cifar(tmp_path / cifar.FOLDER, train=70, test=30)
    data = build_data("cifar100", root=str(tmp_path), batch_size=32, eval_batch_size=16, download=False)
    assert data.num_classes == 100 and len(data.train) == 3 and len(data.test) == 2
    x, y = next(data.test.iter_epoch(0))
    expected = (data.test.images[:16].float() / 255 - torch.tensor(cifar.MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(cifar.STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def test_imagefolder_tree(tmp_path, jpeg_tree):
    jpeg_tree(tmp_path)
    data = build_data("imagefolder", root=str(tmp_path), batch_size=5, eval_batch_size=4, num_workers=0)
    assert data.num_classes == 3 and len(data.train) == 3 and len(data.test) == 3
    batches = list(data.train.iter_epoch(1))
    assert batches[0][0].shape == (5, 3, 224, 224) and batches[-1][0].shape[0] == 2
    again = list(data.train.iter_epoch(1, start_batch=1))
    assert torch.equal(batches[1][0], again[0][0]) and torch.equal(batches[2][1], again[1][1])
    val = [y for _, y in data.test.iter_epoch(0)]
    assert torch.cat(val).tolist() == sorted(torch.cat(val).tolist())
    shards = [build_data("imagefolder", root=str(tmp_path), batch_size=4, rank=r, world_size=2, num_workers=0)
              for r in range(2)]
    counts = [sum(len(y) for _, y in s.test.iter_epoch(0)) for s in shards]
    assert sum(counts) == 12


def test_synthetic_set_is_deterministic_and_structured():
    a_images, a_labels = synthetic.generate(300, seed=4)
    b_images, b_labels = synthetic.generate(300, seed=4)
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    assert a_images.dtype == torch.uint8 and a_images.shape == (300, 3, 32, 32)
    assert torch.bincount(a_labels, minlength=100).tolist() == [3] * 100
    templates = synthetic.class_templates(4).flatten(1)
    distance = torch.cdist(templates, templates)
    superclass = torch.arange(100) // 5
    same = superclass[:, None] == superclass[None, :]
    off_diagonal = ~torch.eye(100, dtype=torch.bool)
    assert distance[same & off_diagonal].mean() < 0.6 * distance[~same].mean()
    test_images, _ = synthetic.generate(300, seed=4, split="test")
    assert not torch.equal(test_images, a_images)


@pytest.mark.parametrize("class_scale", [0.3, 1.0])
def test_synthetic_class_scale_sets_within_superclass_similarity(class_scale):
    templates = synthetic.class_templates(2, class_scale).flatten(1)
    distance = torch.cdist(templates, templates)
    superclass = torch.arange(100) // 5
    same = (superclass[:, None] == superclass[None, :]) & ~torch.eye(100, dtype=torch.bool)
    ratio = distance[same].mean() / distance[~same].mean()
    # The class fields are independent of the superclass fields, so within-superclass distances
    # scale with class_scale while between-superclass distances stay dominated by the superclass.
    reference = synthetic.class_templates(2, 0.6).flatten(1)
    reference_distance = torch.cdist(reference, reference)
    reference_ratio = reference_distance[same].mean() / reference_distance[~same].mean()
    assert (ratio < reference_ratio) == (class_scale < 0.6)
    images, _ = synthetic.generate(50, seed=2, class_scale=class_scale)
    assert images.dtype == torch.uint8 and images.shape == (50, 3, 32, 32)


def test_bad_cifar_files_are_named_in_one_sentence(tmp_path):
    folder = cifar.write_python_format(tmp_path / "cifar-100-python", 20, 10)
    good = (folder / "train").read_bytes()
    cases = {"truncated": good[: len(good) // 2],
             "foreign": pickle.dumps({"pixels": [1, 2, 3]}, protocol=2)}
    entry = pickle.loads(good, encoding="latin1")
    cases["labels"] = pickle.dumps({**entry, "fine_labels": [0] * 19 + [100]}, protocol=2)
    cases["shape"] = pickle.dumps({**entry, "data": entry["data"][:, :100]}, protocol=2)
    expected = {"truncated": "is truncated or not a CIFAR-100 pickle", "foreign": "no 'data' entry",
                "labels": "labels outside 0..99 (found 0..100)", "shape": "not [N, 3072]"}
    for case, data in cases.items():
        (folder / "train").write_bytes(data)
        with pytest.raises(DataError, match=re.escape(expected[case])) as info:
            cifar.read_split(folder, "train")
        assert str(folder / "train") in str(info.value) and "\n" not in str(info.value)
