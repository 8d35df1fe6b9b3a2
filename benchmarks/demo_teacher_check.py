"""Does ``deepkd demo --train-teacher`` give back the shipped teacher? (README, "What the demo shows")

    python benchmarks/demo_teacher_check.py [--data fashion_mnist|synthetic] [--out DIR]

Trains the demo's teacher exactly as ``--train-teacher`` does (one thread, the recipe the demo builds) and
compares its weights with the shipped file tensor by tensor: prints whether they are bit-identical, the
largest absolute difference and the wall time. About 15 minutes on one core for Fashion-MNIST.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from deepkd.commands.demo import SETTINGS, _train_teacher, teacher_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(SETTINGS), default="fashion_mnist")
    parser.add_argument("--root", default=None, help="Fashion-MNIST's folder (default: the demo's search)")
    parser.add_argument("--out", default="runs/demo_teacher_check")
    args = parser.parse_args()
    setting, out = SETTINGS[args.data], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    trained = load_file(str(_train_teacher(teacher_config(setting, out, args.root))))
    shipped = load_file(str(setting["teacher_weights"]))
    if sorted(trained) != sorted(shipped):
        raise SystemExit(f"different tensors: {sorted(set(trained) ^ set(shipped))}")
    same = all(torch.equal(trained[k], shipped[k]) for k in shipped)
    diff = max((trained[k].double() - shipped[k].double()).abs().max().item() for k in shipped)
    print(f"{args.data}: bit-identical {same}, largest absolute difference {diff:.3g}, "
          f"{time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
