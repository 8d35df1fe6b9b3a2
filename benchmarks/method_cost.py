"""What each distillation method costs per training step, beside KD, measured side by side in one run.

    python benchmarks/method_cost.py [--json] [--repeats 10] [--batch 64] [--methods kd,dkd,fitnet,...]

One real training step of deepkd (``deepkd.train.forward.forward_pair`` + the method +
``deepkd.engine.step.optimize`` with SGD momentum 0.9) on resnet32x4 -> resnet8x4, CIFAR-sized random
images, for every registered method (logit and feature) with its defaults. The methods take turns
within each repetition so that machine noise hits them alike; the step time is reported as the
median over ``--repeats`` repetitions, divided by KD's median. Memory: the bytes of the tensors the
step keeps for backward (``torch.autograd.graph.saved_tensors_hooks``: what the method adds to the
student's activations) and the method's own parameters (connectors, embeddings). CRD gets random
sample indices into a 50,000-image training set.
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from typing import Dict

import torch

from deepkd.engine.distributed import Dist
from deepkd.engine.step import optimize
from deepkd.losses.base import PROVIDED
from deepkd.losses.registry import list_methods, method_builder
from deepkd.models import create_model
from deepkd.models.features import FeatureExtractor, feature_info
from deepkd.train.forward import forward_pair

TRAIN_SIZE, CLASSES = 50_000, 100


def build(name: str, student, teacher):
    """The method with the trainer's provided arguments, and the step's two input sources."""
    builder = method_builder(name)
    shape = (3, 32, 32)
    provided = {"student_info": feature_info(student, shape), "teacher_info": feature_info(teacher, shape),
                "num_samples": TRAIN_SIZE, "train_labels": torch.arange(TRAIN_SIZE) % CLASSES,
                "student_model": student, "teacher_model": teacher}
    wanted = [k for k in PROVIDED if k in inspect.signature(builder).parameters]
    method = builder(**{k: provided[k] for k in wanted})
    teacher = teacher if method.needs_teacher else None
    if method.features:
        return method, (FeatureExtractor(student), FeatureExtractor(teacher))
    return method, (student, teacher)


def step(method, sources, params, optimizer, images, target, index) -> None:
    student, teacher, _ = forward_pair(*sources, images, teacher_mode=method.teacher_mode)
    extra = {"index": index} if method.needs_index else {}
    optimize(method(student, teacher, target, epoch=30, **extra), optimizer, params, Dist())


def saved_bytes(method, sources, params, optimizer, images, target, index) -> int:
    """Bytes of every tensor autograd keeps for the backward of one step (counted once per storage)."""
    seen: Dict[int, int] = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(method, sources, params, optimizer, images, target, index)
    return sum(seen.values())


def measure(names, batch: int, repeats: int) -> Dict[str, dict]:
    torch.manual_seed(0)
    images, target = torch.randn(batch, 3, 32, 32), torch.randint(0, CLASSES, (batch,))
    index = torch.randint(0, TRAIN_SIZE, (batch,))
    setups = {}
    for name in names:
        student = create_model("resnet8x4", num_classes=CLASSES)
        teacher = create_model("resnet32x4", num_classes=CLASSES).eval()
        method, sources = build(name, student, teacher)
        params = [p for m in (student, method) for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        views = torch.stack([images, images.flip(-1)]) if method.views == 2 else images  # MLKD, CRLD: two views
        setups[name] = (method, sources, params, optimizer, views, target, index)
        step(*setups[name])  # warm-up
    times = {name: [] for name in names}
    for _ in range(repeats):
        for name, setup in setups.items():
            started = time.perf_counter()
            step(*setup)
            times[name].append(time.perf_counter() - started)
    kd = statistics.median(times["kd"])
    return {name: {"ratio_to_kd": statistics.median(times[name]) / kd,
                   "saved_mib": saved_bytes(*setups[name]) / 2**20,
                   "method_params": sum(p.numel() for p in setups[name][0].parameters())} for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=None,
                        help="comma-separated (default: every method but deepkd's base-picking alias)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    names = args.methods.split(",") if args.methods else [n for n in list_methods() if n != "deepkd"]
    names = ["kd", *[n for n in names if n != "kd"]]
    torch.set_num_threads(1)
    results = measure(names, args.batch, args.repeats)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"resnet32x4 -> resnet8x4, batch {args.batch}, 1 thread, {args.repeats} repetitions, "
          f"torch {torch.__version__}")
    print("| method | step time / KD's | saved for backward (MiB) | method's own parameters |")
    print("|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['ratio_to_kd']:.2f} | {row['saved_mib']:.1f} | {row['method_params']:,} |")


if __name__ == "__main__":
    main()
