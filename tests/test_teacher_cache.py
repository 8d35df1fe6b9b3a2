"""The teacher-logit cache serves, for each augmented view, the teacher's own logits."""
import pytest
import torch
from conftest import tiny_config, trained_teacher

from deepkd.data import DeviceLoader, synthetic
from deepkd.data.teacher_cache import TeacherLogitCache, view_index
from deepkd.engine.checkpoint import load_checkpoint
from deepkd.models import create_model
from deepkd.train.loop import train


def test_cached_logits_equal_teacher_logits_per_view():
    images, labels = synthetic.generate(24, seed=1)
    loader = DeviceLoader(images, labels, batch_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, train=True, seed=5)
    torch.manual_seed(0)
    teacher = create_model("cnn_w4").eval()
    cache = TeacherLogitCache.build(teacher, loader, batch_size=24, dtype=torch.float32)
    assert cache.num_views == 162 and cache.logits.shape == (24, 162, 100)
    for epoch in (1, 2):
        for index, (batch, _) in enumerate(loader.iter_epoch(epoch)):
            with torch.no_grad():
                expected = teacher(batch)
            torch.testing.assert_close(cache.lookup(*loader.batch_views(epoch, index)), expected,
                                       rtol=1e-5, atol=1e-5)
    assert view_index(torch.tensor([8]), torch.tensor([8]), torch.tensor([True])).item() == 161


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_training_with_the_cache(tmp_path, dtype):
    teacher = trained_teacher(tmp_path)
    common = dict(method={"name": "dkd", "warmup_epochs": 1}, teacher={"name": "cnn_w4", "weights": teacher},
                  schedule={"name": "step", "epochs": 1, "milestones": []})
    train(tiny_config(tmp_path, experiment="plain", **common))
    train(tiny_config(tmp_path, experiment="cached", train={"progress": "none", "tensorboard": "off",
                                                            "teacher_cache": True, "teacher_cache_dtype": dtype},
                      **common))
    assert len(list((tmp_path / "runs" / ".teacher_cache").glob("*.pt"))) == 1
    a = load_checkpoint(tmp_path / "runs" / "plain" / "seed3" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "runs" / "cached" / "seed3" / "last.pt")["model"]
    tolerance = 1e-4 if dtype == "fp32" else 5e-2
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="flock is POSIX")
def test_parallel_runs_build_a_shared_cache_once(tmp_path):
    """A sweep's parallel runs start together: one builds the cache, the others wait and load it."""
    import threading
    import time

    builds = []

    def build():
        builds.append(1)
        time.sleep(0.3)  # a long build: without the lock the other thread finds no file and builds too
        return TeacherLogitCache(torch.arange(6.0).view(1, 2, 3), pad=0)

    path = tmp_path / ".teacher_cache" / "key.pt"
    threads = [threading.Thread(target=TeacherLogitCache.ensure, args=(path, build)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert TeacherLogitCache.load(path).logits.tolist() == [[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]]
    assert sorted(p.name for p in path.parent.iterdir()) == ["key.lock", "key.pt"]
