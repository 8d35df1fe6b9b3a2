"""``deepkd plot`` as a reader meets it: several runs of a sweep compared in their common parent, one colour
per configuration in every panel, seeds as a band, a panel only for what was recorded."""
import json

import pytest

from deepkd.commands import plots


def fake_run(root, configuration, seed, topk=False, offset=0.0):
    run = root / configuration / f"seed{seed}"
    run.mkdir(parents=True)
    records = [{"epoch": e, "test_top1": 50 + e + offset + seed, "train_loss": 2.0 / e, "test_loss": 2.5 / e,
                "lr": 0.1 / e, **({"topk": 5 * e} if topk else {})} for e in range(1, 5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


@pytest.fixture
def sweep(tmp_path):
    out = tmp_path / "sweep"
    return out, [fake_run(out, name, seed, offset=i) for i, name in enumerate(("dkd", "kd")) for seed in (0, 1)]


def test_a_comparison_lands_in_the_common_parent_and_one_run_in_its_folder(sweep, tmp_path):
    out, runs = sweep
    written = plots.plot_runs([str(r) for r in runs])
    assert written == [out.resolve() / "curves.png"] and written[0].stat().st_size > 10_000
    assert not (runs[0] / "curves.png").exists()
    assert plots.plot_runs([runs[0]]) == [runs[0] / "curves.png"]


def test_panels_only_for_what_was_recorded_and_losses_apart(sweep, tmp_path):
    out, runs = sweep
    data = {r: plots.read_jsonl(r / "metrics.jsonl") for r in runs}
    assert [key for key, _, _ in plots.panels(data)] == ["test_top1", "train_loss", "test_loss", "lr"]
    masked = fake_run(tmp_path / "other", "deepkd_dkd_topk", 0, topk=True)
    data[masked] = plots.read_jsonl(masked / "metrics.jsonl")
    assert "topk" in [key for key, _, _ in plots.panels(data)]


def test_one_colour_per_configuration_in_every_panel_seeds_as_a_band(sweep, monkeypatch):
    out, runs = sweep
    drawn = []
    real = plots._band

    def record(ax, members, data, key, x, colour, label):
        drawn.append((key, label, colour, len(members)))
        return real(ax, members, data, key, x, colour, label)

    monkeypatch.setattr(plots, "_band", record)
    plots.plot_runs(runs)
    by_configuration = {}
    for _, label, colour, members in drawn:
        by_configuration.setdefault(label, set()).add(colour)
        assert members == 2  # both seeds in one band
    assert by_configuration == {"dkd": {"C0"}, "kd": {"C1"}}
    assert len(drawn) == 2 * 4  # two configurations x four recorded panels
