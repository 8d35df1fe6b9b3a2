"""``deepkd eval``: top-1/top-5 of a checkpoint on a recipe's test split (box AP for a detection recipe)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

from deepkd.errors import MissingFileError
from deepkd.models import create_model, load_weights
from deepkd.train import build
from deepkd.train.config import load_config


def evaluate_checkpoint(recipe: str, weights: str, overrides: Sequence[str] = ()) -> Dict[str, float]:
    """Build the recipe's student and test data, load ``weights`` strictly, evaluate."""
    from deepkd.train.loop import evaluate

    cfg = load_config(recipe, overrides)
    if cfg.detection:
        from deepkd.train.detection_task import evaluate_detection

        return {"weights": weights, **evaluate_detection(cfg, weights)}
    if not Path(weights).is_file():
        raise MissingFileError(f"checkpoint {weights!r} does not exist")
    device = build.build_device(cfg.train.device)
    data = build.build_dataset(cfg, device=device, rank=0, world_size=1)
    model = create_model(cfg.student.name, num_classes=data.num_classes)
    load_weights(model, weights)
    model.to(device)
    return {"weights": weights, **evaluate(model, data.test, device, precision=cfg.train.precision,
                                           channels_last=cfg.train.channels_last)}
