"""PyTorch's PT2E int8 flow (torchao's X86InductorQuantizer) on a run's student, beside ONNX Runtime's
static quantisation: what ``deepkd quantize`` was chosen against (BENCHMARKS.md, "int8 settings").

    pip install --no-deps torchao==0.18.0      # not a deepkd dependency
    python benchmarks/quantize_pt2e.py RUN [--calibration 256] [--repeats 50]

The student is captured by ``torch.export``, prepared with the x86 Inductor quantizer's default
config (int8 static, per-channel weights), calibrated on the same training images as ``deepkd
quantize``, converted, and compiled by ``torch.compile`` (Inductor lowers the quantised pattern to
int8 kernels). Top-1 on the whole test split; latency of the fp32 eager student, the compiled fp32
student and the compiled int8 one at batch 1 and 32, one thread, timed in turns.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    from deepkd.deploy.quantize import _training_images
    from deepkd.deploy.run import load_run
    from deepkd.train import build

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = load_run(args.run)
    shape = (run.metadata["channels"], run.metadata["input_size"], run.metadata["input_size"])
    example = torch.randn(32, *shape)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(run.model, (example,), dynamic_shapes=({0: batch},)).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(program, quantizer)
    with torch.no_grad():
        for images in _training_images(run, args.calibration):
            prepared(images)
    int8 = convert_pt2e(prepared)
    models = {"fp32 eager": run.model, "fp32 compiled": torch.compile(run.model), "int8 compiled": torch.compile(int8)}
    data = build.build_dataset(run.cfg, device=torch.device("cpu"), rank=0, world_size=1)
    correct, seen = {name: 0 for name in models}, 0
    with torch.no_grad():
        for images, labels in data.test.iter_epoch(0):
            for chunk, chunk_labels in zip(images.split(32), labels.split(32)):
                for name, model in models.items():
                    correct[name] += (model(chunk).argmax(-1) == chunk_labels).sum().item()
                seen += len(chunk_labels)
    for name in models:
        print(f"{name}: top-1 {100.0 * correct[name] / seen:.2f} on {seen} test images")
    for batch_size in (1, 32):
        images = torch.randn(batch_size, *shape)
        times = {name: [] for name in models}
        with torch.no_grad():
            for index in range(10 + args.repeats):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(images)
                    if index >= 10:
                        times[name].append(time.perf_counter() - start)
        medians = {name: 1000 * statistics.median(t) for name, t in times.items()}
        print(f"batch {batch_size}: " + ", ".join(f"{n} {m:.3f} ms" for n, m in medians.items()) +
              f"; int8 compiled vs fp32 compiled {medians['fp32 compiled'] / medians['int8 compiled']:.2f}x")


if __name__ == "__main__":
    main()
