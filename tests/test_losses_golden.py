"""Golden values: every loss function and every registered method on fixed seeded tensors.

The expected numbers live in tests/golden/losses.json. A case without an entry FAILS. To write the
file (after an intended change of numbers, or for a newly registered method) run
``DEEPKD_REGEN_GOLDEN=1 python -m pytest tests/test_losses_golden.py``; nothing else writes it.
"""
import json
import os
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch

from deepkd.losses import build_method, list_methods
from deepkd.losses import functional as F
from deepkd.losses.registry import METHODS

GOLDEN = Path(__file__).parent / "golden" / "losses.json"
REGENERATE = os.environ.get("DEEPKD_REGEN_GOLDEN") == "1"


def fixed_inputs():
    generator = torch.Generator().manual_seed(2024)
    student = torch.randn(6, 12, generator=generator, dtype=torch.float64) * 2 + 1
    teacher = torch.randn(6, 12, generator=generator, dtype=torch.float64) * 3 + 2
    target = torch.randint(0, 12, (6,), generator=generator)
    return student, teacher, target


def fixed_two_view_inputs():
    """``[2, 6, 12]`` (weak, strong) logits for the two-view methods (MLKD, CRLD)."""
    generator = torch.Generator().manual_seed(2025)
    student = torch.randn(2, 6, 12, generator=generator, dtype=torch.float64) * 2 + 1
    teacher = torch.randn(2, 6, 12, generator=generator, dtype=torch.float64) * 3 + 2
    return student, teacher, torch.randint(0, 12, (6,), generator=generator)


def function_cases() -> Dict[str, Callable[[], float]]:
    s, t, y = fixed_inputs()
    keep = F.topk_keep_mask(t, y, 4)
    keep_reference = F.topk_keep_mask(t, y, 4, count_target=True)
    return {
        "cross_entropy": lambda: F.cross_entropy(s, y),
        "kd_T4": lambda: F.kd(s, t, temperature=4.0),
        "kd_T1": lambda: F.kd(s, t, temperature=1.0),
        "tckd_T4": lambda: F.tckd(s, t, y),
        "nckd_T4": lambda: F.nckd(s, t, y),
        "nckd_top4": lambda: F.nckd(s, t, y, keep=keep),
        "nckd_top4_count_target": lambda: F.nckd(s, t, y, keep=keep_reference),
        "dkd_1_8_T4": lambda: F.dkd(s, t, y),
        "dtkd_3_1_T4": lambda: F.dtkd(s, t),
        "dtkd_guard": lambda: F.dtkd(s, -t, guard=True),
        "dynamic_tckd": lambda: F.dynamic_decoupled(s, t, y).tckd,
        "dynamic_nckd": lambda: F.dynamic_decoupled(s, t, y).nckd,
        "weighted_nckd": lambda: F.decoupled(s, t, y).weighted_nckd,
    }


def method_cases() -> Dict[str, Callable[[], float]]:
    cases = {}
    for name in list_methods():
        if getattr(METHODS.get(name), "features", False):
            continue  # the feature methods' numbers: their own parity tests
        for epoch in (1, 30):
            def case(name=name, epoch=epoch):
                method = build_method(name)
                s, t, y = fixed_two_view_inputs() if method.views == 2 else fixed_inputs()
                terms = method(s, t if method.needs_teacher else None, y, epoch=epoch)
                return {key: [term.value.item(), term.stream] for key, term in sorted(terms.items())}
            cases[f"method:{name}:epoch{epoch}"] = case
    return cases


CASES = {**function_cases(), **method_cases()}


def compute(name):
    value = CASES[name]()
    return value.item() if isinstance(value, torch.Tensor) else value


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing; create it with DEEPKD_REGEN_GOLDEN=1")
    return json.loads(GOLDEN.read_text())


@pytest.mark.skipif(not REGENERATE, reason="set DEEPKD_REGEN_GOLDEN=1 to rewrite the golden file")
def test_regenerate_golden():
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    values = {name: compute(name) for name in sorted(CASES)}
    GOLDEN.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name, golden):
    if name not in golden:
        pytest.fail(f"no golden value for {name!r}; regenerate with DEEPKD_REGEN_GOLDEN=1 after checking it")
    value, expected = compute(name), golden[name]
    if isinstance(expected, dict):
        assert value.keys() == expected.keys()
        for key, (number, stream) in expected.items():
            assert value[key][1] == stream
            assert value[key][0] == pytest.approx(number, rel=1e-9, abs=1e-12)
    else:
        assert value == pytest.approx(expected, rel=1e-9, abs=1e-12)
