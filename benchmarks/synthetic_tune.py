"""Tune the synthetic set and the demo recipe: teacher, student alone, KD and DKD in a minimal SGD loop.

    python benchmarks/synthetic_tune.py [--teacher cnn_w16 --student cnn_w4 --train 8000 --test 2000
        --noise 1.5 --class-scale 0.6 --teacher-epochs 6 --student-epochs 6 --lr 0.05 --batch-size 64
        --warmup 2 --methods ce,kd,dkd --threads 2 --json]

The loop is deliberately plain (SGD momentum 0.9, weight decay 5e-4, per-step cosine learning rate,
the CIFAR crop/flip augmentation of ``DeviceLoader``) so that the accuracies measure the data, not
trainer features. Losses come from ``deepkd.losses.functional``:

* CE: ``cross_entropy(student, y)``
* KD: ``0.1 * CE + 0.9 * kd(student, teacher, T=4)``
* DKD: ``CE + min(epoch / warmup, 1) * dkd(student, teacher, y, alpha=1, beta=8, T=4)``

A setting is good for the demo when teacher > KD > student alone and DKD > KD, each by more than
2 points, and the whole thing is fast. Prints a table and (``--json``) one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Dict, Optional

import torch

from deepkd.data import DeviceLoader, synthetic
from deepkd.losses import functional as LF
from deepkd.models import create_model


def make_loaders(args) -> tuple[DeviceLoader, DeviceLoader]:
    """Training (augmented) and test loaders over a freshly generated synthetic set."""
    knobs = dict(seed=args.data_seed, noise=args.noise, class_scale=args.class_scale)
    train_images, train_labels = synthetic.generate(args.train, split="train", **knobs)
    test_images, test_labels = synthetic.generate(args.test, split="test", **knobs)
    pixels = train_images.float() / 255.0
    stats = dict(mean=pixels.mean(dim=(0, 2, 3)).tolist(), std=pixels.std(dim=(0, 2, 3)).tolist())
    train = DeviceLoader(train_images, train_labels, batch_size=args.batch_size, train=True, seed=args.seed, **stats)
    test = DeviceLoader(test_images, test_labels, batch_size=500, train=False, **stats)
    return train, test


@torch.no_grad()
def top1(model: torch.nn.Module, loader: DeviceLoader) -> float:
    """Top-1 accuracy in percent over one pass of ``loader``."""
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader.iter_epoch(0))
    return 100.0 * correct / loader.num_samples


def loss_of(method: str, logits, labels, teacher_logits, epoch_progress: float, warmup: int) -> torch.Tensor:
    """The brief's three objectives; ``epoch_progress`` is the fractional epoch (for DKD's warm-up)."""
    ce = LF.cross_entropy(logits, labels)
    if method == "ce":
        return ce
    if method == "kd":
        return 0.1 * ce + 0.9 * LF.kd(logits, teacher_logits, temperature=4.0)
    if method == "dkd":
        ramp = min(epoch_progress / warmup, 1.0) if warmup > 0 else 1.0
        return ce + ramp * LF.dkd(logits, teacher_logits, labels, alpha=1.0, beta=8.0, temperature=4.0)
    raise ValueError(f"unknown method {method!r}: choose ce, kd or dkd")


def fit(model_name: str, method: str, epochs: int, train: DeviceLoader, test: DeviceLoader, args,
        teacher: Optional[torch.nn.Module] = None) -> tuple[torch.nn.Module, float]:
    """Train one model from seed ``args.seed``; returns it and its best per-epoch test top-1."""
    torch.manual_seed(args.seed)
    model = create_model(model_name)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps, best = epochs * len(train), 0.0
    for epoch in range(epochs):
        model.train()
        for index, (images, labels) in enumerate(train.iter_epoch(epoch)):
            step = epoch * len(train) + index
            for group in optimizer.param_groups:  # per-step cosine: smooth decay even for few epochs
                group["lr"] = 0.5 * args.lr * (1.0 + math.cos(math.pi * step / steps))
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(images)
            loss = loss_of(method, model(images), labels, teacher_logits, epoch + index / len(train), args.warmup)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        best = max(best, top1(model, test))
    return model, best


def run(args) -> Dict[str, float]:
    """Teacher first, then the student with each requested method; ``{row: top-1, seconds}``."""
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train, test = make_loaders(args)
    rows: Dict[str, float] = {}
    teacher, rows["teacher"] = fit(args.teacher, "ce", args.teacher_epochs, train, test, args)
    teacher.eval()
    for method in args.methods.split(","):
        label = {"ce": "student alone", "kd": "KD", "dkd": "DKD"}[method]
        _, rows[label] = fit(args.student, method, args.student_epochs, train, test, args,
                             None if method == "ce" else teacher)
        print(f"  {label:<14} {rows[label]:6.2f}%  ({time.perf_counter() - started:6.1f}s so far)", flush=True)
    rows["seconds"] = round(time.perf_counter() - started, 1)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--teacher", default="cnn_w16")
    add("--student", default="cnn_w4")
    add("--train", type=int, default=8000)
    add("--test", type=int, default=2000)
    add("--noise", type=float, default=1.5)
    add("--class-scale", type=float, default=0.6)
    add("--teacher-epochs", type=int, default=6)
    add("--student-epochs", type=int, default=6)
    add("--lr", type=float, default=0.05)
    add("--batch-size", type=int, default=64)
    add("--warmup", type=int, default=2)
    add("--methods", default="ce,kd,dkd")
    add("--seed", type=int, default=0)
    add("--data-seed", type=int, default=0)
    add("--threads", type=int, default=2)
    add("--json", action="store_true")
    args = parser.parse_args(argv)
    print(f"synthetic tune: {vars(args)}", flush=True)
    rows = run(args)
    print(f"  teacher {rows['teacher']:.2f}%, total {rows['seconds']:.0f}s")
    if args.json:
        print(json.dumps({"settings": vars(args), "top1": rows}))


if __name__ == "__main__":
    main()
