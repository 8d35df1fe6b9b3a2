"""COCO box AP with pycocotools (the metric every detection paper reports).

The model's eval-mode outputs are already in original-image pixels (``transform.postprocess``
rescales them); they become COCO results ``{image_id, category_id, bbox xywh, score}``, are gathered
over ranks, and ``COCOeval(gt, dt, "bbox")`` is run on the evaluated image ids only.
"""
from __future__ import annotations

import contextlib
import io
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from deepkd.engine.distributed import Dist

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


def detections_to_coco(output: Dict[str, torch.Tensor], image_id: int) -> List[dict]:
    """COCO result entries of one image's detections (``boxes`` xyxy, ``labels`` = category ids,
    ``scores``)."""
    boxes = output["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    return [{"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": float(score)}
            for box, label, score in zip(xywh, output["labels"].tolist(), output["scores"].tolist())]


def coco_summary(coco_gt, results: List[dict], image_ids: Iterable[int]) -> Dict[str, float]:
    """``{AP, AP50, AP75, APs, APm, APl}`` in percent of ``results`` on ``image_ids`` of ``coco_gt``.

    No detections at all give zeros (``loadRes([])`` would raise). A size range without any ground
    truth box (e.g. ``APl`` on small images) is -1.0, pycocotools' marker.
    """
    from pycocotools.cocoeval import COCOeval

    image_ids = sorted(set(int(i) for i in image_ids))
    if not results or not image_ids:
        return {key: 0.0 for key in METRICS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        detections = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, detections, "bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # stats are numpy float64 (not JSON-serialisable); -1 marks "no ground truth in this size range"
    return {key: 100.0 * float(value) if value >= 0 else -1.0 for key, value in zip(METRICS, evaluator.stats[:6])}


@torch.no_grad()
def coco_evaluate(model: nn.Module, loader, coco_gt, ctx: Optional[Dist] = None,
                  device: Optional[torch.device] = None) -> Dict[str, float]:
    """Box AP (percent) of ``model`` over ``loader`` (batches ``(images, targets)`` with
    ``target["image_id"]``), against ``coco_gt`` (``pycocotools.coco.COCO``).

    With an enabled ``ctx`` each rank evaluates its share; results are gathered to rank 0, which
    runs COCOeval and broadcasts the numbers. The model's train/eval mode is restored.
    """
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    results, image_ids = [], []
    try:
        for images, targets in loader:
            outputs = model([image.to(device) for image in images])
            for output, target in zip(outputs, targets):
                image_ids.append(int(target["image_id"]))
                results.extend(detections_to_coco(output, target["image_id"]))
    finally:
        model.train(was_training)
    if ctx is None or not ctx.enabled:
        return coco_summary(coco_gt, results, image_ids)
    return _gathered_summary(coco_gt, results, image_ids, ctx)


def _gathered_summary(coco_gt, results: List[dict], image_ids: Sequence[int], ctx: Dist) -> Dict[str, float]:
    parts: List[Optional[tuple]] = [None] * ctx.world_size
    dist.all_gather_object(parts, (results, list(image_ids)))
    summary = [None]
    if ctx.is_main:
        summary[0] = coco_summary(coco_gt, [r for part in parts for r in part[0]],
                                  [i for part in parts for i in part[1]])
    dist.broadcast_object_list(summary, src=0)
    return summary[0]
