"""Feature access (deepkd.models.features): every zoo model's stages, pre-activations and pooled vector
come from hooks on its own forward, so the logits stay model(x)'s; any other model names its layers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepkd.errors import ConfigError, UnknownNameError
from deepkd.models import FeatureExtractor, create_model, feature_info, list_models, model_info

# As in test_models.py: the deepest and largest models run only under -m slow (2 slow CPU cores).
SLOW = {"resnet110", "resnet34", "resnet50", "ResNet50"}
# Stage channels [stem, stage1, ...] at 100 / 1000 classes: mdistiller's get_stage_channels (its
# stage_channels lists), with the stem prepended where mdistiller's ImageNet MobileNetV1 omits it.
PUBLISHED_CHANNELS = {
    "resnet8x4": [32, 64, 128, 256], "resnet32x4": [32, 64, 128, 256], "resnet56": [16, 16, 32, 64],
    "wrn_40_2": [16, 32, 64, 128], "wrn_16_1": [16, 16, 32, 64], "vgg13": [64, 128, 256, 512, 512],
    "MobileNetV2": [16, 12, 16, 48, 160], "ShuffleV1": [24, 240, 480, 960], "ShuffleV2": [24, 116, 232, 464],
    "ResNet18": [64, 64, 128, 256, 512], "mobilenetv1": [32, 128, 256, 512, 1024],
    "resnet18": [64, 64, 128, 256, 512], "mobilenetv2_imagenet": [32, 24, 32, 96, 320],
}


def built(name, **kwargs):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kwargs).eval()
    size = 32 if model_info(name)["input_size"] == 32 else 64  # ImageNet models: any input size
    return model, torch.randn(2, 3, size, size)


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def check_preact(name, out):
    """``preact`` is each stage's tensor before its last ReLU (the stem's own for CIFAR stems, as in mdistiller)."""
    if name == "ShuffleV2":
        assert out.preact is None
    elif name in ("MobileNetV2", "mobilenetv2_imagenet"):  # linear bottlenecks: no ReLU ends a stage
        assert all(p is s for p, s in zip(out.preact, out.stages))
    elif name.startswith("wrn"):  # the next BN's output: test_wide_resnet_preact_is_the_next_bn_output
        assert [t.shape for t in out.preact] == [t.shape for t in out.stages]
    else:
        first = 0 if name.startswith("cnn") or model_info(name)["dataset"] == "imagenet" else 1
        assert all(torch.equal(p, s) for p, s in zip(out.preact[:first], out.stages))
        for pre, stage in list(zip(out.preact, out.stages))[first:]:
            assert (pre < 0).any() and torch.equal(F.relu(pre), stage)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in list_models()])
def test_every_zoo_model_gives_its_own_logits_and_its_features(name):
    model, x = built(name)
    with torch.no_grad():
        out = FeatureExtractor(model)(x)
        reference = model(x)
    assert torch.equal(out.logits, reference)
    assert no_hooks_left(model)
    assert len(out.stages) >= 4 and all(t.dim() == 4 and t.shape[0] == 2 for t in out.stages)
    if name in PUBLISHED_CHANNELS:
        assert [t.shape[1] for t in out.stages] == PUBLISHED_CHANNELS[name]
    check_preact(name, out)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert out.pooled.shape == (2, head.in_features)
    if hasattr(model, "forward_features"):  # deepkd's own models: the same tensors as forward_features
        with torch.no_grad():
            feats = model.forward_features(x)
        assert torch.equal(out.pooled, feats["pooled"])
        assert any(v.shape == out.stages[-1].shape and torch.equal(v, out.stages[-1]) for v in feats.values())


def test_every_published_channel_list_is_a_zoo_model():
    assert set(PUBLISHED_CHANNELS) <= set(list_models())


def test_feature_info_sizes_and_no_side_effects():
    model, _ = built("resnet8x4")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = feature_info(model, (3, 32, 32))
    assert info.channels == [32, 64, 128, 256] and info.sizes == [(32, 32), (32, 32), (16, 16), (8, 8)]
    assert info.pooled == 256 and info.preact
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics unmoved
    assert not feature_info(create_model("ShuffleV2"), (3, 32, 32)).preact


def test_wide_resnet_preact_is_the_next_bn_output():
    model, x = built("wrn_16_2")
    with torch.no_grad():
        out = FeatureExtractor(model)(x)
        assert torch.equal(out.preact[1], model.block2.layer[0].bn1(out.stages[1]))
        assert torch.equal(out.preact[3], model.bn1(out.stages[3]))
    assert torch.equal(torch.flatten(F.avg_pool2d(F.relu(out.preact[3]), 8), 1), out.pooled)  # the model's pooling


def test_features_keep_their_graph_in_training():
    model, x = built("resnet8")
    model.train()
    out = FeatureExtractor(model)(x)
    assert torch.equal(out.logits, model(x))  # batch statistics: the same in a second pass
    (sum(t.mean() for t in out.stages + out.preact) + out.pooled.mean()).backward()
    assert model.conv1.weight.grad is not None and model.layer3[0].conv2.weight.grad is not None


def test_user_module_paths_on_a_plain_sequential():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 5))
    x = torch.randn(2, 3, 16, 16)
    out = FeatureExtractor(net, ["0", "2"], preact=["1:input"], pooled="5:input")(x)
    first = net[0](x)
    second = net[2](net[1](first))
    assert torch.equal(out.logits, net(x)) and torch.equal(out.stages[0], first) and torch.equal(out.stages[1], second)
    assert torch.equal(out.preact[0], first) and torch.equal(out.pooled, torch.flatten(net[3](second), 1))
    info = feature_info(net, (3, 16, 16), ["0", "2"])
    assert info.channels == [4, 8] and info.sizes == [(14, 14), (6, 6)] and info.pooled is None
    assert no_hooks_left(net)


def test_user_paths_on_a_zoo_model_and_an_inplace_overwrite():
    model, x = built("resnet8")
    out = FeatureExtractor(model, ["layer2.0.conv1", "layer3"], pooled="fc:input")(x)
    assert out.stages[0].shape == (2, 32, 16, 16) and out.preact is None and out.pooled.shape == (2, 64)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    with pytest.raises(ConfigError, match=r"'1' was overwritten in place.*':input'"):
        FeatureExtractor(net, ["1"])(x)
    kept = FeatureExtractor(net, ["2:input"])(x).stages[0]  # the in-place ReLU's input is copied first
    assert (kept < 0).any() and torch.equal(F.relu(kept), net(x))


def test_wrong_points_are_one_sentence():
    model = create_model("resnet8")
    with pytest.raises(UnknownNameError, match=r"CifarResNet has no module 'layer9' \(closest: .*'layer1'"):
        FeatureExtractor(model, ["layer9"])
    with pytest.raises(ConfigError, match="suffix must be ':input' or ':relu'"):
        FeatureExtractor(model, ["layer1:output"])
    with pytest.raises(ConfigError, match=r"Sequential has no built-in feature points: name its layers.*'0'"):
        FeatureExtractor(nn.Sequential(nn.Linear(2, 2)))


def test_a_torchvision_model_without_a_table_takes_module_paths():
    model = create_model("torchvision/squeezenet1_0", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ConfigError, match="SqueezeNet has no built-in feature points.*'features', 'classifier'"):
        FeatureExtractor(model)
    with torch.no_grad():
        out = FeatureExtractor(model, ["features.2", "features.6", "features.12"])(x)
        assert torch.equal(out.logits, model(x))
    assert [t.shape[1] for t in out.stages] == [96, 256, 512]


@pytest.mark.parametrize("name", ["timm/test_resnet", "timm/test_vit"])
def test_timm_models_through_forward_intermediates(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        out = FeatureExtractor(model)(x)
        assert torch.equal(out.logits, model(x))
    assert [t.shape[1] for t in out.stages] == [info["num_chs"] for info in model.feature_info]
    assert out.preact is None and out.pooled.shape == (2, model.num_features) and no_hooks_left(model)
    if name == "timm/test_resnet":  # module paths work on timm models too
        assert FeatureExtractor(model, ["layer1", "layer4"])(x).stages[1].shape == out.stages[-1].shape
