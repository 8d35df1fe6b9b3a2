"""Which int8 settings ``deepkd quantize`` should default to: calibration method x weight granularity,
measured on one run's student (top-1 on its whole test split, latency ratio fp32/int8 in ONNX Runtime).

    python benchmarks/quantize_choices.py RUN [--threads 1] [--out docs/quantize_choices.json]

Every setting writes its int8 file to a temporary folder (the run folder is not touched) and is
measured by :func:`deepkd.deploy.quantize_run` itself, so the table is what the command prints.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from deepkd.deploy import quantize_run
from deepkd.models.cost import cpu_name

SETTINGS = [(calibrate, per_channel) for calibrate in ("minmax", "percentile", "entropy")
            for per_channel in (True, False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--out", help="also write the rows as JSON")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for calibrate, per_channel in SETTINGS:
            report = quantize_run(args.run, Path(tmp) / "q.onnx", calibrate=calibrate, per_channel=per_channel,
                                  calibration=args.calibration, threads=args.threads)
            rows.append({"calibrate": calibrate, "weights": report["weights"], "fp32": report["top1"]["fp32"],
                         "int8": report["top1"]["int8"], "drop": report["drop"], "images": report["images"],
                         "speedup": report["speedup"], "int8_bytes": report["bytes"]["int8"]})
            print(json.dumps(rows[-1]), flush=True)
    machine = f"{cpu_name()}, ONNX Runtime {args.threads} thread(s), torch {torch.__version__}, " \
              f"Python {platform.python_version()}"
    print(f"\n{machine}; run {args.run}")
    print("| calibration | weights | fp32 top-1 | int8 top-1 | drop | speed-up b1 | speed-up b32 | int8 size |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['calibrate']} | {r['weights']} | {r['fp32']:.2f} | {r['int8']:.2f} | {r['drop']:+.2f} | "
              f"{r['speedup']['1']:.2f}x | {r['speedup']['32']:.2f}x | {r['int8_bytes'] / 1e3:.0f} kB |")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "run": args.run, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
