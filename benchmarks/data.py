"""Images per second: deepkd's device-resident CIFAR loader vs a conventional per-sample pipeline.

    python benchmarks/data.py [--images 10000] [--workers 2] [--device cpu] [--json]

Both produce the CIFAR training batches of the reference recipe (4-pixel zero padding, random 32x32
crop, horizontal flip, normalisation) at batch 64 from the same uint8 images. The conventional
pipeline is what the reference code runs: a Dataset that turns each sample into a PIL image, pads,
crops, flips and normalises it one by one, in DataLoader worker processes. Measured one after the
other in one run; each over one full epoch after a warm-up epoch.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deepkd.data import DeviceLoader, cifar, synthetic


class PerSampleCifar(Dataset):
    """Reference-style per-sample augmentation with PIL (what torchvision's transforms do)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images.permute(0, 2, 3, 1).numpy()  # HWC uint8 as the pickle rows become
        self.labels = labels.tolist()
        self.mean = np.array(cifar.MEAN, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.array(cifar.STD, dtype=np.float32).reshape(3, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        from PIL import Image, ImageOps

        image = ImageOps.expand(Image.fromarray(self.images[index]), border=4, fill=0)
        left, top = random.randint(0, 8), random.randint(0, 8)
        image = image.crop((left, top, left + 32, top + 32))
        if random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((array - self.mean) / self.std), self.labels[index]


def images_per_second(batches, device) -> float:
    count, started = 0, time.perf_counter()
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        count += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    images, labels = synthetic.generate(args.images, seed=0)
    device_loader = DeviceLoader(images, labels, batch_size=64, mean=cifar.MEAN, std=cifar.STD, train=True,
                                 device=device, seed=0)
    per_sample = DataLoader(PerSampleCifar(images, labels), batch_size=64, shuffle=True,
                            num_workers=args.workers, persistent_workers=args.workers > 0,
                            pin_memory=device.type == "cuda")
    results = {}
    for name, make in (("device-resident (deepkd)", lambda epoch: device_loader.iter_epoch(epoch)),
                       (f"per-sample PIL DataLoader, {args.workers} workers", lambda epoch: iter(per_sample))):
        images_per_second(make(1), device)  # warm-up: worker start, caches
        results[name] = images_per_second(make(2), device)
    base = results[f"per-sample PIL DataLoader, {args.workers} workers"]
    print(f"{args.images} CIFAR-shaped images, batch 64, device {device}, torch {torch.__version__}")
    for name, value in results.items():
        print(f"  {name:<40} {value:10.0f} images/s   {value / base:6.1f}x")
    if args.json:
        print(json.dumps({"images_per_second": results}))


if __name__ == "__main__":
    main()
