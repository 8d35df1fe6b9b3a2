"""benchmarks/study2.py's bookkeeping: which runs a phase has, which lr it selects, the shared teacher cache."""
import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1] / "benchmarks" / "study2.py"
spec = importlib.util.spec_from_file_location("study2", HERE)
study2 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study2)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study2, "DOCS", tmp_path / "docs")
    return tmp_path


def test_a_confirm_folder_holding_only_the_teacher_cache_has_no_runs(workdir):
    select = workdir / "runs/study2/p/select/.teacher_cache"
    select.mkdir(parents=True)
    (select / "key.pt").write_bytes(b"logits")
    assert study2.groups("p", "confirm") == {}
    study2.share_teacher_cache("p")
    copied = workdir / "runs/study2/p/confirm/.teacher_cache/key.pt"
    assert copied.read_bytes() == b"logits"
    assert study2.groups("p", "confirm") == {}  # the copied cache is not a run
    copied.write_bytes(b"kept")
    study2.share_teacher_cache("p")  # an existing cache is left alone
    assert copied.read_bytes() == b"kept"
    assert not list(copied.parent.glob("*.part"))


def run(top1, seed):
    return {"run_dir": f"x/{seed}", "finished": True, "last_top1": top1}


def test_selection_picks_the_best_mean_and_names_the_edge_it_lies_on():
    found = {f"c__optimizer.lr={lr:g}": [run(top, s) for s, top in enumerate(tops)]
             for lr, tops in {0.05: [80, 81, 82], 0.1: [85, 86, 84], 0.2: [83, 90, 70]}.items()}
    assert study2.selected(found, "c") == (0.1, None)
    found["c__optimizer.lr=0.4"] = [run(95, s) for s in range(3)]
    assert study2.selected(found, "c") == (0.4, "high")
    found["c__optimizer.lr=0.025"] = [run(99, s) for s in range(2)]  # two seeds only: not in the grid
    assert study2.selected(found, "c") == (0.4, "high")
