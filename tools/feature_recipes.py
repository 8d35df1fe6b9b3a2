"""The feature-distillation recipes (FitNet, AT, NST, PKT, KDSVD, OFD, RKD, SP, VID, CRD, ReviewKD) as data:
written by ``tools/make_recipes.py`` into ``src/deepkd/configs/cifar100/<teacher>-<student>/<method>.yaml``.

mdistiller ships one CIFAR-100 config per method, for resnet32x4 -> resnet8x4 (its defaults, lr 0.05,
weight decay 5e-4, 240 epochs); here every method also runs on the other pairs of the CRD paper's
tables that DKD's tables reuse, where that table publishes a number. Published top-1: CRD (Tian et al.,
ICLR 2020) Tables 1 and 2, as its code's README (HobbitLong/RepDistiller) lists them; OFD and ReviewKD
from DKD (CVPR 2022) Table 1, not re-checked against the paper here. A method's section writes out its
builder's defaults (mdistiller's CIFAR-100 values), so a recipe shows every number that matters.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Optional, Tuple

CRD_TABLE = "CRD (Tian et al., ICLR 2020) Table {}, as listed in its code's README"
DKD_TABLE = "DKD (Zhao et al., CVPR 2022) Table 1, not re-checked against the paper here"
# (teacher, student): the CRD paper's columns; same-architecture pairs are its Table 1, the others Table 2
SAME = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
        ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8")]
DIFFERENT = [("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"), ("resnet32x4", "ShuffleV1"),
             ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1")]
CRD_ROWS = {  # method -> top-1 per pair, in the order of SAME then DIFFERENT
    "fitnet": (73.58, 72.24, 69.21, 68.99, 71.06, 73.50, 71.02, 64.14, 63.16, 70.69, 73.59, 73.54, 73.73),
    "at": (74.08, 72.77, 70.55, 70.22, 72.31, 73.44, 71.43, 59.40, 58.58, 71.84, 71.73, 72.73, 73.32),
    "sp": (73.83, 72.43, 69.67, 70.04, 72.69, 72.94, 72.68, 66.30, 68.08, 73.34, 73.48, 74.56, 74.52),
    "vid": (74.11, 73.30, 70.38, 70.16, 72.61, 73.09, 71.23, 65.56, 67.57, 70.30, 73.38, 73.40, 73.61),
    "rkd": (73.35, 72.22, 69.61, 69.25, 71.82, 71.90, 71.48, 64.52, 64.43, 71.50, 72.28, 73.21, 72.21),
    "pkt": (74.54, 73.45, 70.34, 70.25, 72.61, 73.64, 72.88, 67.13, 66.52, 73.01, 74.10, 74.69, 73.89),
    "nst": (73.68, 72.24, 69.60, 69.53, 71.96, 73.30, 71.53, 58.16, 64.96, 71.28, 74.12, 74.68, 74.89),
    "crd": (75.48, 74.14, 71.16, 71.46, 73.48, 75.51, 73.94, 69.73, 69.11, 74.30, 75.11, 75.65, 76.05),
}
DKD_ROWS = {("resnet32x4", "resnet8x4"): {"ofd": 74.95, "reviewkd": 75.63}}  # mdistiller's pair
PAPERS = {"fitnet": "FitNet (Romero et al., ICLR 2015)", "at": "AT (Zagoruyko & Komodakis, ICLR 2017)",
          "nst": "NST (Huang & Wang, 2017)", "pkt": "PKT (Passalis & Tefas, ECCV 2018)",
          "kdsvd": "KDSVD (Lee et al., ECCV 2018)", "ofd": "OFD (Heo et al., ICCV 2019)",
          "rkd": "RKD (Park et al., CVPR 2019)", "sp": "SP (Tung & Mori, ICCV 2019)",
          "vid": "VID (Ahn et al., CVPR 2019)", "crd": "CRD (Tian et al., ICLR 2020)",
          "reviewkd": "ReviewKD (Chen et al., CVPR 2021)"}
MDISTILLER_PAIR = ("resnet32x4", "resnet8x4")


def published(method: str, pair: Tuple[str, str]) -> Optional[Tuple[float, str]]:
    """``(top-1, source)`` of ``method`` on ``pair``, or None where no table lists it."""
    if method in CRD_ROWS and pair in SAME + DIFFERENT:
        column = (SAME + DIFFERENT).index(pair)
        return CRD_ROWS[method][column], CRD_TABLE.format(1 if pair in SAME else 2)
    value = DKD_ROWS.get(pair, {}).get(method)
    return (value, DKD_TABLE) if value is not None else None


def defaults(method: str) -> Dict[str, object]:
    """The method's recipe keys with their builder defaults (mdistiller's CIFAR-100 values)."""
    from deepkd.losses.base import PROVIDED
    from deepkd.losses.registry import method_builder

    params = inspect.signature(method_builder(method)).parameters.values()
    return {p.name: p.default for p in params if p.name not in PROVIDED and p.default is not inspect.Parameter.empty}


def pairs() -> Dict[Tuple[str, str], list]:
    """Pair -> the methods shipped for it: all eleven on mdistiller's pair, the published ones elsewhere."""
    out = {MDISTILLER_PAIR: list(PAPERS)}
    for pair in SAME + DIFFERENT:
        if pair != MDISTILLER_PAIR:
            out[pair] = [m for m in PAPERS if published(m, pair) is not None]
    return out


def write_feature_recipes(write: Callable, root, base: Callable, teacher: Callable, unverified: str) -> None:
    """Write every feature recipe through ``make_recipes``' ``write(path, header, recipe)``, on its
    ``cifar_base(student)`` and ``teacher(name)``."""
    for (t, s), methods in pairs().items():
        for method in methods:
            recipe = base(s)
            recipe["experiment"] = f"cifar100_{t}_{s}_{method}"
            recipe["teacher"] = teacher(t)
            recipe["method"] = {"name": method, **defaults(method)}
            found = published(method, (t, s))
            top = f"expected top-1: {found[0]:.2f} ({found[1]})" if found else unverified
            origin = ("mdistiller's config configs/cifar100/" + method + ".yaml" if (t, s) == MDISTILLER_PAIR
                      else "mdistiller's method defaults")
            write(root / "cifar100" / f"{t}-{s}" / f"{method}.yaml",
                  [f"{PAPERS[method]}, {origin}; CIFAR-100, {t} -> {s}", top], recipe)
