"""Images per second of deepkd's loaders against the pipelines the reference code uses.

    python benchmarks/data.py [--images 10000] [--jpegs 512] [--workers 2] [--device cpu] [--json]

CIFAR: deepkd's device-resident loader vs torchvision's per-sample transforms in DataLoader workers
(``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` on PIL images:
what mdistiller runs), same uint8 images, batch 64.
Image folder: deepkd's ``ImageFolderLoader`` (torchvision ``decode_image`` + ``transforms.v2``
under a per-sample seeded RNG, for exact resume) vs plain ``torchvision.datasets.ImageFolder`` with
its PIL loader and the classic ImageNet transforms (RandomResizedCrop 224, flip, ToTensor,
Normalize), on a generated tree of ``--jpegs`` 500x375 JPEGs, batch 64. Pipelines are measured one
after the other in one run, each over one full epoch after a warm-up epoch.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deepkd.data import DeviceLoader, FolderOptions, build_data, cifar, synthetic


class TorchvisionCifar(Dataset):
    """The reference pipeline: each sample a PIL image through torchvision's classic transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        from torchvision import transforms

        self.images = images.permute(0, 2, 3, 1).numpy()  # HWC uint8 as the pickle rows become
        self.labels = labels.tolist()
        self.transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                             transforms.ToTensor(), transforms.Normalize(cifar.MEAN, cifar.STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def images_per_second(batches, device) -> float:
    count, started = 0, time.perf_counter()
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        count += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


def measure(pipelines, device) -> dict:
    results = {}
    for name, make in pipelines.items():
        images_per_second(make(1), device)  # warm-up: worker start, caches
        results[name] = images_per_second(make(2), device)
    return results


def cifar_pipelines(count: int, workers: int, device) -> dict:
    images, labels = synthetic.generate(count, seed=0)
    device_loader = DeviceLoader(images, labels, batch_size=64, mean=cifar.MEAN, std=cifar.STD, train=True,
                                 device=device, seed=0)
    per_sample = DataLoader(TorchvisionCifar(images, labels), batch_size=64, shuffle=True, num_workers=workers,
                            persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    return {"cifar: device-resident (deepkd)": lambda epoch: device_loader.iter_epoch(epoch),
            f"cifar: torchvision per-sample, {workers} workers": lambda epoch: iter(per_sample)}


def write_tree(root: Path, count: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"class_{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        smooth = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)  # upsampled noise: JPEG-like content
        Image.fromarray(smooth).resize((500, 375), Image.BILINEAR).save(folder / f"{i}.jpg", quality=90)
    (root / "val").symlink_to(root / "train")


def folder_pipelines(root: Path, workers: int) -> dict:
    from torchvision import datasets, transforms

    deepkd = build_data("imagefolder", root=str(root), batch_size=64, num_workers=workers,
                        folder=FolderOptions(in_memory="off")).train
    classic = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor(), transforms.Normalize(deepkd_mean(), deepkd_std())])
    plain = DataLoader(datasets.ImageFolder(str(root / "train"), classic), batch_size=64, shuffle=True,
                       num_workers=workers, persistent_workers=workers > 0)
    return {f"folder: deepkd (decode_image + v2, seeded), {workers} workers": lambda epoch: deepkd.iter_epoch(epoch),
            f"folder: torchvision ImageFolder (PIL + classic), {workers} workers": lambda epoch: iter(plain)}


def deepkd_mean():
    return FolderOptions().mean


def deepkd_std():
    return FolderOptions().std


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--jpegs", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, batch 64")
    results = {}
    for group in ("cifar", "folder"):
        with tempfile.TemporaryDirectory() as tmp:
            if group == "cifar":
                measured = measure(cifar_pipelines(args.images, args.workers, device), device)
            else:
                write_tree(Path(tmp), args.jpegs)
                measured = measure(folder_pipelines(Path(tmp), args.workers), device)
        base = list(measured.values())[1]
        for name, value in measured.items():
            print(f"  {name:<62} {value:10.0f} images/s   {value / base:6.2f}x")
        results.update(measured)
    if args.json:
        print(json.dumps({"images_per_second": results}))


if __name__ == "__main__":
    main()
