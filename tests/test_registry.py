import pytest

from deepkd.registry import Registry


def test_register_build_and_duplicate():
    reg = Registry("widget")

    @reg.register("alpha", size=3)
    def build_alpha(x=1):
        return ("alpha", x)

    assert reg.build("alpha", x=2) == ("alpha", 2)
    assert reg.info("alpha") == {"size": 3}
    assert "alpha" in reg and len(reg) == 1
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha")(lambda: None)


def test_miss_names_closest():
    reg = Registry("model")
    for n in ["resnet8x4", "resnet32x4", "wrn_40_2"]:
        reg.register(n)(lambda: None)
    with pytest.raises(KeyError, match="resnet8x4"):
        reg.get("resnet8X5")
    assert reg.names("resnet*") == ["resnet32x4", "resnet8x4"]
