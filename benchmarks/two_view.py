"""Images per second of the strong view's FixMatch RandAugment + Cutout: batched vs per image.

    python benchmarks/two_view.py [--device cpu|cuda] [--batch 256] [--size 32] [--repeats 20] [--threads N]

Batched: ``draw_params`` + ``apply`` on one uint8 ``[batch, 3, size, size]`` batch on ``--device`` (what
the device-resident loaders run). Per image: ``FixMatchRandAugment`` called on each image of the same
batch in a Python loop on the CPU (what each DataLoader worker of the image-folder loader runs, one
thread per worker). Same images, same op code; only the dispatch differs. Then the device-resident
loader (``DeviceLoader``, CIFAR recipe, batch 64) over ``--images`` images: one epoch with one view
vs one epoch with two views (weak + strong), side by side. No assertions.
"""
from __future__ import annotations

import argparse
import time

import torch

from deepkd.data.randaugment import FixMatchRandAugment, apply, draw_params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batched_rate(images: torch.Tensor, repeats: int) -> float:
    """Images per second of ``apply(images, draw_params(...))`` (parameters drawn on the CPU each batch)."""
    generator = torch.Generator().manual_seed(0)
    count, _, height, width = images.shape
    for _ in range(3):  # warm-up
        apply(images, draw_params(count, height, width, generator=generator))
    _sync(images.device)
    start = time.perf_counter()
    for _ in range(repeats):
        apply(images, draw_params(count, height, width, generator=generator))
    _sync(images.device)
    return count * repeats / (time.perf_counter() - start)


def per_image_rate(images: torch.Tensor, repeats: int) -> float:
    """Images per second of the per-image transform looped over ``images`` (global RNG)."""
    augment = FixMatchRandAugment()
    for image in images[:16]:  # warm-up
        augment(image)
    start = time.perf_counter()
    for _ in range(repeats):
        for image in images:
            augment(image)
    return len(images) * repeats / (time.perf_counter() - start)


def loader_rate(images: torch.Tensor, labels: torch.Tensor, device: torch.device, strong: bool) -> float:
    """Training images per second of one ``DeviceLoader`` epoch (batch 64), one or two views."""
    from deepkd.data import DeviceLoader

    loader = DeviceLoader(images, labels, batch_size=64, mean=(0.5,) * 3, std=(0.25,) * 3, train=True,
                          device=device, strong=strong)
    for _ in zip(range(3), loader.iter_epoch(0)):  # warm-up
        pass
    _sync(device)
    start = time.perf_counter()
    for _ in loader.iter_epoch(1):
        pass
    _sync(device)
    return len(labels) / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="device of the batched apply (the per-image loop: CPU)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32, help="image side (CIFAR: 32)")
    parser.add_argument("--repeats", type=int, default=20, help="batches timed (per image: passes over the batch)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a DataLoader worker has 1)")
    parser.add_argument("--images", type=int, default=10000, help="images of the loader epochs (CIFAR: 50000)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    batched = batched_rate(images.to(device), args.repeats)
    looped = per_image_rate(images, max(1, args.repeats // 4))
    print(f"FixMatch RandAugment + Cutout, uint8 [{args.batch}, 3, {args.size}, {args.size}], "
          f"torch {torch.__version__}, {args.threads} CPU thread(s)")
    print(f"  batched apply on {device}:        {batched:10.0f} images/s")
    print(f"  per-image transform, CPU loop:  {looped:10.0f} images/s")
    print(f"  ratio batched / per-image:      {batched / looped:10.2f}x")
    pool = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 100, (args.images,), generator=torch.Generator().manual_seed(3))
    one, two = (loader_rate(pool, labels, device, strong) for strong in (False, True))
    print(f"DeviceLoader epoch on {device}, {args.images} images, batch 64")
    print(f"  one view:                       {one:10.0f} images/s")
    print(f"  two views (weak + strong):      {two:10.0f} images/s")
    print(f"  two-view epoch / one-view epoch: {one / two:9.2f}x the time")


if __name__ == "__main__":
    main()
