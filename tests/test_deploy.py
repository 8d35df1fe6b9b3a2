"""``deepkd export``, ``predict`` and ``profile`` on runs trained here: parity of each format with the
PyTorch student, dynamic batch, metadata, damaged files refused in one sentence, predictions of a
run that learned, parameter and MAC counts."""
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import COLOURS, tiny_config, write_colours
from torch import nn

from deepkd.cli import main
from deepkd.deploy import count_macs, export_run, load_predictor, predict
from deepkd.deploy.run import load_run, validation_images
from deepkd.train.config import save_config
from deepkd.train.config_errors import validate_config

FORMATS = ("onnx", "torchscript", "pt2")


def one_sentence(message):
    return "\n" not in message.strip() and not re.search(r"[.!?]\s+[A-Z]", message)


def _train(cfg):
    from deepkd.train.loop import train

    return Path(train(cfg)["run_dir"])


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """One epoch (2 steps) of cnn_w4 on the synthetic set: 64 test images, 100 classes."""
    tmp = tmp_path_factory.mktemp("synthetic")
    return _train(tiny_config(tmp, schedule__epochs=1, data__synthetic={"num_train": 64, "num_test": 64}))


@pytest.fixture(scope="module")
def exported(synthetic_run):
    """Each format exported once (default file names inside the run folder)."""
    return {fmt: export_run(synthetic_run, fmt) for fmt in FORMATS}


