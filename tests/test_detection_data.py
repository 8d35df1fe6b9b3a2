"""Detection data and evaluation: COCO-format reading, flips, aspect-ratio batches, the synthetic
writer, the COCO download layout, and pycocotools AP (../shared/spec/DETECTION.md A9, A10)."""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from torch import multiprocessing as mp
from torch import nn

from deepkd.data.imagefolder import decode
from deepkd.detection import (
    ARCHIVES,
    CocoDetection,
    DetectionLoader,
    aspect_ratio_batches,
    coco_evaluate,
    coco_paths,
    coco_summary,
    hflip,
    prepare_coco,
    tiny_fasterrcnn,
    write_synthetic_coco,
)
from deepkd.engine.distributed import Dist
from deepkd.errors import DataError, MissingFileError


def _write_jpeg(path, width, height, seed=0):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


@pytest.fixture
def handmade(tmp_path):
    """Three images: a landscape one with a normal, a crowd, a zero-width and an overhanging box; a
    portrait one with only a crowd box; one without annotations. Category ids 5 and 9 (gaps)."""
    images = tmp_path / "images"
    images.mkdir()
    sizes = {1: (100, 50), 2: (40, 80), 3: (60, 60)}
    for image_id, (width, height) in sizes.items():
        _write_jpeg(images / f"{image_id}.jpg", width, height, image_id)
    anns = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 5, 20, 10], "iscrowd": 0, "area": 200},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [0, 0, 50, 50], "iscrowd": 1, "area": 2500},
            {"id": 3, "image_id": 1, "category_id": 9, "bbox": [30, 30, 0, 10], "iscrowd": 0, "area": 0},
            {"id": 4, "image_id": 1, "category_id": 9, "bbox": [90, 40, 20, 20], "iscrowd": 0, "area": 400},
            {"id": 5, "image_id": 2, "category_id": 5, "bbox": [1, 1, 20, 20], "iscrowd": 1, "area": 400}]
    data = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": w, "height": h} for i, (w, h) in sizes.items()],
            "annotations": anns, "categories": [{"id": 5, "name": "five"}, {"id": 9, "name": "nine"}]}
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))
    return images, ann_file


# -- A10 data ------------------------------------------------------------------------------------------
def test_coco_targets_xyxy_crowd_degenerate_and_empty_images(handmade):
    images, ann_file = handmade
    train, evaluation = CocoDetection(images, ann_file, train=True), CocoDetection(images, ann_file, train=False)
    assert train.ids == [1] and evaluation.ids == [1, 2, 3]  # empty images are dropped in training only
    image, target = evaluation[0]
    assert image.dtype == torch.float32 and image.shape == (3, 50, 100)
    assert 0 <= float(image.min()) <= float(image.max()) <= 1
    assert target["boxes"].tolist() == [[10, 5, 30, 15], [90, 40, 100, 50]]  # xywh -> xyxy, clamped
    assert target["labels"].tolist() == [5, 9] and target["labels"].dtype == torch.int64  # category ids
    assert target["image_id"] == 1
    assert evaluation[1][1]["boxes"].shape == (0, 4) and evaluation[2][1]["labels"].shape == (0,)


def test_flip_twice_is_identity_and_flips_are_seeded(handmade, tmp_path):
    images, ann_file = handmade
    image, target = CocoDetection(images, ann_file, train=False)[0]
    mirrored, boxes = hflip(image, target["boxes"])
    assert boxes.tolist() == [[70, 5, 90, 15], [0, 40, 10, 50]] and torch.equal(mirrored[..., 0], image[..., -1])
    back, boxes_back = hflip(mirrored, boxes)
    assert torch.equal(back, image) and torch.equal(boxes_back, target["boxes"])
    ann = write_synthetic_coco(tmp_path / "syn", "train", 12)
    data = CocoDetection(tmp_path / "syn" / "train", ann, train=True, seed=4)
    draws = {(e, i): data.flipped(e, i) for e in (1, 2) for i in range(12)}
    assert draws == {(e, i): CocoDetection(tmp_path / "syn" / "train", ann, train=True, seed=4).flipped(e, i)
                     for e in (1, 2) for i in range(12)}
    assert 0 < sum(draws.values()) < len(draws)
    assert [draws[(1, i)] for i in range(12)] != [draws[(2, i)] for i in range(12)]
    index = next(i for i in range(12) if draws[(1, i)])
    plain, flipped = data[index], data[(1, index)]
    expected = hflip(plain[0], plain[1]["boxes"])
    assert torch.equal(flipped[0], expected[0]) and torch.equal(flipped[1]["boxes"], expected[1])
    still = next(i for i in range(12) if not draws[(1, i)])
    assert torch.equal(data[(1, still)][0], data[still][0])


