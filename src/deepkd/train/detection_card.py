"""The model card of a finished detection run (:mod:`deepkd.train.card` for the layout and the table).

The run folder gets ``README.md`` (box AP on the validation split, the detector's cost at the data
section's smallest input side, square), ``config.json`` and ``model.safetensors``: the weights of
``best.pt`` (best box AP), the checkpoint ``deepkd eval`` and ``deepkd export`` read. Latency is one
image at a time (torchvision detectors run images one by one).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from deepkd.detection.models import create_detector
from deepkd.models import extract_state_dict, load_weights, read_weights, save_weights
from deepkd.train.card import CARD, HUB_CONFIG, HUB_WEIGHTS, _subject, _write, code_of, measure, render
from deepkd.train.config import config_to_dict

DETECTION = {"task": "object-detection", "metric": "validation box AP", "type": "mAP", "split": "validation",
             "last_key": "`last.AP`", "best_key": "`best_AP` (chosen on the validation split: optimistic)"}
BOX_PREDICTOR = "roi_heads.box_predictor.cls_score.weight"  # [classes, features]: the class count of the weights


def write_detection_card(cfg, run_dir: Path, summary: Dict[str, Any]) -> Path:
    """``README.md``, ``config.json`` and ``model.safetensors`` of a finished detection run folder."""
    weights = run_dir / "best.pt"
    state = extract_state_dict(read_weights(weights), str(weights))
    classes = state[BOX_PREDICTOR].shape[0] if BOX_PREDICTOR in state else 91
    side = min(cfg.data.min_size)
    model = create_detector(cfg.student.name, classes, min_size=tuple(cfg.data.min_size), max_size=cfg.data.max_size)
    load_weights(model, weights)
    model.eval()
    save_weights(model, run_dir / HUB_WEIGHTS)
    hub = {"library_name": "deepkd", "architecture": cfg.student.name, "task": "object-detection",
           "num_classes": classes, "min_size": list(cfg.data.min_size), "max_size": cfg.data.max_size,
           "deepkd": config_to_dict(cfg)}
    _write(run_dir / HUB_CONFIG, json.dumps(hub, indent=1))
    result = {"last": summary["last"].get("AP", float("nan")), "best": summary["best_AP"], "seed": cfg.seed,
              "run_dir": str(run_dir)}
    shape = (3, side, side)
    card = render(_subject(cfg, classes, shape, DETECTION), [result], measure(model, shape, batch_sizes=(1,)),
                  code_of(run_dir / "config.yaml"))
    return _write(run_dir / CARD, card)
