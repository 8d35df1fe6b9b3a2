"""Model cards: every finished run folder in the Hugging Face layout (README.md with a YAML header,
config.json, model.safetensors), each figure naming its source; ``deepkd summary --cards`` for seeds."""
import json
import statistics

import pytest
import yaml
from conftest import tiny_config
from huggingface_hub import ModelCard

from deepkd.cli import main
from deepkd.models import count_parameters, create_model, load_weights
from deepkd.models.cost import count_macs
from deepkd.train.card import code_of


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two seeds of the tiny synthetic run (2 epochs each)."""
    from deepkd.train.loop import train

    tmp = tmp_path_factory.mktemp("cards")
    return [train(tiny_config(tmp, seed=seed))["run_dir"] for seed in (0, 1)]


def split_card(text):
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def table(body):
    """The card's table rows: ``{name: (value, source)}``."""
    rows = [line.strip("|").split(" | ") for line in body.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): (cells[1].strip(), cells[2].strip()) for cells in rows[1:]}


def test_a_finished_run_is_a_hugging_face_model_folder(runs):
    from pathlib import Path

    run = Path(runs[0])
    summary = json.loads((run / "summary.json").read_text())
    header, body = split_card((run / "README.md").read_text())
    assert header["library_name"] == "deepkd" and header["datasets"] == ["synthetic"]
    card = ModelCard.load(run / "README.md")  # huggingface_hub's own parser of the model-index
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {"top-1 (last epoch)": round(summary["last_top1"], 2),
                       "top-1 (best epoch)": round(summary["best_top1"], 2)}
    assert (run / "model.safetensors").read_bytes() == (run / "student.safetensors").read_bytes()
    hub = json.loads((run / "config.json").read_text())
    assert hub["architecture"] == "cnn_w4" and len(hub["id2label"]) == hub["num_classes"] == 100
    model = create_model(hub["architecture"], num_classes=hub["num_classes"])
    load_weights(model, run / "model.safetensors")
    rows = table(body)
    assert all(source for _, source in rows.values())  # every figure names where it comes from
    assert rows["parameters"][0] == f"{count_parameters(model):,}"
    assert rows["MACs, one image"][0] == f"{count_macs(model.eval(), (3, 32, 32)):,}"
    assert rows["test top-1, last epoch"] == (f"{summary['last_top1']:.2f}", "summary.json `last_top1`")
    assert "CPU latency, batch 32" in rows and "1 torch thread" in rows["CPU latency, batch 32"][1]
    assert f"commit {code_of(run / 'config.yaml')['commit']}" in body and "deepkd train config.yaml" in body


def test_summary_cards_give_mean_and_std_over_the_seeds(runs, capsys):
    from pathlib import Path

    group = Path(runs[0]).parent
    (Path(runs[1]) / "README.md").unlink()  # a run finished before deepkd wrote cards gets one
    assert main(["summary", str(group), "--cards"]) == 0
    err = capsys.readouterr().err
    assert f"wrote {group / 'README.md'}" in err and f"wrote {Path(runs[1]) / 'README.md'}" in err
    assert (Path(runs[1]) / "README.md").is_file() and f"wrote {Path(runs[0]) / 'README.md'}" not in err
    header, body = split_card((group / "README.md").read_text())
    last = [json.loads((Path(r) / "summary.json").read_text())["last_top1"] for r in runs]
    value, source = table(body)["test top-1, last epoch"]
    assert value == f"{statistics.fmean(last):.2f} +- {statistics.stdev(last):.2f} (n=2)"
    assert source == "each seed's summary.json `last_top1`, seeds 0, 1"
    assert header["model-index"][0]["name"] == "tiny"
    assert "deepkd predict seed0 image.png" in body


def test_code_of_reads_the_config_header(tmp_path):
    (tmp_path / "config.yaml").write_text("# version: 9.9.1\n# commit: abc123\n# dirty: true\nexperiment: x\n")
    assert code_of(tmp_path / "config.yaml") == {"version": "9.9.1", "commit": "abc123", "dirty": True}
    (tmp_path / "config.yaml").write_text("experiment: x\n")
    assert code_of(tmp_path / "config.yaml") == {"version": "unknown", "commit": "unknown", "dirty": "unknown"}