def native(fmt, path):
    """The exported file read by its own runtime, not deepkd's loaders: ``(forward, metadata dict)``."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        meta = {k[len("deepkd."):]: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
        return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), meta
    extra = {"deepkd.json": ""}
    if fmt == "torchscript":
        with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript in favour of torch.export
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(path, _extra_files=extra)
    else:
        module = torch.export.load(path, extra_files=extra).module()
    return module, json.loads(extra["deepkd.json"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_matches_the_student_at_any_batch_size(fmt, synthetic_run, exported):
    report = exported[fmt]
    assert Path(report["file"]).parent == synthetic_run and report["images"] == 64
    assert report["max_abs_diff"] <= 1e-4 and report["top1_agreement"] == 1.0
    run = load_run(synthetic_run)
    images = validation_images(run.cfg, 64)
    forward, meta = native(fmt, report["file"])
    with torch.no_grad():
        expected = run.model(images)
        for batch in (images, images[:1], images[1:8]):  # 64, 1 and 7 images through one file
            torch.testing.assert_close(forward(batch), run.model(batch), rtol=0, atol=1e-4)
        torch.testing.assert_close(forward(images), expected, rtol=0, atol=1e-4)
    facts = json.loads((synthetic_run / "data.json").read_text())
    assert {k: meta[k] for k in ("input_size", "mean", "std", "classes", "num_classes")} == \
        {k: facts[k] for k in ("input_size", "mean", "std", "classes", "num_classes")}
    assert (meta["experiment"], meta["method"], meta["student"]) == ("tiny", "ce", "cnn_w4")
    assert (meta["crop"], meta["resize"], meta["channels"]) == ("pad_crop", 32, 3)
    assert meta["exporter"] in ("dynamo", "torch.jit.trace", "torch.export")


def test_export_command_prints_parity_and_the_exporter(synthetic_run, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(synthetic_run), "--format", "onnx", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exporter: dynamo" in printed and "max |logit difference|" in printed
    assert "top-1 agreement 100.0% (64/64)" in printed and out.is_file()


def test_export_past_the_tolerance_is_refused_and_writes_nothing(synthetic_run, tmp_path, capsys):
    out = tmp_path / "strict.onnx"  # ONNX Runtime's kernels round differently from PyTorch's: > 0
    assert main(["export", str(synthetic_run), "--format", "onnx", "-o", str(out), "--tolerance", "0"]) == 2
    err = capsys.readouterr().err
    assert one_sentence(err) and "not written" in err and "tolerance 0" in err and str(out) in err
    assert list(tmp_path.iterdir()) == []  # neither the file nor its partial copy


def _damage(path: Path, how: str, tmp_path: Path) -> Path:
    data = path.read_bytes()
    target = tmp_path / f"{how}{''.join(path.suffixes)}"
    if how == "truncated":
        target.write_bytes(data[:len(data) // 2])
    else:  # 64 bytes flipped in the middle (in the weights of these small files)
        middle = len(data) // 2
        target.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:])
    return target


@pytest.mark.parametrize("how", ["truncated", "flipped"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_predict_refuses_a_damaged_export_in_one_sentence(fmt, how, exported, tmp_path, capsys):
    damaged = _damage(Path(exported[fmt]["file"]), how, tmp_path)
    image = write_colours(tmp_path / "images", {"x": 1}) / "x" / "red" / "0.png"
    assert main(["predict", str(damaged), str(image)]) == 2
    err = capsys.readouterr().err
    assert one_sentence(err) and str(damaged) in err and "damaged" in err, err


def _foreign_files(tmp_path: Path, synthetic_run: Path):
    plain = tmp_path / "plain.onnx"  # a valid ONNX model deepkd did not write
    with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated; it writes the file quickly
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(nn.Linear(3, 2), (torch.zeros(1, 3),), str(plain), dynamo=False)
    (tmp_path / "noise.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "text.pt2").write_text("not a program")
    (tmp_path / "checkpoint.pt").write_bytes((synthetic_run / "best.pt").read_bytes())  # torch.save, not TorchScript
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.yaml", "data.json"):
        (unfinished / name).write_bytes((synthetic_run / name).read_bytes())
    return {"plain.onnx": "holds no deepkd metadata", "noise.onnx": "not an ONNX model",
            "text.pt2": "not a torch.export program", "checkpoint.pt": "give its run folder",
            "weights.bin": "not a model file", "missing.onnx": "does not exist", "unfinished": "has not finished"}


def test_predict_refuses_foreign_and_missing_models_in_one_sentence(synthetic_run, tmp_path, capsys):
    image = write_colours(tmp_path / "images", {"x": 1}) / "x" / "red" / "0.png"
    for name, expected in _foreign_files(tmp_path, synthetic_run).items():
        assert main(["predict", str(tmp_path / name), str(image)]) == 2, name
        err = capsys.readouterr().err
        assert one_sentence(err) and expected in err and name in err, err


def test_without_onnxruntime_the_command_says_how_to_install_it(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when not installed
    image = write_colours(tmp_path / "images", {"x": 1}) / "x" / "red" / "0.png"
    assert main(["predict", exported["onnx"]["file"], str(image)]) == 2
    err = capsys.readouterr().err
    assert one_sentence(err) and 'pip install -c constraints.txt "deepkd[deploy]"' in err


def _colour_images(tmp_path: Path, colour_run: Path):
    """The run's validation images (PNG files) and three new solid-colour PNGs, with their colours."""
    from PIL import Image

    cases = [(str(p), p.parent.name) for p in sorted((colour_run.parents[2] / "data" / "val").glob("*/*.png"))]
    for name, rgb in COLOURS.items():
        Image.fromarray(np.full((40, 56, 3), rgb, np.uint8)).save(tmp_path / f"{name}.png")
        cases.append((str(tmp_path / f"{name}.png"), name))
    return cases


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_image_folder_run_exports_within_tolerance_on_64_images(fmt, colour_run, tmp_path):
    suffix = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}[fmt]
    report = export_run(colour_run, fmt, tmp_path / f"colours{suffix}")
    assert report["images"] == 64 and report["max_abs_diff"] <= 1e-4 and report["top1_agreement"] == 1.0
    run = load_run(colour_run)
    images = validation_images(run.cfg, 64)
    forward, _ = native(fmt, report["file"])
    with torch.no_grad():
        torch.testing.assert_close(forward(images), run.model(images), rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", [None, "onnx", "pt2"])
def test_predict_names_the_right_colours(fmt, colour_run, tmp_path, capsys):
    cases = _colour_images(tmp_path, colour_run)
    model = colour_run if fmt is None else export_run(colour_run, fmt, tmp_path / f"colours.{fmt}")["file"]
    assert main(["predict", str(model), *[path for path, _ in cases], "--json", "--top", "2"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["image"], r["top"][0]["class"]) for r in records] == cases
    assert all(len(r["top"]) == 2 and r["top"][0]["probability"] > 0.5 for r in records)
    assert main(["predict", str(model), cases[-1][0]]) == 0
    assert capsys.readouterr().out.startswith(f"{cases[-1][0]}: red ")


def test_predict_preprocesses_as_the_run_evaluates(colour_run):
    run = load_run(colour_run)
    predictor = load_predictor(colour_run)
    paths = sorted(str(p) for p in (colour_run.parents[2] / "data" / "val").glob("*/*.png"))[:64]
    from deepkd.deploy.predict import preprocess

    torch.testing.assert_close(preprocess(paths, predictor.metadata), validation_images(run.cfg, 64), rtol=0,
                               atol=1e-5)  # ToDtype + Normalize vs the device loader's (x - 255 m) / (255 s)
    assert [r["top"][0]["class"] for r in predict(predictor, paths, top=1)] == [Path(p).parent.name for p in paths]


def test_profile_counts_the_published_parameters_and_macs(capsys):
    argv = ["profile", "resnet32x4", "resnet8x4", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0"]
    assert main([*argv, "--json"]) == 0
    teacher, student = json.loads(capsys.readouterr().out)["models"]
    assert (teacher["num_classes"], student["num_classes"]) == (100, 100)
    assert abs(teacher["parameters"] / 7.43e6 - 1) < 0.01 and abs(student["parameters"] / 1.23e6 - 1) < 0.01
    assert abs(teacher["macs"] / 1.08e9 - 1) < 0.01 and abs(student["macs"] / 0.18e9 - 1) < 0.02  # CRD's table
    assert set(teacher["latency_ms"]) == {"1"} and teacher["latency_ms"]["1"] > 0
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "parameters" in table and "MACs" in table and "CPU latency, batch 1" in table and "torch thread" in table
    assert "activations (1 image)" in table and student["activation_bytes"] < teacher["activation_bytes"]


def test_profile_reads_recipes_and_run_folders(synthetic_run, capsys):
    argv = ["profile", "cifar100/resnet32x4-resnet8x4/dkd", str(synthetic_run), "--batch-sizes", "1",
            "--repeats", "1", "--warmup", "0", "--json"]
    assert main(argv) == 0
    teacher, student = json.loads(capsys.readouterr().out)["models"]
    assert (teacher["model"], teacher["num_classes"], teacher["input"]) == ("resnet32x4", 100, [3, 32, 32])
    assert (student["model"], student["num_classes"]) == ("cnn_w4", 100)
    assert main(["profile", "resnet32x5", "resnet8x4"]) == 2
    err = capsys.readouterr().err
    assert one_sentence(err) and "neither a model" in err and "resnet32x4" in err


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.fc(x)


def test_macs_equal_a_hand_count():
    # MACs of a convolution: output positions x output channels x (input channels x kernel area);
    # of a linear layer: inputs x outputs. Biases, BatchNorm, ReLU and the mean are not counted.
    conv1 = (16 * 16) * 8 * (3 * 3 * 3)   # 3x16x16 -> 8x16x16: 55,296
    conv2 = (8 * 8) * 16 * (8 * 3 * 3)    # stride 2 -> 16x8x8: 73,728
    fc = 16 * 10                          # 160
    assert count_macs(SmallNet().eval(), (3, 16, 16)) == conv1 + conv2 + fc == 129_184


def test_activation_memory_equals_a_hand_count():
    from deepkd.models.cost import activation_bytes

    # float32 outputs of the leaf modules: conv1 8x16x16, bn 8x16x16, conv2 16x8x8, fc 10 (relu and
    # the mean are functions, not modules); an in-place ReLU module adds nothing, a copying one its output
    assert activation_bytes(SmallNet().eval(), (3, 16, 16)) == 4 * (2048 + 2048 + 1024 + 10) == 20_520
    inplace = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(inplace=True))
    copying = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    assert activation_bytes(inplace, (3, 2, 2)) == 4 * 16 and activation_bytes(copying, (3, 2, 2)) == 4 * 32



STUDENTS = ["resnet8x4", "resnet20", "resnet32", "wrn_16_2", "wrn_40_1", "vgg8", "MobileNetV2", "ShuffleV1",
            "ShuffleV2", "timm/resnet10t", "torchvision/mobilenet_v3_small"]


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDENTS)
def test_every_zoo_student_exports_in_every_format(name, tmp_path):
    """A run folder of the untrained student at 32x32 (the synthetic set's test images). Untrained
    logits reach hundreds (wrn_40_1), where float32 rounding alone passes 1e-4: tolerance 1e-3."""
    from deepkd.models import create_model, save_weights

    cfg = tiny_config(tmp_path, student__name=name)
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    facts = {"num_classes": 100, "classes": [], "input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    (run / "data.json").write_text(json.dumps(facts))
    torch.manual_seed(0)
    save_weights(create_model(name, num_classes=100), run / "student.safetensors")
    for fmt in FORMATS:
        report = export_run(run, fmt, tolerance=1e-3)
        assert report["top1_agreement"] == 1.0, (fmt, report)
        predictor = load_predictor(report["file"])
        assert predictor.forward(validation_images(cfg, 7)).shape == (7, 100)


def test_predict_pads_fashion_mnist_images_as_its_reader_does(tmp_path):
    """A Fashion-MNIST run evaluates its 28x28 images zero-padded to 32, not resized: predict does the same."""
    from PIL import Image

    from deepkd.data.fashion_mnist import pad
    from deepkd.deploy.predict import preprocess
    from deepkd.deploy.run import preprocessing

    cfg = validate_config({"student": {"name": "cnn_w4"}, "method": {"name": "ce"},
                           "data": {"dataset": "fashion_mnist", "root": str(tmp_path)}})
    facts = {"input_size": 32, "mean": [0.2, 0.2, 0.2], "std": [0.3, 0.3, 0.3]}
    metadata = preprocessing(cfg, facts)
    assert metadata["crop"] == "pad" and metadata["channels"] == 3
    grey = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "shirt.png")
    expected = (pad(torch.from_numpy(grey)[None], 32, 3)[0].float() / 255 - 0.2) / 0.3
    got = preprocess([tmp_path / "shirt.png"], metadata)[0]
    torch.testing.assert_close(got, expected)
    border = torch.full((3, 2, 32), (0 - 0.2) / 0.3)
    torch.testing.assert_close(got[:, :2], border)  # the zero-padded border, top and bottom
    torch.testing.assert_close(got[:, 30:], border)

