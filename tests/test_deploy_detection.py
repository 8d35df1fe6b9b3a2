"""``deepkd export`` of a detection run: the torchvision detector as ONNX, checked against PyTorch;
the commands that take classifiers refuse a detector in one sentence."""
import json
import re
from pathlib import Path

import onnxruntime
import pytest
import torch
from conftest import write_colours
from test_deploy import one_sentence

from deepkd.cli import main
from deepkd.train.config import validate_config


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory):
    """tiny_fasterrcnn trained 1 epoch (4 steps) on 8 synthetic 128-px images; 4 validation images."""
    from deepkd.train.loop import train

    tmp = tmp_path_factory.mktemp("det")
    cfg = validate_config({
        "experiment": "det", "seed": 0, "output_dir": str(tmp / "runs"),
        "data": {"dataset": "synthetic_coco", "root": str(tmp / "data"), "batch_size": 2, "eval_batch_size": 4,
                 "min_size": [128], "max_size": 128, "synthetic": {"num_train": 8, "num_val": 4}},
        "student": {"name": "tiny_fasterrcnn"}, "method": {"name": "ce"},
        "optimizer": {"name": "sgd", "lr": 0.02}, "schedule": {"name": "multistep_iter", "epochs": 1,
                                                              "milestones": [6], "warmup_iterations": 3},
        "train": {"device": "cpu", "progress": "none"}})
    return Path(train(cfg)["run_dir"])


def test_a_detection_run_exports_its_detector_to_onnx(detection_run, capsys):
    from deepkd.detection.models import create_detector
    from deepkd.models import load_weights

    assert main(["export", str(detection_run), "--format", "onnx"]) == 0
    printed = capsys.readouterr().out
    out = detection_run / "detector.onnx"
    assert out.is_file() and "parity on 4 validation images of synthetic_coco" in printed
    assert int(re.search(r"the same (\d+) detections", printed).group(1)) > 0  # boxes were compared
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = {k[len("deepkd."):]: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert (meta["task"], meta["student"], meta["weights"], meta["min_size"]) == ("detection", "tiny_fasterrcnn",
                                                                                 "best.pt", [128])
    model = create_detector("tiny_fasterrcnn", meta["num_classes"], min_size=(128,), max_size=128)
    load_weights(model, detection_run / "best.pt")
    model.eval()
    torch.manual_seed(0)
    for shape in ((3, 128, 128), (3, 96, 160)):  # a size the export never saw: height and width are dynamic
        image = torch.rand(shape)
        boxes, labels, scores = session.run(None, {"images": image.numpy()})
        with torch.no_grad():
            expected = model([image])[0]
        assert len(labels) > 0 and torch.equal(torch.from_numpy(labels), expected["labels"])
        torch.testing.assert_close(torch.from_numpy(boxes), expected["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(torch.from_numpy(scores), expected["scores"], rtol=1e-4, atol=1e-5)


def test_detectors_export_to_onnx_only_and_past_the_tolerance_nothing(detection_run, tmp_path, capsys):
    assert main(["export", str(detection_run), "--format", "pt2"]) == 2
    err = capsys.readouterr().err
    assert one_sentence(err) and "detection run" in err and "ONNX only" in err
    out = tmp_path / "strict.onnx"
    assert main(["export", str(detection_run), "--format", "onnx", "-o", str(out), "--tolerance", "-1"]) == 2
    err = capsys.readouterr().err
    assert one_sentence(err) and "not written" in err and list(tmp_path.iterdir()) == []
    image = write_colours(tmp_path / "images", {"x": 1}) / "x" / "red" / "0.png"
    assert main(["export", str(detection_run), "--format", "onnx", "-o", str(tmp_path / "d.onnx")]) == 0
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "d.onnx"), str(image)]) == 2
    err = capsys.readouterr().err
    assert one_sentence(err) and "is a detector" in err
    for command in (["quantize", str(detection_run)], ["profile", "resnet8x4", str(detection_run)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert one_sentence(err) and "take classification runs" in err, command


def test_the_readme_detector_recipe_loads():
    from deepkd.train.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "benchmarks" / "deploy" / "tiny_detector.yaml")
    assert cfg.detection and cfg.student.name == "tiny_fasterrcnn" and cfg.schedule.epochs == 15


def test_a_finished_detection_run_holds_its_model_card(detection_run):
    from huggingface_hub import ModelCard
    from test_card import split_card, table

    from deepkd.detection.models import create_detector
    from deepkd.models import extract_state_dict, load_weights, read_weights

    summary = json.loads((detection_run / "summary.json").read_text())
    card = ModelCard.load(detection_run / "README.md")
    results = {r.metric_name: (r.metric_type, r.metric_value) for r in card.data.eval_results}
    assert results == {"box AP (last epoch)": ("mAP", round(summary["last"]["AP"], 2)),
                       "box AP (best epoch)": ("mAP", round(summary["best_AP"], 2))}
    assert card.data.pipeline_tag == "object-detection"
    header, body = split_card((detection_run / "README.md").read_text())
    rows = table(body)
    assert all(source for _, source in rows.values()) and rows["data"][0].endswith("input 3x128x128")
    assert "CPU latency, batch 1" in rows and "CPU latency, batch 32" not in rows
    hub = json.loads((detection_run / "config.json").read_text())
    model = create_detector(hub["architecture"], hub["num_classes"], min_size=(128,), max_size=128)
    load_weights(model, detection_run / "model.safetensors")
    best = extract_state_dict(read_weights(detection_run / "best.pt"))
    assert all(torch.equal(value, best[key]) for key, value in model.state_dict().items())
