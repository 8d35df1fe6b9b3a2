"""Loss forward+backward time: deepkd.losses.functional vs the reference-code arithmetic.

    python benchmarks/losses.py [--repeats 200] [--json]

For each shape (CIFAR-100 batch [64, 100], ImageNet per-GPU batch [64, 1000], a token batch
[8, 512, 1000]) it times, interleaved within each repetition so machine noise hits all alike:
the reference DKD / DTKD formulas (mdistiller arithmetic: sums of probabilities, "- 1000" target
removal, kl_div), deepkd's ``F.dkd`` / ``F.dtkd`` with ``validate=True`` (one host sync for the
target-range check) and with ``validate=False``. Medians in microseconds and ratios to the reference.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as torch_functional

from deepkd.losses import functional as F


def reference_dkd(student, teacher, target, alpha=1.0, beta=8.0, temperature=4.0):
    gt = torch.zeros_like(student).scatter_(1, target.unsqueeze(1), 1.0)
    other = 1.0 - gt
    p_student = torch.softmax(student / temperature, dim=1)
    p_teacher = torch.softmax(teacher / temperature, dim=1)
    b_student = torch.cat([(p_student * gt).sum(1, keepdim=True), (p_student * other).sum(1, keepdim=True)], 1)
    b_teacher = torch.cat([(p_teacher * gt).sum(1, keepdim=True), (p_teacher * other).sum(1, keepdim=True)], 1)
    tckd = torch_functional.kl_div(torch.log(b_student), b_teacher, reduction="sum")
    q_teacher = torch.softmax(teacher / temperature - 1000.0 * gt, dim=1)
    log_q_student = torch.log_softmax(student / temperature - 1000.0 * gt, dim=1)
    nckd = torch_functional.kl_div(log_q_student, q_teacher, reduction="sum")
    return (alpha * tckd + beta * nckd) * temperature ** 2 / target.shape[0]


def reference_dtkd(student, teacher, tau=4.0, alpha=3.0, beta=1.0):
    student_max = student.max(1, keepdim=True)[0]
    teacher_max = teacher.max(1, keepdim=True)[0]
    student_temperature = 2 * student_max / (teacher_max + student_max) * tau
    teacher_temperature = 2 * teacher_max / (teacher_max + student_max) * tau
    kl = torch_functional.kl_div(torch.log_softmax(student / student_temperature, 1),
                                 torch.softmax(teacher / teacher_temperature, 1), reduction="none")
    dynamic = (kl.sum(1, keepdim=True) * teacher_temperature * student_temperature).mean()
    fixed = torch_functional.kl_div(torch.log_softmax(student / tau, 1), torch.softmax(teacher / tau, 1),
                                    reduction="batchmean") * tau ** 2
    return alpha * dynamic + beta * fixed


def candidates(shape):
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(*shape, generator=generator) * 2 + 1).requires_grad_(True)
    teacher = torch.randn(*shape, generator=generator) * 3 + 2
    target = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    flat_s, flat_t, flat_y = student.reshape(-1, shape[-1]), teacher.reshape(-1, shape[-1]), target.reshape(-1)
    return student, {
        "reference dkd": lambda: reference_dkd(flat_s, flat_t, flat_y),
        "deepkd dkd (validate)": lambda: F.dkd(student, teacher, target),
        "deepkd dkd (no validate)": lambda: F.dkd(student, teacher, target, validate=False),
        "reference dtkd": lambda: reference_dtkd(flat_s, flat_t),
        "deepkd dtkd (validate)": lambda: F.dtkd(student, teacher),
        "deepkd dtkd (no validate)": lambda: F.dtkd(student, teacher, validate=False),
    }


def time_shape(shape, repeats):
    student, calls = candidates(shape)
    samples = {name: [] for name in calls}
    for repeat in range(repeats + 10):  # the first 10 are warm-up
        for name, call in calls.items():
            start = time.perf_counter()
            call().backward()
            elapsed = time.perf_counter() - start
            student.grad = None
            if repeat >= 10:
                samples[name].append(elapsed * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {}
    for shape in ((64, 100), (64, 1000), (8, 512, 1000)):
        repeats = args.repeats if len(shape) == 2 else max(5, args.repeats // 20)
        results[str(list(shape))] = time_shape(shape, repeats)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for shape, timings in results.items():
        print(f"logits {shape}")
        for name, micros in timings.items():
            base = timings["reference " + name.split()[1]]
            print(f"  {name:28s} {micros:10.1f} us   x{micros / base:.2f} of reference")


if __name__ == "__main__":
    main()
