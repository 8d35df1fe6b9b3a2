"""Image folders on torchvision: seeded per-sample augmentation, in-memory vs streaming, user errors."""
import re
import shutil

import pytest
import torch

from deepkd.cli import main
from deepkd.data import FolderOptions, build_data
from deepkd.data import imagefolder as folders
from deepkd.train.config import ConfigError
from deepkd.train.config_errors import validate_config


def one_sentence(message):
    return "\n" not in message and not re.search(r"[.!?]\s+[A-Z]", message)


def test_augmentation_is_a_pure_function_of_seed_epoch_index(tmp_path, jpeg_tree):
    jpeg_tree(tmp_path)
    samples, _ = folders.scan(tmp_path / "train")
    transform = folders.build_transform(train=True, image_size=48, resize=55)
    dataset = folders.ImageFolderDataset(samples, transform)
    state = torch.get_rng_state()
    first, again = dataset[(0, 3, 5)][0], dataset[(0, 3, 5)][0]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert torch.equal(first, again) and first.shape == (3, 48, 48)
    assert not torch.equal(first, dataset[(0, 4, 5)][0]) and not torch.equal(first, dataset[(1, 3, 5)][0])
    # the same sample in another batch layout, another worker count: the same pixels
    options = FolderOptions(image_size=48, in_memory="off")
    a = build_data("imagefolder", root=str(tmp_path), batch_size=4, num_workers=0, folder=options)
    b = build_data("imagefolder", root=str(tmp_path), batch_size=6, num_workers=2, folder=options)
    assert type(a.train).__name__ == "ImageFolderLoader"
    by_a = torch.cat([x for x, _ in a.train.iter_epoch(2)])
    by_b = torch.cat([x for x, _ in b.train.iter_epoch(2)])
    assert torch.equal(by_a, by_b)  # same order (seed, epoch), same per-sample views
    resumed = torch.cat([x for x, _ in b.train.iter_epoch(2, start_batch=1)])
    assert torch.equal(resumed, by_b[6:])


