"""The README's example is code that runs."""
import pathlib
import re

import torch


def test_readme_example_runs():
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "stream_grads" in b)
    assert "F.dkd" in block and "DecoupledMomentumSGD" in block and "stream_grads" in block
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["logits"]).all()
