"""Time per training step: deepkd's loop vs a reference-style loop, side by side in one run.

    python benchmarks/step.py [--json] [--repeats 10] [--device cpu|cuda] [--pairs resnet32x4:resnet8x4,...]

The reference-style loop is what produced the published numbers: float32 eager, teacher forward
every step, the sum of losses through ``torch.optim.SGD`` for KD/DKD/DTKD, and for DeepKD three
``backward(retain_graph=True)`` passes whose ``.grad`` tensors are copied, then a Python loop over
parameters updating three momentum buffers. deepkd's step is ``deepkd.train.loop.train_step`` with
the library's methods and ``DecoupledMomentumSGD`` (equal-momentum streams merged).
Both loops see the same batch; the two are interleaved within each repetition so that machine
noise hits both alike. Medians over ``--repeats`` runs after warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from deepkd.engine.distributed import Dist
from deepkd.engine.logs import Progress
from deepkd.losses.registry import build_method
from deepkd.models import create_model
from deepkd.optim import DecoupledMomentumSGD
from deepkd.train.config import validate_config
from deepkd.train.loop import Run, train_step

METHODS = ["kd", "dkd", "dtkd", "deepkd_dkd"]
MOMENTA = {"task": 0.825, "target": 0.825, "non_target": 0.95}


# --- reference-style losses, written literally from METHODS.md (mdistiller arithmetic) ---------
def ref_kd(zs, zt, temperature=4.0):
    log_ps = torch.log_softmax(zs / temperature, dim=1)
    pt = torch.softmax(zt / temperature, dim=1)
    return nn.functional.kl_div(log_ps, pt, reduction="none").sum(1).mean() * temperature ** 2


def ref_tckd_nckd(zs, zt, y, temperature=4.0):
    gt = torch.zeros_like(zs).scatter_(1, y[:, None], 1).bool()
    ps, pt = torch.softmax(zs / temperature, 1), torch.softmax(zt / temperature, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1)
    tckd = nn.functional.kl_div(torch.log(bs), bt, reduction="sum") * temperature ** 2 / zs.shape[0]
    log_qs = torch.log_softmax(zs / temperature - 1000.0 * gt, 1)
    qt = torch.softmax(zt / temperature - 1000.0 * gt, 1)
    nckd = nn.functional.kl_div(log_qs, qt, reduction="sum") * temperature ** 2 / zs.shape[0]
    return tckd, nckd


def ref_dtkd(zs, zt, tau=4.0, alpha=3.0, beta=1.0):
    x, s = zt.max(1, keepdim=True).values, zs.max(1, keepdim=True).values
    t_t, t_s = 2 * x / (x + s) * tau, 2 * s / (x + s) * tau
    kl = nn.functional.kl_div(torch.log_softmax(zs / t_s, 1), torch.softmax(zt / t_t, 1), reduction="none")
    return alpha * (kl.sum(1, keepdim=True) * t_t * t_s).mean() + beta * ref_kd(zs, zt, tau)


def reference_step(method, student, teacher, opt, images, targets, state):
    """One reference-style step (state carries the DeepKD buffers)."""
    logits = student(images)
    with torch.no_grad():
        teacher_logits = teacher(images)
    ce = nn.functional.cross_entropy(logits, targets)
    if method == "kd":
        loss = 0.1 * ce + 0.9 * ref_kd(logits, teacher_logits)
    elif method == "dtkd":
        loss = ce + ref_dtkd(logits, teacher_logits)
    else:
        tckd, nckd = ref_tckd_nckd(logits, teacher_logits, targets)
        if method == "dkd":
            loss = ce + tckd + 8.0 * nckd
        else:
            return _reference_deepkd_update(student, [ce, tckd, 8.0 * nckd], state)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _reference_deepkd_update(student, losses, state, lr=0.05, wd=5e-4):
    params = list(student.parameters())
    grads = []
    for index, loss in enumerate(losses):
        for p in params:
            p.grad = None
        loss.backward(retain_graph=index < len(losses) - 1)
        grads.append([p.grad.clone() for p in params])
    coefficients = [MOMENTA["task"], MOMENTA["target"], MOMENTA["non_target"]]
    with torch.no_grad():
        for i, p in enumerate(params):
            total = 0
            for k in range(3):
                g = grads[k][i] + (wd * p if k == 1 else 0)
                key = (k, i)
                state[key] = g.clone() if key not in state else state[key].mul_(coefficients[k]).add_(g)
                total = total + state[key]
            p.sub_(lr * total)


def deepkd_run(method, student, teacher, device, precision, channels_last):
    optimizer_name = "decoupled" if method.startswith("deepkd") else "sgd"
    cfg = validate_config({"student": {"name": "cnn_w4"}, "method": {"name": method},
                           "optimizer": {"name": optimizer_name},
                           "train": {"precision": precision, "channels_last": channels_last}})
    params = list(student.parameters())
    if optimizer_name == "decoupled":
        optimizer = DecoupledMomentumSGD(params, lr=0.05, momentum=dict(MOMENTA), weight_decay=5e-4,
                                         weight_decay_stream="target")
    else:
        optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    return Run(cfg, Path("."), torch.device(device), Dist(), student, student, teacher, build_method(method),
               optimizer, None, None, params, None, Progress("none"))


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_pair(pair, args):
    """Median seconds per step for every method of one pair, deepkd and reference interleaved."""
    teacher_name, student_name = pair
    torch.manual_seed(0)
    teacher = create_model(teacher_name).to(args.device).eval()
    images = torch.randn(args.batch_size, 3, 32, 32, device=args.device)
    targets = torch.randint(0, 100, (args.batch_size,), device=args.device)
    results = {}
    for method in METHODS:
        students = {loop: create_model(student_name).to(args.device) for loop in ("deepkd", "reference")}
        run = deepkd_run(method, students["deepkd"], teacher, args.device, "fp32", False)
        ref_opt = torch.optim.SGD(students["reference"].parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        ref_state = {}
        # default arguments bind this iteration's objects (the lambdas run within it anyway)
        steps = {"deepkd": lambda run=run: train_step(run, images, targets, epoch=20),
                 "reference": lambda method=method, student=students["reference"], opt=ref_opt, state=ref_state:
                 reference_step(method, student, teacher, opt, images, targets, state)}
        times = {loop: [] for loop in steps}
        for repeat in range(args.warmup + args.repeats):
            for loop, step in steps.items():
                _sync(args.device)
                started = time.perf_counter()
                step()
                _sync(args.device)
                if repeat >= args.warmup:
                    times[loop].append(time.perf_counter() - started)
        for loop, values in times.items():
            results[f"{teacher_name}->{student_name}/{method}/{loop}"] = statistics.median(values)
        prefix = f"{teacher_name}->{student_name}/{method}"
        print(f"{teacher_name}->{student_name} {method:<11} deepkd {results[f'{prefix}/deepkd'] * 1e3:8.1f} ms"
              f"   reference {results[f'{prefix}/reference'] * 1e3:8.1f} ms", flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", default="resnet32x4:resnet8x4,wrn_40_2:wrn_16_2")
    parser.add_argument("--plot", default="benchmarks/step.png")
    args = parser.parse_args(argv)
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, median of {args.repeats}", flush=True)
    results = {}
    for pair in pairs:
        results.update(time_pair(pair, args))
    out = {"seconds_per_step": results, "device": args.device, "torch": torch.__version__}
    key = "resnet32x4->resnet8x4/{}/{}"
    if key.format("dkd", "deepkd") in results:
        out["deepkd_vs_reference"] = (results[key.format("deepkd_dkd", "deepkd")]
                                      / results[key.format("deepkd_dkd", "reference")])
        out["deepkd_vs_dkd"] = results[key.format("deepkd_dkd", "deepkd")] / results[key.format("dkd", "deepkd")]
        print(f"DeepKD+DKD step: {out['deepkd_vs_reference']:.3f}x the reference-style DeepKD step, "
              f"{out['deepkd_vs_dkd']:.3f}x deepkd's own DKD step")
    if args.plot:
        plot(results, args.plot, f"time per step, batch {args.batch_size}, {args.device}")
    if args.json:
        print(json.dumps(out))
    return out


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({k.rsplit("/", 1)[0] for k in results})
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.4
    for offset, loop in ((-width / 2, "reference"), (width / 2, "deepkd")):
        ax.bar([i + offset for i in range(len(labels))], [results[f"{label}/{loop}"] * 1e3 for label in labels],
               width, label=loop)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("ms per step (median)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
