"""``deepkd quantize`` on a run trained here: a real int8 ONNX graph, top-1 before and after measured
on the test split, logits close to the student's, predict reads the file, refusals in one sentence."""
import json
from pathlib import Path

import onnx
import pytest
import torch
from conftest import write_colours
from test_deploy import one_sentence

from deepkd.cli import main
from deepkd.deploy import load_predictor, predict, quantize_run
from deepkd.deploy.run import load_run, validation_images
from deepkd.errors import ExportError, UnknownNameError


@pytest.fixture(scope="module")
def quantized(colour_run):
    return quantize_run(colour_run, calibration=16, repeats=3, warmup=1)


def test_the_file_is_an_int8_graph_that_stays_close_to_the_student(colour_run, quantized):
    path = Path(quantized["file"])
    assert path == colour_run / "student.int8.onnx" and path.stat().st_size == quantized["bytes"]["int8"]
    model = onnx.load(str(path))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) >= 2  # the convolution and linear weights, stored as int8
    assert quantized["bytes"]["int8"] < quantized["bytes"]["fp32"]
    run = load_run(colour_run)
    images = validation_images(run.cfg, 64)
    forward = load_predictor(path).forward
    with torch.no_grad():
        expected = run.model(images)
    difference = (forward(images) - expected).abs().max().item()
    assert 0 < difference < 0.1 * expected.abs().max().item()  # quantised (not equal), and still the student
    assert quantized["calibration_images"] == 16 and quantized["calibrate"] == "minmax"


def test_top1_before_and_after_are_measured_on_the_test_split(colour_run, quantized):
    run = load_run(colour_run)
    images = validation_images(run.cfg, 1000)
    labels = torch.tensor([i // 22 for i in range(66)])  # val/<colour>/<i>.png, colours in sorted order
    with torch.no_grad():
        pytorch_top1 = 100.0 * (run.model(images).argmax(-1) == labels).float().mean().item()
    assert quantized["images"] == 66 and quantized["top1"]["fp32"] == pytest.approx(pytorch_top1)
    assert quantized["drop"] == pytest.approx(quantized["top1"]["fp32"] - quantized["top1"]["int8"])
    assert set(quantized["speedup"]) == {"1", "32"}
    for batch, ratio in quantized["speedup"].items():
        latency = quantized["latency_ms"]
        assert ratio == pytest.approx(latency["fp32"][batch] / latency["int8"][batch])


def test_predict_reads_the_int8_file(colour_run, quantized, tmp_path):
    images = write_colours(tmp_path / "images", {"x": 1}, seed=5) / "x"
    paths = [images / c / "0.png" for c in ("blue", "green", "red")]
    records = predict(load_predictor(quantized["file"]), paths, top=1)
    assert [r["top"][0]["class"] for r in records] == ["blue", "green", "red"]
    assert load_predictor(quantized["file"]).metadata["quantization"]["weights"] == "int8 per channel"


def test_the_command_prints_both_top1_and_the_latency_ratio(colour_run, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(colour_run), "-o", str(out), "--calibration", "8", "--calibrate", "percentile",
                 "--per-tensor", "--repeats", "2", "--warmup", "1", "--batch-sizes", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["file"] == str(out) and out.is_file() and report["weights"] == "int8 per tensor"
    assert report["calibrate"] == "percentile" and list(report["speedup"]) == ["4"]
    assert main(["quantize", str(colour_run), "-o", str(out), "--calibration", "8", "--repeats", "2"]) == 0
    printed = capsys.readouterr().out
    assert "top-1 on 66 test images of imagefolder: fp32" in printed and "x faster" in printed


def test_a_drop_past_max_drop_writes_nothing(colour_run, tmp_path):
    out = tmp_path / "never.onnx"  # max_drop -1: int8 would have to beat fp32 by a point
    with pytest.raises(ExportError, match="not written") as err:
        quantize_run(colour_run, out, calibration=8, repeats=1, warmup=0, max_drop=-1.0)
    assert one_sentence(str(err.value)) and "--max-drop -1" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_options_and_damaged_files_are_one_sentence(colour_run, quantized, tmp_path, capsys):
    with pytest.raises(UnknownNameError, match="choose minmax, percentile, entropy"):
        quantize_run(colour_run, calibrate="kl")
    damaged = tmp_path / "damaged.int8.onnx"
    data = Path(quantized["file"]).read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    image = write_colours(tmp_path / "images", {"x": 1}) / "x" / "red" / "0.png"
    assert main(["predict", str(damaged), str(image)]) == 2
    err = capsys.readouterr().err
    assert one_sentence(err) and "damaged" in err and str(damaged) in err
