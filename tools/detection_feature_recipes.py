"""The COCO feature-distillation recipes, ReviewKD and DKD + ReviewKD on the FPN, as data: written by
``tools/make_recipes.py`` into ``src/deepkd/configs/coco/<pair>/{reviewkd,dkd_reviewkd}.yaml``.

What ReviewKD distils on a detector, from its detection code (dvlab-research/ReviewKD ``Detection/model/
rcnn.py`` and ``kd_trans.py``; mdistiller's ``detection/`` is a copy that adds DKD): the student's FPN
outputs p2-p6, every level, through ABFs (256 mid channels) matched by HCL (its 4/2/1 pools apply) to the
teacher's p2-p6 of the same images; no pooled level, no warm-up. That is reviewkd's ``fpn: true``. The
loss weight is the reference config's for the DKD pair that the torchvision pair stands for; ReviewKD's
``Detection/configs/ReviewKD-*.yaml`` and mdistiller's ``detection/configs/DKD/ReviewDKD-*.yaml`` ship the
same weights. DKD + ReviewKD (mdistiller's ``ReviewDKD``, DKD's best COCO row) adds DKD on the RoI logits.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import yaml

# the DKD pair a torchvision pair stands for -> ReviewKD's loss weight in the reference configs
REVIEWKD_WEIGHT = {"R101 -> R18": 1.2, "R101 -> R50": 1.0, "R50 -> MV2": 2.0}
PAPERS = {"reviewkd": "ReviewKD (Chen et al., CVPR 2021) on the FPN levels",
          "dkd_reviewkd": "DKD + ReviewKD (Zhao et al., CVPR 2022, DKD's best COCO row): DKD on the RoI logits, "
                          "ReviewKD on the FPN levels"}
PUBLISHED = ("expected AP: not listed (ReviewKD's and DKD's COCO numbers are for Detectron2's pairs, not in the "
             "spec and not re-checked here)")


def reviewkd_section(weight: float) -> dict:
    """reviewkd's arguments on a detector (the reference's detection setting; lists from the models)."""
    return {"ce_weight": 1.0, "reviewkd_weight": weight, "warmup_epochs": 0, "max_mid_channel": 512,
            "stu_preact": False, "fpn": True}


def methods(weight: float, dkd: dict) -> Dict[str, dict]:
    """``{file stem: method section}`` of the two recipes of a pair."""
    review = reviewkd_section(weight)
    return {"reviewkd": {"name": "reviewkd", **review},
            "dkd_reviewkd": {"name": "dkd+reviewkd", "dkd": dict(dkd), "reviewkd": review}}


def coco_feature_recipes(coco_base: Callable[[str, str], dict], pairs: Dict[str, Tuple[str, str, float, str]],
                         dkd: dict, notes: Sequence[str], order: Sequence[str]) -> Dict[str, str]:
    """``{path relative to src/deepkd/configs: file text}`` for every COCO pair (``pairs``: folder ->
    (teacher, student, teacher AP, DKD pair)); ``coco_base(teacher, student)``: the shared sections,
    ``dkd``: DKD's detection arguments, ``notes``: the COCO header lines, ``order``: the key order."""
    written = {}
    for folder, (t, s, teacher_ap, dkd_pair) in pairs.items():
        weight = REVIEWKD_WEIGHT[dkd_pair]
        pair = f"MS-COCO, {t} ({teacher_ap} AP) -> {s}, torchvision analogue of DKD's {dkd_pair}"
        weight_note = (f"ReviewKD: weight {weight}, the reference configs' for {dkd_pair}; every FPN level paired "
                       "(fpn: true); the ABF connectors train with the student's SGD and weight decay and are "
                       "saved in its checkpoints.")
        for name, method in methods(weight, dkd).items():
            recipe = dict(coco_base(t, s), experiment=f"coco_{folder}_{name}", method=method)
            recipe = {key: recipe[key] for key in order if key in recipe}
            header = [f"{PAPERS[name]}; {pair}", PUBLISHED, *notes, weight_note]
            written[f"coco/{folder}/{name}.yaml"] = "".join(f"# {h}\n" for h in header) + yaml.safe_dump(
                recipe, sort_keys=False)
    return written
