"""Per-stream gradients: one call of ``stream_grads`` vs separate backward passes vs one summed backward.

    python benchmarks/stream_grads.py [--model resnet8x4] [--batch-size 64] [--repeats 15] [--json]

Every timing includes the student forward (the graph is rebuilt each repetition); the teacher's
logits are fixed inputs. The variants run interleaved inside each repetition; medians reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from deepkd.losses import functional as F
from deepkd.models import create_model, list_models
from deepkd.optim import DecoupledMomentumSGD, stream_grads

MOMENTA = {"task": 0.825, "target": 0.825, "non_target": 0.95}


def losses_of(model, images, teacher_logits, targets):
    logits = model(images)
    return {"task": nn.functional.cross_entropy(logits, targets),
            "target": F.tckd(logits, teacher_logits, targets, temperature=4.0, validate=False),
            "non_target": 8.0 * F.nckd(logits, teacher_logits, targets, temperature=4.0, validate=False)}


def variants(model, images, teacher_logits, targets):
    params = list(model.parameters())
    merged_opt = DecoupledMomentumSGD(params, lr=1e-9, momentum=dict(MOMENTA), weight_decay=5e-4)
    three_opt = DecoupledMomentumSGD(params, lr=1e-9, momentum=dict(MOMENTA), weight_decay=5e-4, merge_equal=False)

    def batched():
        stream_grads(losses_of(model, images, teacher_logits, targets), params, batched=True)

    def separate():
        stream_grads(losses_of(model, images, teacher_logits, targets), params, batched=False)

    def summed():
        model.zero_grad(set_to_none=True)
        sum(losses_of(model, images, teacher_logits, targets).values()).backward()

    def merged_step():
        losses = merged_opt.merge_losses(losses_of(model, images, teacher_logits, targets))
        merged_opt.step(stream_grads(losses, params))

    def three_pass_step():
        three_opt.step(stream_grads(losses_of(model, images, teacher_logits, targets), params))

    return {"stream_grads batched (3 streams)": batched, "three separate passes": separate,
            "one summed backward": summed, "DeepKD step, merged (2 passes)": merged_step,
            "DeepKD step, unmerged (3 passes)": three_pass_step}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet8x4" if "resnet8x4" in list_models() else "cnn_w16")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = create_model(args.model).train()
    images = torch.randn(args.batch_size, 3, 32, 32)
    targets = torch.randint(0, 100, (args.batch_size,))
    teacher_logits = torch.randn(args.batch_size, 100) * 3
    runs = variants(model, images, teacher_logits, targets)
    times = {name: [] for name in runs}
    for repeat in range(args.repeats + 2):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            if repeat >= 2:
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["one summed backward"]
    print(f"model {args.model}, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for name, value in medians.items():
        print(f"  {name:<36} {value * 1e3:8.1f} ms   {value / base:5.2f}x summed backward")
    ratio = medians["DeepKD step, merged (2 passes)"] / medians["DeepKD step, unmerged (3 passes)"]
    print(f"  merged / unmerged DeepKD step: {ratio:.3f}")
    if args.json:
        print(json.dumps({"model": args.model, "seconds": medians, "merged_vs_unmerged": ratio}))


if __name__ == "__main__":
    main()
