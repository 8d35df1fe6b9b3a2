"""What a model costs: multiply-accumulates and activation memory of one image, and CPU latency.

MACs: torch's ``FlopCounterMode`` counts convolutions, linear layers and matrix products (attention
included) at 2 FLOPs per MAC; normalisation, activations, pooling and additions are not counted (the
convention of published MAC/FLOP tables). Latency: the median wall time of ``repeats`` forward passes
in ``torch.inference_mode`` after ``warmup`` passes, on random inputs; the caller states the threads.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch import nn


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on one image (FlopCounterMode's FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *input_shape))
    return counter.get_total_flops() // 2


def latency_ms(model: nn.Module, input_shape: Sequence[int], batch: int, *, repeats: int = 10,
               warmup: int = 3) -> float:
    """Median milliseconds of ``repeats`` forward passes of a ``batch`` after ``warmup`` unmeasured ones."""
    return latencies_in_turns({"model": model}, input_shape, batch, repeats=repeats, warmup=warmup)["model"]


def latencies_in_turns(forwards: Dict[str, Callable[[torch.Tensor], Any]], input_shape: Sequence[int], batch: int,
                       *, repeats: int = 10, warmup: int = 3) -> Dict[str, float]:
    """Median milliseconds of each of ``forwards`` on one random ``batch``, timed in turns (a, b, a, b,
    ...) so that other load on the machine slows them alike; ``warmup`` rounds are not measured."""
    images = torch.randn(batch, *input_shape)
    times: Dict[str, List[float]] = {name: [] for name in forwards}
    with torch.inference_mode():
        for index in range(warmup + repeats):
            for name, forward in forwards.items():
                start = time.perf_counter()
                forward(images)
                if index >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(values) for name, values in times.items()}


def activation_bytes(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Bytes of every leaf module's output on one float32 image: the activations a training step keeps
    for its backward pass (functional operations outside modules are not seen; an in-place module's
    output, which reuses its input's memory, is not counted twice)."""
    total = 0

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal total
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        reused = {t.data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        total += sum(t.numel() * t.element_size() for t in outputs
                     if isinstance(t, torch.Tensor) and t.data_ptr() not in reused)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return total


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    import platform

    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"
