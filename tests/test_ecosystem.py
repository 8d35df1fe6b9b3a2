"""torchvision and timm behind deepkd's registry: models, weight sources, data configs, listings."""
import re
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from deepkd.cli import main
from deepkd.models import create_model, format_model_table, list_models, load_pretrained, model_info, save_weights
from deepkd.train import build
from deepkd.train.config_errors import validate_config


def one_sentence(message):
    return "\n" not in message and not re.search(r"[.!?]\s+[A-Z]", message)


@pytest.fixture
def hub_dir(tmp_path):
    """torch.hub's cache redirected to an empty folder for the test."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield Path(torch.hub.get_dir())
    torch.hub.set_dir(previous)


@pytest.mark.parametrize("name,cls", [("resnet18", "ResNet"), ("resnet34", "ResNet"), ("resnet50", "ResNet"),
                                      ("mobilenetv2_imagenet", "MobileNetV2")])
def test_imagenet_models_are_torchvision_models(name, cls):
    with torch.device("meta"):
        model = create_model(name, num_classes=10)
    assert isinstance(model, getattr(torchvision.models, cls)) and model_info(name)["source"] == "torchvision"
    assert model_info("mobilenetv1")["source"] == "deepkd"  # not in torchvision: deepkd's own


def test_torchvision_weights_from_a_local_file_give_the_same_logits(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18-f37072fd.pth"  # torchvision's released file layout: a plain state_dict
    torch.save(source.state_dict(), path)
    model = load_pretrained(create_model("resnet18"), str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(x), source(x))


def test_torchvision_enum_weights_offline_say_where_the_file_goes_and_then_load(hub_dir, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as info:
        load_pretrained(create_model("resnet18"), "torchvision:IMAGENET1K_V1", role="teacher")
    message = str(info.value)
    assert one_sentence(message) and "resnet18-f37072fd.pth" in message
    target = Path(re.search(r"put that file at (\S+),", message).group(1))
    assert target.parent == hub_dir / "checkpoints"
    torch.manual_seed(1)
    released = torchvision.models.resnet18(weights=None)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(released.state_dict(), target)
    for spec in ("torchvision:IMAGENET1K_V1", "torchvision:ResNet18_Weights.IMAGENET1K_V1"):
        model = load_pretrained(create_model("resnet18"), spec, role="teacher")
        assert torch.equal(model.conv1.weight, released.conv1.weight)


def test_the_papers_imagenet_teachers_are_torchvisions_v1_weights():
    from torchvision.models import get_model_weights

    # DKD / DeepKD ImageNet tables: teachers ResNet-34 73.31 and ResNet-50 76.16 (RECIPES.md)
    assert get_model_weights("resnet34").IMAGENET1K_V1.meta["_metrics"]["ImageNet-1K"]["acc@1"] == 73.314
    assert "333f7ec4" not in get_model_weights("resnet34").IMAGENET1K_V1.url  # re-saved file, same weights
    cfg = validate_config({"student": {"name": "resnet18"}, "method": {"name": "kd"},
                           "teacher": {"name": "resnet34", "weights": "torchvision:IMAGENET1K_V1"}})
    assert cfg.teacher.weights == "torchvision:IMAGENET1K_V1"


def test_wrong_weight_sources_are_one_sentence():
    with pytest.raises(ValueError, match="choose from IMAGENET1K_V1") as bad_enum:
        load_pretrained(create_model("resnet34"), "torchvision:IMAGENET9")
    with pytest.raises(ValueError, match="need a torchvision model") as not_tv:
        load_pretrained(create_model("resnet8"), "torchvision:IMAGENET1K_V1")
    with pytest.raises(FileNotFoundError, match="student.weights") as missing:
        load_pretrained(create_model("resnet8"), "nope.pt", role="student")
    assert all(one_sentence(str(e.value)) for e in (bad_enum, not_tv, missing))


def test_any_timm_model_with_the_data_class_count():
    model = create_model("timm/test_resnet", num_classes=7).eval()
    size = model_info("timm/test_resnet")["input_size"]
    assert model(torch.randn(2, 3, size, size)).shape == (2, 7) and model.deepkd_name == "timm/test_resnet"
    with pytest.raises(KeyError, match="unknown timm model 'no_such_net'"):
        create_model("timm/no_such_net")


def test_timm_local_file_adapts_a_students_head_but_not_a_teachers(tmp_path):
    torch.manual_seed(0)
    pretrained = create_model("timm/test_resnet", num_classes=1000)
    path = save_weights(pretrained, tmp_path / "model.safetensors")  # the hub's file format
    student = create_model("timm/test_resnet", num_classes=10)
    head_before = student.get_classifier().weight.clone()
    load_pretrained(student, str(path), reset_head=True, role="student")
    body = [k for k in student.state_dict() if not k.startswith("fc.")]
    assert all(torch.equal(student.state_dict()[k], pretrained.state_dict()[k]) for k in body)
    assert torch.equal(student.get_classifier().weight, head_before)  # fresh head for 10 classes
    with pytest.raises(ValueError, match="1000-class classifier but the teacher is built for 10") as info:
        load_pretrained(create_model("timm/test_resnet", num_classes=10), str(path), role="teacher")
    assert one_sentence(str(info.value))


def _hf_cache(root: Path, repo: str, files: dict) -> None:
    """The Hugging Face hub cache layout: refs/main -> snapshots/<commit>/<file>."""
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, writer in files.items():
        writer(snapshot / name)


def test_timm_hub_weights_come_from_the_hub_cache_and_offline_is_one_sentence(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="could not fetch timm weights test_resnet.r160_in1k") as info:
        load_pretrained(create_model("timm/test_resnet"), "timm:", role="teacher")
    assert one_sentence(str(info.value))
    torch.manual_seed(2)
    released = create_model("timm/test_resnet")
    _hf_cache(tmp_path / "hf", "timm/test_resnet.r160_in1k",
              {"model.safetensors": lambda p: save_weights(released, p)})
    student = load_pretrained(create_model("timm/test_resnet", num_classes=5), "timm:r160_in1k", reset_head=True,
                              role="student")
    body = [k for k in released.state_dict() if not k.startswith("fc.")]
    assert all(torch.equal(student.state_dict()[k], released.state_dict()[k]) for k in body)
    assert student.get_classifier().out_features == 5
    with pytest.raises(ValueError, match="choose from timm/test_resnet|test_resnet.r160_in1k"):
        load_pretrained(create_model("timm/test_resnet"), "timm:no_such_tag")


def _run(teacher=None, student="resnet18", **data):
    raw = {"data": {"dataset": "imagefolder", "root": "x", **data}, "student": {"name": student}}
    if teacher:
        raw.update(teacher=teacher, method={"name": "kd"})
    return validate_config(raw)


def test_image_folder_options_follow_recipe_then_timm_teacher_then_student_then_defaults():
    deit_teacher = {"name": "timm/regnety_160", "weights": "timm:deit_in1k"}
    options = build.folder_options(_run(deit_teacher, "timm/deit_tiny_patch16_224"))
    assert (options.image_size, options.interpolation, options.resize) == (224, "bicubic", 235)  # crop_pct 0.95
    student_only = build.folder_options(_run(student="timm/deit_tiny_patch16_224"))
    assert student_only.resize == 248  # DeiT-Tiny's crop_pct 0.9
    recipe = build.folder_options(_run(deit_teacher, image_size=160, mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2]))
    assert (recipe.image_size, recipe.resize, list(recipe.mean), recipe.interpolation) == (160, 168, [0.5] * 3,
                                                                                           "bicubic")
    plain = build.folder_options(_run())
    assert (plain.image_size, plain.interpolation, plain.resize, plain.crop) == (224, "bilinear", None,
                                                                                 "random_resized")


def test_list_models_shows_three_sources(capsys):
    table = format_model_table()
    sources = {line.split()[1] for line in table.splitlines()[1:-1]}
    assert sources == {"deepkd", "torchvision"} and "timm/<name>" in table.splitlines()[-1]
    assert "timm/deit_tiny_patch16_224" in list_models("timm/deit_tiny*")
    assert "torchvision/mobilenet_v3_small" in list_models("torchvision/mobilenet*")
    assert main(["list", "models", "timm/deit_tiny*"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert any(r.split()[:3] == ["timm/deit_tiny_patch16_224", "timm", "5.717M"] for r in rows)
