"""The house-style checker that CI runs (tools/check_style.py) passes on the tree and catches violations."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_style", ROOT / "tools" / "check_style.py")
check_style = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_style)


def test_the_tree_passes():
    assert check_style.main([]) == 0


def test_violations_are_found(tmp_path):
    losses = tmp_path / "src" / "deepkd" / "losses"
    losses.mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}" for i in range(85))
    bad = losses / "bad.py"
    bad.write_text(f"from deepkd.train.loop import train\nfrom ..models import create_model\n\n\ndef long():\n{body}\n")
    failures, _ = check_style.check_file(bad, tmp_path)
    assert any("imports deepkd.train.loop.train" in f for f in failures)
    assert any("imports deepkd.models.create_model" in f for f in failures)  # a relative import, resolved
    assert any("function long has 86 lines" in f for f in failures)
    (losses / "big.py").write_text("x = 1\n" * 601)
    assert any("601 lines" in f for f in check_style.check_file(losses / "big.py", tmp_path)[0])
