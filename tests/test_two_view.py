"""Two-view training (MLKD, CRLD and their DeepKD versions): the loaders' weak and strong views, the
trainer's per-view forwards, exact resume, and what is refused (spec/MLKD_CRLD.md 3)."""
import json

import pytest
import torch
from conftest import tiny_config, trained_teacher

from deepkd.data import FolderOptions, build_data
from deepkd.data import randaugment as ra
from deepkd.data.device_loader import STRONG, STRONG_RA, _generator
from deepkd.engine.checkpoint import load_checkpoint
from deepkd.errors import ConfigError
from deepkd.train.config_errors import validate_config
from deepkd.train.forward import forward_views
from deepkd.train.loop import train

SYNTHETIC = dict(batch_size=16, eval_batch_size=32, seed=5, synthetic_train=40, synthetic_test=16)


def test_device_loader_weak_view_is_the_one_view_batch_and_strong_view_is_reproducible():
    one = build_data("synthetic", **SYNTHETIC)
    two = build_data("synthetic", strong=True, **SYNTHETIC)
    batches = list(two.train.iter_epoch(3))
    assert len(batches) == len(one.train) == 3
    for (single, labels), (views, labels_two) in zip(one.train.iter_epoch(3), batches):
        assert views.shape == (2, *single.shape) and torch.equal(labels, labels_two)
        assert torch.equal(views[0], single)  # the weak view: exactly the one-view loader's batch
        assert not torch.equal(views[1], single)
    again = list(build_data("synthetic", strong=True, **SYNTHETIC).train.iter_epoch(3, start_batch=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, batches[1:]))  # a pure function of (seed, epoch, batch)
    assert not torch.equal(next(two.train.iter_epoch(4))[0][1], batches[0][0][1])
    test_one, test_two = next(one.test.iter_epoch(0)), next(two.test.iter_epoch(0))
    assert torch.equal(test_one[0], test_two[0])  # evaluation stays one view


def test_the_strong_view_is_its_own_crop_and_flip_then_randaugment():
    loader = build_data("synthetic", strong=True, **SYNTHETIC).train
    views, _ = next(loader.iter_epoch(2))
    chosen, dy, dx, flips = loader._batch(2, 0, STRONG)
    weak_draws = loader._batch(2, 0)[1:]
    assert not all(torch.equal(a, b) for a, b in zip((dy, dx, flips), weak_draws))  # independent of the weak crop
    params = ra.draw_params(len(chosen), 32, 32, generator=_generator(5, 2, 0, STRONG_RA))
    expected = ra.apply(loader.augment(loader.images[chosen], dy, dx, flips), params)
    assert torch.equal(views[1], loader.normalize(expected))


def test_device_loader_ranks_split_both_views_of_the_global_batch():
    whole = next(build_data("synthetic", strong=True, **SYNTHETIC).train.iter_epoch(1))[0]
    parts = [next(build_data("synthetic", strong=True, rank=r, world_size=2, **SYNTHETIC).train.iter_epoch(1))[0]
             for r in range(2)]
    assert torch.equal(torch.cat(parts, dim=1), whole)


def test_image_folder_workers_give_two_views(tmp_path, jpeg_tree):
    jpeg_tree(tmp_path)
    options = FolderOptions(image_size=32, in_memory="off")
    a = build_data("imagefolder", root=str(tmp_path), batch_size=4, num_workers=0, folder=options, strong=True)
    b = build_data("imagefolder", root=str(tmp_path), batch_size=6, num_workers=2, folder=options, strong=True)
    one = build_data("imagefolder", root=str(tmp_path), batch_size=4, num_workers=0, folder=options)
    views_a = torch.cat([x for x, _ in a.train.iter_epoch(2)], dim=1)
    views_b = torch.cat([x for x, _ in b.train.iter_epoch(2)], dim=1)
    assert views_a.shape == (2, 12, 3, 32, 32) and torch.equal(views_a, views_b)  # per-sample seeds, any batching
    assert not torch.equal(views_a[0], views_a[1])
    single = torch.cat([x for x, _ in one.train.iter_epoch(2)])
    assert torch.equal(views_a[0], single)  # the weak view is drawn first: the one-view pipeline's pixels


def test_in_memory_random_resized_crops_give_two_views(tmp_path, jpeg_tree):
    jpeg_tree(tmp_path, per_class=3)
    options = FolderOptions(image_size=24, resize=28)
    one = build_data("imagefolder", root=str(tmp_path), batch_size=4, num_workers=0, folder=options)
    two = build_data("imagefolder", root=str(tmp_path), batch_size=4, num_workers=0, folder=options, strong=True)
    (single, labels), (views, labels_two) = next(one.train.iter_epoch(1)), next(two.train.iter_epoch(1))
    assert views.shape == (2, 4, 3, 24, 24) and torch.equal(views[0], single) and torch.equal(labels, labels_two)
    assert not torch.equal(views[0], views[1])


