"""The README's "Distil on your own images" section, run end to end on a generated image tree."""
import json
import re
import shlex
from pathlib import Path

import torch
import yaml

from deepkd.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
SHORT = ["schedule.epochs=2", "schedule.milestones=[1]", "data.batch_size=8", "train.progress=none"]


def _section() -> str:
    text = README.read_text()
    return text[text.index("## Distil on your own images"):text.index("## Use the pieces in your own loop")]


def test_own_images_section_runs_end_to_end(tmp_path, monkeypatch, jpeg_tree, capsys):
    section = _section()
    recipe = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    commands = [line for line in re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines()
                if line.startswith("deepkd ")]
    program = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert [shlex.split(c, comments=True)[1] for c in commands] == ["train", "train", "train", "eval"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEEPKD_DATA", str(tmp_path / "cache"))  # mean: auto caches its statistics here
    jpeg_tree(tmp_path / recipe["data"]["root"], classes=4, per_class=6, size_range=(24, 48))
    (tmp_path / "shapes.yaml").write_text(yaml.safe_dump(recipe))
    for command in commands:
        args = shlex.split(command, comments=True)[1:]
        distils = any(a.startswith("teacher.name=") for a in args)
        extra = [] if args[0] == "eval" else SHORT + (["method.warmup_epochs=1"] if distils else [])
        assert main(args + extra) == 0, command
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((tmp_path / "runs/shapes_deepkd/seed0/summary.json").read_text())
    assert evaluated["top1"] == summary["last_top1"]  # eval of the export equals the run's last epoch
    facts = json.loads((tmp_path / "runs/shapes_deepkd/seed0/data.json").read_text())
    assert facts["classes"] == ["class_0", "class_1", "class_2", "class_3"] and facts["input_size"] == 32
    assert facts["mean"] != [0.485, 0.456, 0.406]  # measured, not the ImageNet default
    namespace = {"image_path": str(next((tmp_path / "data/shapes/val/class_2").iterdir()))}
    exec(compile(program, "README.md", "exec"), namespace)
    assert namespace["model"](namespace["image"][None]).shape == (1, 4)
    assert torch.isfinite(namespace["image"]).all()
