"""Detection step time: detector only, DKD and DeepKD+DKD (2 and 3 buffers), side by side in one run.

    python benchmarks/detection.py [--json] [--device cpu|cuda] [--size 256] [--images 2] [--repeats 3]
                                   [--precision fp32|bf16] [--threads N]

Pair: ``fasterrcnn_resnet50_fpn`` teacher -> ``fasterrcnn_resnet18_fpn`` student (``create_detector``,
``weights=None``, 91 classes, so BatchNorm in the student and a frozen eval-mode teacher), on seeded
synthetic image tensors (``--images`` per step, ``--size`` x ``--width`` pixels, 1-4 random boxes each).
The transform's ``min_size`` is ``--size`` (no rescaling of the synthetic images beyond torchvision's
own resize at scale 1), ``max_size`` ``max(--width, 1333)``. Every variant is one call of
``deepkd.detection.detection_train_step`` on its own copy of the same initial student:

- detector only: method ``ce``, no teacher, ``torch.optim.SGD`` (momentum 0.9) on torchvision's four
  summed losses (``ce`` replaces ``loss_classifier``, equal to it);
- DKD: ``dkd`` with alpha 1, beta 0.25, T 1, warmup_epochs 0 (the DKD detection recipe), the R50
  teacher's RoI logits on the student's proposals, the same SGD, one backward;
- DeepKD+DKD, 2 buffers: the same terms through ``DecoupledMomentumSGD`` with task 0.9 = target 0.9
  (merged: one gradient pass) and non_target 0.95, weight decay on the task stream;
- DeepKD+DKD, 3 buffers: task 0.9, target 0.825, non_target 0.95 (three gradient passes).

LR ``0.01 x images / 8`` (the DKD solver's LR at batch 8, scaled linearly), weight decay 1e-4. The
four variants run interleaved inside each repetition and see the same images and the same RNG state
(the RPN and RoI samplers draw from the global RNG); medians over ``--repeats`` after ``--warmup``.
On CUDA the script also reports images per second and ``torch.cuda.max_memory_allocated`` per
variant (all four students stay resident; see ``peak_mib`` and ``alone_mib`` in the output).
The CUDA path has not been run yet (written without a GPU).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time

import torch
import torchvision

from deepkd.detection import check_pair, create_detector, detection_train_step, prepare_teacher
from deepkd.losses import build_method
from deepkd.optim import DecoupledMomentumSGD

TEACHER, STUDENT = "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet18_fpn"
NUM_CLASSES = 91
DKD = dict(alpha=1.0, beta=0.25, temperature=1.0, warmup_epochs=0)
WEIGHT_DECAY = 1e-4
VARIANTS = ["detector only", "DKD", "DeepKD+DKD, 2 buffers", "DeepKD+DKD, 3 buffers"]
MOMENTA = {"DeepKD+DKD, 2 buffers": {"task": 0.9, "target": 0.9, "non_target": 0.95},
           "DeepKD+DKD, 3 buffers": {"task": 0.9, "target": 0.825, "non_target": 0.95}}


def synthetic_batch(count, height, width, device, seed):
    """``count`` random images in 0-1 and 1-4 random boxes each (labels 1-90), seeded."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(count):
        images.append(torch.rand(3, height, width, generator=g).to(device))
        n = int(torch.randint(1, 5, (), generator=g))
        wh = torch.rand(n, 2, generator=g) * 0.4 + 0.1  # 10-50 % of the side
        xy = torch.rand(n, 2, generator=g) * (1 - wh)
        scale = torch.tensor([width, height], dtype=torch.float32)
        boxes = torch.cat([xy * scale, (xy + wh) * scale], 1)
        labels = torch.randint(1, NUM_CLASSES, (n,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def build_variants(student, teacher, lr):
    """``{name: (student copy, teacher or None, method, optimizer)}``, every student from one init."""
    runs = {}
    for name in VARIANTS:
        model = copy.deepcopy(student).train()
        params = list(model.parameters())
        if name in MOMENTA:
            optimizer = DecoupledMomentumSGD(params, lr=lr, momentum=dict(MOMENTA[name]), weight_decay=WEIGHT_DECAY,
                                             weight_decay_stream="task")
            method = build_method("deepkd_dkd", **DKD)
        else:
            optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY)
            method = build_method("ce") if name == "detector only" else build_method("dkd", **DKD)
        runs[name] = (model, None if name == "detector only" else teacher, method, optimizer)
    return runs


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def resident_bytes(model, teacher, optimizer):
    """What a variant alone would keep between steps: its student (parameters, buffers, ``.grad``),
    its optimizer state, and the teacher if it uses one."""
    total = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    total += tensor_bytes([p.grad for p in model.parameters() if p.grad is not None])
    total += tensor_bytes([v for state in optimizer.state.values() for v in state.values()])
    if teacher is not None:
        total += tensor_bytes(list(teacher.parameters()) + list(teacher.buffers()))
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=None, help="image height = min_size (default 256 on cpu, "
                        "800 on cuda)")
    parser.add_argument("--width", type=int, default=None, help="image width (default --size on cpu, "
                        "round(4/3 x size) on cuda, the COCO 4:3 shape)")
    parser.add_argument("--images", type=int, default=2, help="images per step")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per variant (default 3 on cpu, 10 on cuda)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on cpu, 3 on cuda)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    size = args.size or (800 if cuda else 256)
    width = args.width or (round(size * 4 / 3) if cuda else size)
    repeats = args.repeats or (10 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lr = 0.01 * args.images / 8

    torch.manual_seed(args.seed)
    options = dict(min_size=size, max_size=max(width, 1333))
    teacher = prepare_teacher(create_detector(TEACHER, NUM_CLASSES, **options).to(device))
    student = create_detector(STUDENT, NUM_CLASSES, **options).to(device)
    check_pair(student, teacher)
    runs = build_variants(student, teacher, lr)
    del student
    images, targets = synthetic_batch(args.images, size, width, device, args.seed)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}, threads {torch.get_num_threads()}, "
          f"{TEACHER} -> {STUDENT} (weights=None), {args.images} images of {size}x{width}, {args.precision}, "
          f"lr {lr:g}, median of {repeats} after {warmup} warm-up", flush=True)

    times = {name: [] for name in runs}
    peaks = {name: 0 for name in runs}
    transient = {name: 0 for name in runs}
    for repeat in range(warmup + repeats):
        for name, (model, teacher_or_none, method, optimizer) in runs.items():
            torch.manual_seed(args.seed * 1000 + repeat)  # same sampler draws for every variant
            if cuda:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            terms = detection_train_step(model, teacher_or_none, method, optimizer, images, targets, epoch=1,
                                         precision=args.precision)
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            loss = float(torch.stack(list(terms.values())).sum())
            if not math.isfinite(loss):
                raise SystemExit(f"{name}: non-finite loss at repetition {repeat} ({terms})")
            if cuda:
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
                transient[name] = max(transient[name], torch.cuda.max_memory_allocated() - before)
            if repeat >= warmup:
                times[name].append(elapsed)
            print(f"  repetition {repeat + 1 - warmup:>2}{' (warm-up)' if repeat < warmup else ''} "
                  f"{name:<22} {elapsed * 1e3:9.1f} ms  loss {loss:.4f}", flush=True)

    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["detector only"]
    ratios = {name: value / base for name, value in medians.items()}
    out = {"teacher": TEACHER, "student": STUDENT, "device": args.device, "torch": torch.__version__,
           "torchvision": torchvision.__version__, "threads": torch.get_num_threads(), "size": [size, width],
           "images": args.images, "precision": args.precision, "repeats": repeats, "warmup": warmup,
           "ms_per_step": {k: v * 1e3 for k, v in medians.items()}, "ratio_to_detector_only": ratios,
           "deepkd2_vs_dkd": medians["DeepKD+DKD, 2 buffers"] / medians["DKD"],
           "deepkd3_vs_dkd": medians["DeepKD+DKD, 3 buffers"] / medians["DKD"],
           "deepkd3_vs_deepkd2": medians["DeepKD+DKD, 3 buffers"] / medians["DeepKD+DKD, 2 buffers"],
           "samples_ms": {k: [v * 1e3 for v in values] for k, values in times.items()}}
    print(f"{'variant':<24}{'ms/step':>10}{'vs detector':>13}")
    for name in runs:
        print(f"{name:<24}{medians[name] * 1e3:10.1f}{ratios[name]:12.2f}x")
    print(f"DeepKD+DKD 2 buffers / DKD: {out['deepkd2_vs_dkd']:.2f}x; 3 buffers / DKD: {out['deepkd3_vs_dkd']:.2f}x; "
          f"3 / 2 buffers: {out['deepkd3_vs_deepkd2']:.2f}x")
    if cuda:
        mib = 2 ** 20
        out["images_per_s"] = {k: args.images / v for k, v in medians.items()}
        out["peak_mib"] = {k: v / mib for k, v in peaks.items()}  # all four students resident
        out["alone_mib"] = {k: (transient[k] + resident_bytes(m, t, o)) / mib for k, (m, t, _, o) in runs.items()}
        print("images/s, peak MiB (max_memory_allocated, all four students resident), estimated MiB alone "
              "(step's peak above the resident memory + own student, .grad, optimizer state, teacher):")
        for name in runs:
            print(f"  {name:<24}{out['images_per_s'][name]:8.2f} img/s {out['peak_mib'][name]:9.0f} MiB "
                  f"{out['alone_mib'][name]:9.0f} MiB alone")
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