def test_aspect_ratio_batches_homogeneous_seeded_and_disjoint():
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(50, 150, (41, 2))]
    landscape = sum(w >= h for w, h in sizes)
    batches = aspect_ratio_batches(sizes, 4, seed=1, epoch=3)
    assert len(batches) == landscape // 4 + (41 - landscape) // 4
    assert all(len(b) == 4 and len({sizes[i][0] >= sizes[i][1] for i in b}) == 1 for b in batches)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    assert batches == aspect_ratio_batches(sizes, 4, seed=1, epoch=3)
    assert batches != aspect_ratio_batches(sizes, 4, seed=1, epoch=4)
    assert batches != aspect_ratio_batches(sizes, 4, seed=2, epoch=3)


def test_loader_resumes_at_a_batch_and_shards_ranks(tmp_path):
    ann = write_synthetic_coco(tmp_path, "train", 20)
    data = CocoDetection(tmp_path / "train", ann, train=True, seed=1)
    loader = DetectionLoader(data, 3, train=True, seed=1)
    assert len(loader) == 6
    before = torch.get_rng_state()
    whole = list(loader.iter_epoch(2))
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG belongs to the RoI samplers
    tail = list(loader.iter_epoch(2, start_batch=4))
    assert len(whole) == 6 and len(tail) == 2
    for (images, targets), (images_b, targets_b) in zip(whole[4:], tail):
        assert [t["image_id"] for t in targets] == [t["image_id"] for t in targets_b]
        assert all(torch.equal(a, b) for a, b in zip(images, images_b))
    ranks = [DetectionLoader(data, 3, train=True, seed=1, rank=r, world_size=2).batches(2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}
    evaluation = DetectionLoader(CocoDetection(tmp_path / "train", ann, train=False), 8, train=False)
    assert [len(b) for b in evaluation.batches(0)] == [8, 8, 4]


def test_synthetic_writer_is_deterministic_and_draws_its_labels(tmp_path):
    first = json.loads(write_synthetic_coco(tmp_path / "a", "val", 10, seed=5).read_text())
    again = json.loads(write_synthetic_coco(tmp_path / "b", "val", 10, seed=5).read_text())
    other = json.loads(write_synthetic_coco(tmp_path / "c", "val", 10, seed=6).read_text())
    assert first == again and first["annotations"] != other["annotations"]
    assert set(first) == {"info", "licenses", "images", "annotations", "categories"}
    assert [c["id"] for c in first["categories"]] == [1, 3, 4, 7]
    assert all(1 <= sum(a["image_id"] == i["id"] for a in first["annotations"]) <= 4 for i in first["images"])
    for ann in first["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 10 <= w <= 42 and 10 <= h <= 42 and ann["iscrowd"] == 0 and len(ann["segmentation"][0]) >= 6
        name = next(i["file_name"] for i in first["images"] if i["id"] == ann["image_id"])
        centre = decode(str(tmp_path / "a" / "val" / name))[:, int(y + h / 2), int(x + w / 2)].int()
        red = ann["category_id"] in (1, 4)  # loosely: JPEG bytes vary with Pillow
        assert (centre[0] > centre[2] + 60) if red else (centre[2] > centre[0] + 60)


def test_coco_download_layout_and_offline_errors(tmp_path):
    assert ARCHIVES["train2017"].url == "http://images.cocodataset.org/zips/train2017.zip"
    assert ARCHIVES["annotations"].name == "annotations_trainval2017.zip"
    with pytest.raises(MissingFileError, match=r"annotations_trainval2017\.zip.*images\.cocodataset\.org"):
        prepare_coco(tmp_path, splits=["val2017"])
    folder = tmp_path / "coco"
    folder.mkdir()
    (folder / "annotations_trainval2017.zip").write_bytes(b"partial")
    with pytest.raises(DataError, match="incomplete"):
        prepare_coco(tmp_path, splits=["val2017"])
    image_dir, ann_file = coco_paths(folder, "val2017")
    image_dir.mkdir(parents=True)
    ann_file.parent.mkdir(parents=True)
    ann_file.write_text("{}")
    assert prepare_coco(tmp_path, splits=["val2017"]) == folder  # extracted folders need no archive
    with pytest.raises(DataError, match="unknown COCO split"):
        prepare_coco(tmp_path, splits=["test2017"])
    with pytest.raises(MissingFileError, match="does not exist"):
        CocoDetection(image_dir, folder / "annotations" / "missing.json", train=False)


# -- A9 evaluation --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    return CocoDetection(root / "val", write_synthetic_coco(root, "val", 12, seed=2), train=False)


def test_ground_truth_scores_100_and_no_detections_score_0(val_set):
    coco = val_set.coco
    oracle = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
              for a in coco.dataset["annotations"]]
    summary = coco_summary(coco, oracle, val_set.ids)
    assert summary["AP"] == summary["AP50"] == summary["AP75"] == 100.0
    assert all(isinstance(v, float) for v in summary.values())
    wrong = [dict(r, category_id=1 if r["category_id"] != 1 else 3) for r in oracle]
    assert coco_summary(coco, wrong, val_set.ids)["AP"] < 100.0
    assert coco_summary(coco, [], val_set.ids) == {k: 0.0 for k in summary}
    silent = tiny_fasterrcnn(4, 8, box_score_thresh=1.1)  # scores never exceed 1: no detections
    assert coco_evaluate(silent, DetectionLoader(val_set, 4, train=False), coco)["AP"] == 0.0


class _OracleHeads(nn.Module):
    """RoI heads that return the ground truth of each image, rescaled into the model's resized frame."""

    def __init__(self, dataset, scale: bool = True):
        super().__init__()
        self.queue, self.scale = [dataset[i][1] for i in range(len(dataset))], scale
        self.sizes = [(h, w) for w, h in dataset.image_sizes()]

    def forward(self, features, proposals, image_shapes, targets=None):
        results = []
        for shape in image_shapes:
            target, (height, width) = self.queue.pop(0), self.sizes.pop(0)
            factor = torch.tensor([shape[1] / width, shape[0] / height] * 2) if self.scale else torch.ones(4)
            boxes = target["boxes"] * factor
            results.append({"boxes": boxes, "labels": target["labels"], "scores": torch.ones(len(boxes))})
        return results, {}


@pytest.mark.parametrize("scale", [True, False])
def test_oracle_through_a_resizing_model_scores_100(val_set, scale):
    model = tiny_fasterrcnn(4, 8, min_size=200, max_size=200)  # 128-px images are resized to 200
    model.roi_heads = _OracleHeads(val_set, scale)
    model.train()
    summary = coco_evaluate(model, DetectionLoader(val_set, 5, train=False), val_set.coco)
    assert model.training  # the mode is restored
    if scale:
        assert summary["AP"] == summary["AP50"] == 100.0
    else:  # boxes left in the resized frame: the postprocess round trip is what makes it 100
        assert summary["AP"] < 50.0


def _evaluate_on_rank(rank, port, root, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        data = CocoDetection(root / "val", root / "annotations" / "instances_val.json", train=False)
        loader = DetectionLoader(data, 2, train=False, rank=rank, world_size=2)
        shard = torch.utils.data.Subset(data, [i for batch in loader.batches(0) for i in batch])
        shard.image_sizes = lambda: [data.image_sizes()[i] for i in shard.indices]
        model = tiny_fasterrcnn(4, 8, min_size=200, max_size=200)
        model.roi_heads = _OracleHeads(shard, scale=rank == 0)  # rank 1 leaves its boxes unscaled
        summary = coco_evaluate(model, loader, data.coco, Dist(rank, 2))
        (out / f"rank{rank}.json").write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


def test_evaluation_gathers_every_ranks_detections(tmp_path):
    write_synthetic_coco(tmp_path, "val", 8, seed=2)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_evaluate_on_rank, args=(port, tmp_path, tmp_path), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # rank 0 computed it, every rank got it
    assert 20.0 < ranks[0]["AP50"] < 100.0  # half the images right: rank 1's results were included