def test_evaluation_is_resize_then_centre_crop(tmp_path, jpeg_tree):
    from torchvision.transforms.v2 import functional as TF

    jpeg_tree(tmp_path, classes=2, per_class=2)
    data = build_data("imagefolder", root=str(tmp_path), batch_size=4, num_workers=0,
                      folder=FolderOptions(image_size=32, resize=40, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    images, labels = next(data.test.iter_epoch(0))
    path, label = folders.scan(tmp_path / "val")[0][0]
    expected = TF.center_crop(TF.resize(folders.decode(path), 40, antialias=True), 32).float() / 255
    torch.testing.assert_close(images[0], expected, rtol=0, atol=1e-6)  # ToDtype(scale) vs / 255
    assert labels[0].item() == label


def test_small_sets_load_in_memory_and_match_the_streaming_pipeline(tmp_path, jpeg_tree):
    jpeg_tree(tmp_path, per_class=5)
    options = dict(image_size=32, crop="pad_crop", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    memory = build_data("imagefolder", root=str(tmp_path), batch_size=8, eval_batch_size=8, num_workers=0,
                        folder=FolderOptions(**options))
    stream = build_data("imagefolder", root=str(tmp_path), batch_size=8, eval_batch_size=8, num_workers=0,
                        folder=FolderOptions(in_memory="off", **options))
    assert type(memory.train).__name__ == "DeviceLoader" and type(stream.train).__name__ == "ImageFolderLoader"
    for (x_memory, y_memory), (x_stream, y_stream) in zip(memory.test.iter_epoch(0), stream.test.iter_epoch(0)):
        torch.testing.assert_close(x_memory, x_stream, rtol=0, atol=1e-5)
        assert torch.equal(y_memory.cpu(), y_stream)
    assert memory.classes == stream.classes == ["class_0", "class_1", "class_2"]


def test_random_resized_crops_in_memory_follow_torchvisions_rule(tmp_path, jpeg_tree):
    from torchvision.transforms.v2 import functional as TF

    from deepkd.data.device_crops import RandomResizedCropLoader

    jpeg_tree(tmp_path, per_class=5)
    data = build_data("imagefolder", root=str(tmp_path), batch_size=6, num_workers=0,
                      folder=FolderOptions(image_size=32, resize=40, mean=(0.0,) * 3, std=(1 / 255,) * 3))
    loader = data.train
    assert isinstance(loader, RandomResizedCropLoader) and loader.images.shape[-2:] == (40, 40)
    boxes, flips = loader.crop_boxes(1, 0, 4000)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 40).all() and (boxes[:, 3] <= 40).all()
    assert (w * h >= 0.08 * 1600 * 0.85).all() and (w / h >= 0.7).all() and (w / h <= 1.45).all()
    assert 0.45 < flips.float().mean() < 0.55 and (w * h).std() > 100  # the boxes do vary
    assert torch.equal(boxes, loader.crop_boxes(1, 0, 4000)[0])  # a pure function of (seed, epoch, index)
    # each view is the box of the stored image resized to 32 x 32 (torchvision's resized_crop, bilinear)
    batches = list(loader.iter_epoch(3))
    chosen = loader._epoch_order(3)[:6]
    boxes, flips = loader.crop_boxes(3, 0, 6)
    for k in range(6):
        left, top, right, bottom = boxes[k].long().tolist()
        expected = TF.resized_crop(loader.images[chosen[k]].float(), top, left, bottom - top, right - left, [32, 32],
                                   antialias=False)
        expected = expected.flip(-1) if flips[k] else expected
        # roi_align samples the box inside the whole image, crop-then-resize inside the crop: they differ
        # only where a sample falls within half a pixel of the box's edge; a shrinking box is averaged
        if right - left <= 32 and bottom - top <= 32:
            torch.testing.assert_close(batches[0][0][k][:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], rtol=0, atol=0.01)
        assert (batches[0][0][k] - expected).abs().mean() < 8
    resumed = list(loader.iter_epoch(3, start_batch=1))
    assert torch.equal(resumed[0][0], batches[1][0])
    box, flips = torch.tensor([[0.0, 0.0, 40.0, 40.0]] * 2), torch.tensor([False, True])
    whole = loader.resized_crops(loader.images[:2], box, flips)
    loader.size = 40
    same = loader.resized_crops(loader.images[:2], box, flips)
    assert whole.shape == (2, 3, 32, 32) and torch.equal(same[0], loader.images[0].float())
    assert torch.equal(same[1], loader.images[1].float().flip(-1))


def test_mean_auto_is_measured_once_and_cached(tmp_path, jpeg_tree, monkeypatch):
    jpeg_tree(tmp_path / "data")
    monkeypatch.setenv("DEEPKD_DATA", str(tmp_path / "cache"))
    options = FolderOptions(image_size=32, mean="auto", std=None, in_memory="off")
    first = build_data("imagefolder", root=str(tmp_path / "data"), num_workers=0, folder=options)
    images = torch.cat([folders.build_transform(train=False, image_size=32, resize=32, normalize=False)(
        folders.decode(p))[None] for p, _ in folders.scan(tmp_path / "data" / "train")[0]])
    pixels = images.double().div(255).transpose(0, 1).reshape(3, -1)
    assert first.mean == pytest.approx(pixels.mean(1).tolist()) and first.std == pytest.approx(
        pixels.std(1, unbiased=False).tolist())
    assert len(list((tmp_path / "cache" / "stats").glob("*.json"))) == 1
    monkeypatch.setattr(folders, "decode_all", lambda *a, **k: pytest.fail("statistics measured twice"))
    assert build_data("imagefolder", root=str(tmp_path / "data"), num_workers=0, folder=options).mean == first.mean


def test_an_unreadable_image_is_named_in_one_sentence(tmp_path, jpeg_tree):
    jpeg_tree(tmp_path)
    bad = tmp_path / "train" / "class_1" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    for workers, memory in ((0, "off"), (2, "off"), (2, "on")):  # streamed, or decoded once into memory
        with pytest.raises(ValueError) as info:
            data = build_data("imagefolder", root=str(tmp_path), batch_size=12, num_workers=workers,
                              folder=FolderOptions(image_size=32, in_memory=memory))
            list(data.train.iter_epoch(1))
        assert str(bad) in str(info.value) and one_sentence(str(info.value)), str(info.value)
        assert "incomplete or truncated" in str(info.value)


def test_train_and_val_must_hold_the_same_classes(tmp_path, jpeg_tree):
    jpeg_tree(tmp_path)
    shutil.rmtree(tmp_path / "val" / "class_2")
    with pytest.raises(ValueError, match=r"only in train: \['class_2'\]") as info:
        build_data("imagefolder", root=str(tmp_path))
    assert one_sentence(str(info.value))


def test_custom_split_folders(tmp_path, jpeg_tree):
    jpeg_tree(tmp_path, splits=("training", "validation"))
    data = build_data("imagefolder", root=str(tmp_path), num_workers=0,
                      folder=FolderOptions(train_folder="training", val_folder="validation", image_size=32))
    assert data.num_classes == 3 and data.test.num_samples == 12


def test_folder_keys_are_errors_where_they_do_nothing():
    with pytest.raises(ConfigError, match="dataset 'cifar100' does not use data.image_size"):
        validate_config({"data": {"dataset": "cifar100", "image_size": 64}, "student": {"name": "resnet8"}})
    with pytest.raises(ConfigError, match="mean: auto measures std too"):
        validate_config({"data": {"dataset": "imagefolder", "mean": "auto", "std": [0.2, 0.2, 0.2]},
                         "student": {"name": "resnet8"}})


def test_teacher_with_another_class_count_is_one_sentence(tmp_path, jpeg_tree, capsys):
    jpeg_tree(tmp_path / "data")
    from deepkd.models import create_model, save_weights

    weights = save_weights(create_model("resnet8", num_classes=100), tmp_path / "teacher.safetensors")
    code = main(["train", str(_recipe(tmp_path)), f"teacher.weights={weights}"])
    assert code == 2
    message = capsys.readouterr().err.strip()
    assert "has a 100-class classifier but the teacher is built for 3 classes" in message
    assert one_sentence(message.removeprefix("deepkd: error: "))


def _recipe(tmp_path):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "experiment": "mismatch", "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "imagefolder", "root": str(tmp_path / "data"), "image_size": 32, "crop": "pad_crop",
                 "num_workers": 0},
        "student": {"name": "resnet8"}, "teacher": {"name": "resnet8"}, "method": {"name": "kd"},
        "schedule": {"epochs": 1}}))
    return path


