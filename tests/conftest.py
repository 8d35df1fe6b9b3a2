"""Fixtures shared by the test files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deepkd.train.config_errors import validate_config


def write_jpeg_tree(root: Path, classes: int = 3, per_class: int = 4, splits=("train", "val"),
                    size_range=(40, 90), seed: int = 1) -> Path:
    """``root/<split>/class_<c>/<i>.jpg``: random RGB JPEGs of random sizes (a real image-folder tree)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            folder = Path(root) / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                size = (int(rng.integers(*size_range)), int(rng.integers(*size_range)))
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return Path(root)


@pytest.fixture
def jpeg_tree():
    """The :func:`write_jpeg_tree` writer."""
    return write_jpeg_tree


def tiny_config(tmp_path, **changes):
    """A seconds-long run on the synthetic set; ``section__key=value`` or ``section={...}`` changes it."""
    raw = {
        "experiment": "tiny", "seed": 3, "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64,
                 "synthetic": {"num_train": 160, "num_test": 64}},
        "student": {"name": "cnn_w4"},
        "method": {"name": "ce"},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "schedule": {"name": "step", "epochs": 2, "milestones": [2]},
        "train": {"progress": "none", "tensorboard": "off"},
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            raw.setdefault(section, {})[name] = value
        else:
            raw[section] = value
    return validate_config(raw)


def trained_teacher(tmp_path):
    """Train the tiny teacher once under ``tmp_path``; returns its ``best.pt``."""
    from deepkd.train.loop import train

    cfg = tiny_config(tmp_path, experiment="teacher", schedule__epochs=1)
    train(cfg)
    return str(tmp_path / "runs" / "teacher" / "seed3" / "best.pt")


def pair_features(student="resnet8x4", teacher="resnet32x4", batch=6, seed=0):
    """Float64 ``(student Features, teacher Features (no grad), target, student FeatureInfo, teacher
    FeatureInfo)`` of a zoo pair on random CIFAR-sized images (10 classes): the feature parity tests' input."""
    from deepkd.models import create_model
    from deepkd.models.features import FeatureExtractor, feature_info

    torch.manual_seed(seed)
    s, t = create_model(student, num_classes=10).double(), create_model(teacher, num_classes=10).double().eval()
    images, target = torch.randn(batch, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (batch,))
    with torch.no_grad():
        ft = FeatureExtractor(t)(images)
    return FeatureExtractor(s)(images), ft, target, feature_info(s, (3, 32, 32)), feature_info(t, (3, 32, 32))


def feature_run(tmp_path, teacher_weights, method, **changes):
    """The tiny synthetic run (:func:`tiny_config`), cnn_w4 -> cnn_w4 (``teacher_weights``), with ``method``
    (a dict: name and arguments)."""
    return tiny_config(tmp_path, method=method, teacher={"name": "cnn_w4", "weights": teacher_weights}, **changes)


def assert_trains_and_resumes(tmp_path, teacher_weights, method, **changes):
    """Two epochs of :func:`feature_run` straight through, and stopped at step 7 then resumed, end with the
    same student, the same method state (and the same teacher BatchNorm statistics, where a training-mode
    teacher checkpoints them) and the same top-1; the exported student holds only the student.
    Returns the method's checkpointed state (its connectors, memory)."""
    from safetensors.torch import load_file

    from deepkd.train.loop import train

    whole = train(feature_run(tmp_path / "a", teacher_weights, method, **changes))
    cfg = feature_run(tmp_path / "b", teacher_weights, method, **changes)
    stopped = train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"stop_after_steps": 7})}))
    assert stopped["status"] == "stopped" and stopped["step"] == 7
    resumed = train(cfg, resume=True)
    assert resumed["status"] == whole["status"] == "finished"
    a, b = torch.load(f"{whole['run_dir']}/last.pt"), torch.load(f"{resumed['run_dir']}/last.pt")
    assert ("teacher_buffers" in a) == ("teacher_buffers" in b)
    for part in ("model", "method", "teacher_buffers")[:3 if "teacher_buffers" in a else 2]:
        assert set(a[part]) == set(b[part])
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert resumed["last_top1"] == whole["last_top1"]
    exported = load_file(f"{whole['run_dir']}/student.safetensors")
    assert set(exported) <= set(a["model"]) and not set(exported) & set(a["method"])
    return a["method"]


def assert_same(ours, theirs, student):
    """Values and gradients w.r.t. the student logits agree to 1e-6 (float64)."""
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    grad_ours, = torch.autograd.grad(ours, student, retain_graph=True)
    grad_theirs, = torch.autograd.grad(theirs, student, retain_graph=True)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-6, atol=1e-9)


COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def write_colours(root: Path, per_class: dict, seed: int = 0) -> Path:
    """``root/<split>/<colour>/<i>.png``: noisy solid colours of random sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                height, width = rng.integers(24, 60, 2)
                pixels = np.clip(np.array(rgb) + rng.integers(-25, 26, (height, width, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """A 3-class image folder of solid colours that cnn_w4 learns in 3 epochs (9 steps); 66 test images."""
    tmp = tmp_path_factory.mktemp("colours")
    root = write_colours(tmp / "data", {"train": 8, "val": 22})  # 66 test images
    cfg = tiny_config(tmp, experiment="colours", seed=0, schedule__epochs=3, schedule__milestones=[10],
                      data={"dataset": "imagefolder", "root": str(root), "image_size": 32, "crop": "pad_crop",
                            "batch_size": 8, "num_workers": 0})
    from deepkd.train.loop import train

    return Path(train(cfg)["run_dir"])


@pytest.fixture(scope="module")
def detection_batch(tmp_path_factory):
    """Two synthetic 128-px COCO-format training images and their targets (boxes and labels only)."""
    from deepkd.detection import CocoDetection, DetectionLoader, write_synthetic_coco

    root = tmp_path_factory.mktemp("coco")
    ann = write_synthetic_coco(root, "train", 4, seed=3)
    images, targets = next(DetectionLoader(CocoDetection(root / "train", ann, train=True), 2, train=True).iter_epoch(1))
    return images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
