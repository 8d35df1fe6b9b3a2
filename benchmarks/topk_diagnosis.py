"""The top-k curriculum diagnosed (STUDY.md, issue 18 section 3): what happens in the first epochs.

    python benchmarks/topk_diagnosis.py ON OFF --lr 0.1 0.025 --epochs 6 [--set key=value ...] [--out FILE]

For each learning rate, trains two recipes from the same seed, ON (top-k mask on, its ramp) and OFF
(the same configuration without the mask, e.g. the study's ``deepkd_dkd_topk`` and
``deepkd_dkd_ref``), for ``--epochs`` epochs with deepkd's own
pieces (config, data, models, method, optimizer with one buffer per stream, schedule) and logs every
``--every`` steps: K, each stream's loss, gradient norm and momentum-buffer norm, the norm of the step
``lr * sum of buffers``, and the test top-1 after each epoch; at the start and after each epoch, the GSNR
(:func:`deepkd.optim.gsnr`, 128 samples of a fixed batch) of the non-target stream at the current weights
with the mask at its start (K = 5% of the classes) and without it. Writes one JSON (and a figure next to
it). A diagnostic, not a trainer: no checkpoints, no resume.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List

import torch

from deepkd.optim import gsnr, stream_grads
from deepkd.train import build
from deepkd.train.config import load_config
from deepkd.train.loop import evaluate

STREAMS = ("task", "target", "non_target")


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors if t is not None))


def _setup(recipe: str, overrides: List[str]):
    cfg = load_config(recipe, overrides)
    torch.manual_seed(cfg.seed)
    data = build.build_dataset(cfg, device=torch.device("cpu"), rank=0, world_size=1)
    method = build.build_method(cfg.method)
    student = build.build_student(cfg.student, data.num_classes)
    teacher = build.build_teacher(cfg.teacher, cfg.method.name, data.num_classes, cfg.data.dataset)
    optimizer = build.build_optimizer(cfg.optimizer, student)
    return cfg, data, method, student, teacher, optimizer


def _record(step, epoch, k, terms, grads, optimizer, lr) -> Dict:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    row = {"step": step, "epoch": epoch, "k": k, "lr": lr}
    buffers = {}
    for key in optimizer.merged_streams():
        buffers[key] = [optimizer.state[p].get(f"momentum_buffer:{key}") for p in params]
    for stream in STREAMS:
        row[f"loss/{stream}"] = float(sum(t.value.detach() for t in terms.values() if t.stream == stream))
        row[f"grad/{stream}"] = _norm(grads[stream]) if stream in grads else 0.0
        row[f"buffer/{stream}"] = _norm(buffers.get(stream, []))
    total = [sum(b[i] for b in buffers.values() if b[i] is not None) for i in range(len(params))]
    row["step_norm"] = lr * _norm(total)
    return row


def nckd_gsnr(student, teacher, images, targets, method_cfg) -> Dict[str, float]:
    """GSNR of the non-target stream (``beta`` NCKD at the method's temperature) with the mask at its
    start (the K = 5% teacher-ranked non-target classes, computed outside the per-sample vmap) and
    without a mask."""
    from deepkd.losses import functional as F

    arguments = method_cfg.arguments()
    temperature, beta = arguments.get("temperature", 4.0), arguments.get("beta", 8.0)
    with torch.no_grad():
        teacher_logits = teacher(images)
    k = max(1, round(0.05 * teacher_logits.shape[-1]))
    masks = {"masked": F.topk_keep_mask(teacher_logits, targets, k),
             "full": torch.ones_like(teacher_logits, dtype=torch.bool)}
    out = {}
    for name, keep in masks.items():
        def per_sample(logits, target, t, kept):
            terms = F.decoupled(logits, t, target, temperature=temperature, keep=kept, validate=False)
            return {"non_target": beta * terms.nckd}

        out[name] = gsnr(student, per_sample, images, targets, extra=(teacher_logits, keep))["non_target"]["overall"]
    return out


def diagnose(recipe: str, lr: float, epochs: int, every: int, overrides: List[str]) -> Dict:
    """One short run; returns its per-step rows and per-epoch test top-1."""
    sets = [*overrides, f"optimizer.lr={lr}", "optimizer.merge_equal=false"]
    cfg, data, method, student, teacher, optimizer = _setup(recipe, sets)
    topk = method.dtm.enabled
    lr_at = build.build_schedule(cfg.schedule, cfg.optimizer.lr)
    params, rows, tests, step = [p for g in optimizer.param_groups for p in g["params"]], [], [], 0
    batches = len(data.train)
    probe = next(iter(data.train.iter_epoch(0)))
    probe = (torch.cat([probe[0], next(data.train.iter_epoch(0, start_batch=1))[0]])[:128],
             torch.cat([probe[1], next(data.train.iter_epoch(0, start_batch=1))[1]])[:128])
    tests.append({"epoch": 0, "gsnr": nckd_gsnr(student, teacher, *probe, cfg.method)})
    for epoch in range(1, epochs + 1):
        for index, (images, targets) in enumerate(data.train.iter_epoch(epoch)):
            current = lr_at(epoch, index / batches)
            for group in optimizer.param_groups:
                group["lr"] = current
            with torch.no_grad():
                teacher_logits = teacher(images)
            terms = method(student(images), teacher_logits, targets, epoch=epoch)
            losses = {s: sum(t.value for t in terms.values() if t.stream == s) for s in STREAMS}
            grads = stream_grads({s: v for s, v in losses.items() if torch.is_tensor(v)}, params)
            optimizer.step(grads)
            if step % every == 0:
                rows.append(_record(step, epoch, method.dtm.k(epoch), terms, grads, optimizer, current))
            step += 1
        tests.append({"epoch": epoch, "top1": evaluate(student, data.test, torch.device("cpu"))["top1"],
                      "gsnr": nckd_gsnr(student, teacher, *probe, cfg.method)})
        print(f"lr {lr} topk {topk} epoch {epoch}: K {method.dtm.k(epoch)} test top-1 {tests[-1]['top1']:.2f} "
              f"non-target GSNR {tests[-1]['gsnr']}", flush=True)
    return {"lr": lr, "topk": topk, "rows": rows, "test": tests}


def figure(runs: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["grad/task", "grad/target", "grad/non_target", "step_norm", "k"]
    fig, axes = plt.subplots(len({r["lr"] for r in runs}), len(keys) + 1, figsize=(4 * (len(keys) + 1), 6.5),
                             squeeze=False)
    for row, lr in enumerate(sorted({r["lr"] for r in runs}, reverse=True)):
        for run in [r for r in runs if r["lr"] == lr]:
            on = "on" if run["topk"] else "off"
            style = dict(color="tab:red" if run["topk"] else "tab:blue", label=f"top-k {on}")
            steps = [x["step"] for x in run["rows"]]
            for col, key in enumerate(keys):
                axes[row, col].plot(steps, [x[key] or 0 for x in run["rows"]], lw=1, **style)
                axes[row, col].set_title(f"lr {lr}: {key}", fontsize=9)
                axes[row, col].set_yscale("log" if key != "k" else "linear")
            tested = [t for t in run["test"] if "top1" in t]
            axes[row, -1].plot([t["epoch"] for t in tested], [t["top1"] for t in tested], "o-", **style)
            axes[row, -1].set_title(f"lr {lr}: test top-1 per epoch", fontsize=9)
        axes[row, -1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("on", help="the recipe with the top-k mask")
    parser.add_argument("off", help="the same recipe without it ('none': the ON runs alone)")
    parser.add_argument("--lr", type=float, nargs="+", required=True)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    parser.add_argument("--out", default="runs/topk_diagnosis.json")
    args = parser.parse_args()
    runs = [diagnose(recipe, lr, args.epochs, args.every, args.overrides)
            for lr in args.lr for recipe in (args.on, args.off) if recipe != "none"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(runs))
    figure(runs, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