@pytest.mark.parametrize("in_memory", ["on", "off"])
def test_pad_crop_evaluates_the_geometry_it_trains_on(tmp_path, in_memory):
    """pad_crop trains on the image resized to image_size and centre-cropped: evaluation sees exactly
    that (not a resize to image_size / 0.875 and a cut border)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (28, 40, 3), dtype=np.uint8)  # 40 wide, 28 high
    for split in ("train", "val"):
        (tmp_path / split / "class_0").mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / split / "class_0" / "0.png")
    data = build_data("imagefolder", root=str(tmp_path), batch_size=1, num_workers=0,
                      folder=FolderOptions(image_size=32, crop="pad_crop", in_memory=in_memory,
                                           mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    evaluated = next(data.test.iter_epoch(0))[0][0].cpu()
    training = folders.build_transform(train=True, image_size=32, resize=37, crop="pad_crop", pad=0, flip=False,
                                       mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    expected = training(folders.decode(str(tmp_path / "val" / "class_0" / "0.png")))
    assert evaluated.shape == expected.shape == (3, 32, 32)
    torch.testing.assert_close(evaluated, expected, rtol=0, atol=1e-6)  # uint8 / 255 vs ToDtype(scale)
    if in_memory == "on":  # the stored training image is that same picture, augmented on the device
        torch.testing.assert_close(data.train.images[0].float().cpu() / 255, expected, rtol=0, atol=1e-6)


def test_resize_with_pad_crop_is_refused_and_never_taken_from_timm():
    from deepkd.train import build

    with pytest.raises(ConfigError, match="data.resize 37 only applies to crop: random_resized") as info:
        validate_config({"data": {"dataset": "imagefolder", "crop": "pad_crop", "image_size": 32, "resize": 37},
                         "student": {"name": "resnet8"}})
    assert one_sentence(str(info.value))
    with pytest.raises(ConfigError, match="data.resize 37 only applies"):
        FolderOptions(image_size=32, crop="pad_crop", resize=37)
    assert FolderOptions(image_size=32, crop="pad_crop", resize=32).resize == 32  # the same size is harmless
    timm = {"dataset": "imagefolder", "root": "x", "crop": "pad_crop"}
    options = build.folder_options(validate_config({"data": timm, "student": {"name": "timm/deit_tiny_patch16_224"}}))
    assert (options.image_size, options.resize, options.crop) == (224, None, "pad_crop")  # no crop_pct resize


@pytest.mark.parametrize("world_size", [1, 2])
def test_batch_indices_name_the_samples_of_each_streamed_batch_from_any_start(tmp_path, jpeg_tree, world_size):
    jpeg_tree(tmp_path, per_class=5)  # 15 images: batches of 4 (2 per rank), the last one short
    samples, _ = folders.scan(tmp_path / "train")
    fixed = folders.build_transform(train=False, image_size=32, resize=32)  # no randomness: pixels name a sample
    pictures = torch.stack([fixed(folders.decode(path)) for path, _ in samples])
    every = []
    for rank in range(world_size):
        loader = folders.ImageFolderLoader(samples, fixed, batch_size=4, train=True, seed=5, num_workers=0,
                                           rank=rank, world_size=world_size)
        assert torch.equal(loader.labels, torch.tensor([label for _, label in samples]))
        for start in (0, 2):
            for index, (images, labels) in enumerate(loader.iter_epoch(3, start_batch=start), start=start):
                other = loader.batch_indices(4, index)  # another epoch's order asked for between two batches
                chosen = loader.batch_indices(3, index)
                assert torch.equal(images, pictures[chosen]) and torch.equal(labels, loader.labels[chosen])
                assert len(other) == len(chosen) and not (start == 0 and index == 0 and torch.equal(other, chosen))
                every += chosen.tolist() if start == 0 else []
    assert sorted(set(every)) == list(range(15)) and len(every) == (15 if world_size == 1 else 16)  # ranks pad


@pytest.mark.parametrize("crops", ["pad_crop", "random_resized"])
def test_batch_indices_of_the_in_memory_loaders_are_their_batches_samples(crops):
    from deepkd.data import DeviceLoader
    from deepkd.data.device_crops import RandomResizedCropLoader

    images, ids = torch.randint(0, 256, (23, 3, 12, 12), dtype=torch.uint8), torch.arange(23)  # label = sample
    for rank in range(2):
        options = dict(batch_size=6, mean=(0.5,) * 3, std=(0.25,) * 3, seed=2, rank=rank, world_size=2)
        loader = (DeviceLoader(images, ids, train=True, **options) if crops == "pad_crop" else
                  RandomResizedCropLoader(images, ids, size=8, **options))
        for index, (_, labels) in enumerate(loader.iter_epoch(1, start_batch=1), start=1):
            assert torch.equal(loader.batch_indices(1, index), labels)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_an_epoch_leaves_the_global_rng_alone(tmp_path, jpeg_tree, num_workers):
    """A resumed epoch starts a new DataLoader iterator mid-run: drawing its seed from the global RNG would
    shift every later global draw (CRD's negatives, dropout) against the run that went straight through."""
    jpeg_tree(tmp_path)
    data = build_data("imagefolder", root=str(tmp_path), batch_size=4, num_workers=num_workers,
                      folder=FolderOptions(image_size=32, in_memory="off"))
    state = torch.get_rng_state()
    for loader in (data.train, data.test):
        assert len(list(loader.iter_epoch(1, start_batch=1))) == len(loader) - 1
    assert torch.equal(torch.get_rng_state(), state)