def test_forward_views_separate_and_concat():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(5))
    images = torch.randn(2, 6, 3, 8, 8)
    model(images[0])
    separate = forward_views(model, images, concat=False)
    torch.testing.assert_close(separate[1], model(images[1]))  # per-view batch statistics
    concat = forward_views(model, images, concat=True)
    assert concat.shape == separate.shape == (2, 6, 5) and not torch.allclose(concat, separate)
    model.eval()  # the teacher: eval mode, so one forward of both views gives each view's own logits
    torch.testing.assert_close(forward_views(model, images, concat=True), forward_views(model, images, concat=False))


METHODS = {
    "mlkd": ({"name": "mlkd"}, {"name": "sgd", "lr": 0.05}),
    "crld": ({"name": "crld"}, {"name": "sgd", "lr": 0.05}),
    "deepkd_mlkd": ({"name": "deepkd_mlkd", "warmup_epochs": 1}, {"name": "decoupled", "lr": 0.05}),
    "deepkd_crld": ({"name": "deepkd_crld", "warmup_epochs": 1, "topk": True, "topk_ramp_end": 2},
                    {"name": "decoupled", "lr": 0.05}),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_two_view_methods_train_and_log_their_terms(tmp_path, name):
    method, optimizer = METHODS[name]
    teacher = trained_teacher(tmp_path)
    summary = train(tiny_config(tmp_path, experiment=name, method=method, optimizer=optimizer,
                                teacher={"name": "cnn_w4", "weights": teacher}))
    assert summary["status"] == "finished"
    records = [json.loads(x) for x in (tmp_path / "runs" / name / "seed3" / "metrics.jsonl").read_text().splitlines()]
    terms = {"mlkd": ["ce", "kd", "cc", "bc"], "crld": ["ce", "kd_wv", "kd_cv"]}.get(name, ["ce", "tckd", "nckd"])
    for record in records:
        assert all(torch.isfinite(torch.tensor(record[f"train_loss/{t}"])) for t in terms)
        assert 0 <= record["train_top1"] <= 100  # from the weak view's logits: one count per image


def test_two_view_resume_is_bit_identical(tmp_path):
    teacher = trained_teacher(tmp_path)
    common = dict(method={"name": "deepkd_mlkd", "warmup_epochs": 1}, optimizer={"name": "decoupled", "lr": 0.05},
                  teacher={"name": "cnn_w4", "weights": teacher})
    train(tiny_config(tmp_path, experiment="full", **common))
    assert train(tiny_config(tmp_path, experiment="cut", train__stop_after_steps=7, **common))["status"] == "stopped"
    assert train(tiny_config(tmp_path, experiment="cut", **common), resume=True)["status"] == "finished"
    a = load_checkpoint(tmp_path / "runs" / "full" / "seed3" / "last.pt")
    b = load_checkpoint(tmp_path / "runs" / "cut" / "seed3" / "last.pt")
    assert a["step"] == b["step"] == 10
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_concat_student_views_trains_another_model(tmp_path):
    teacher = trained_teacher(tmp_path)
    runs = {}
    for views in ("separate", "concat"):
        cfg = tiny_config(tmp_path, experiment=views, method={"name": "crld"}, train__student_views=views,
                          teacher={"name": "cnn_w4", "weights": teacher}, train__stop_after_steps=2)
        train(cfg)
        runs[views] = load_checkpoint(tmp_path / "runs" / views / "seed3" / "last.pt")["model"]
    assert any(not torch.equal(runs["separate"][k], runs["concat"][k]) for k in runs["separate"])


@pytest.mark.parametrize("changes, match", [
    ({"train": {"teacher_cache": True}}, "cannot serve method 'mlkd': its strong views are random"),
    ({"train": {"gsnr_every": 5}}, "per-sample gradients, which method 'mlkd' does not have"),
])
def test_what_two_view_methods_refuse(tmp_path, changes, match):
    raw = {"student": {"name": "cnn_w4"}, "teacher": {"name": "cnn_w4"}, "method": {"name": "mlkd"},
           "data": {"dataset": "synthetic"}, **changes}
    with pytest.raises(ConfigError, match=match):
        validate_config(raw)


def test_student_views_is_an_error_for_one_view_methods():
    with pytest.raises(ConfigError, match="train.student_views is only for two-view methods"):
        validate_config({"student": {"name": "cnn_w4"}, "train": {"student_views": "concat"}})
