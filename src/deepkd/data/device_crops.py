"""RandomResizedCrop on the device, for image sets small enough to keep in memory.

:class:`RandomResizedCropLoader` is a :class:`~deepkd.data.DeviceLoader` whose training view is the
ImageNet recipe's RandomResizedCrop + horizontal flip, computed for a whole batch at once: the crop
boxes follow torchvision's rule (ten tries of a uniform area fraction in ``scale`` and a log-uniform
aspect ratio in ``ratio``, else the whole image), drawn from the batch's generator seeded by
``(seed, epoch, index)``, and ``torchvision.ops.roi_align`` resamples every box to ``size x size``
in one call (``aligned=True``: a box covers exactly its pixels; adaptive sampling, so a shrinking
crop averages the pixels it covers). torchvision's transform works on one image at a time in worker
processes; this keeps the device-resident loader's batched, worker-free path for such sets.
With ``strong=True`` a batch is ``[2, b, 3, size, size]``: this view and a strong view with its own
box and flip (stream ``_STRONG``), rounded to uint8 and passed through the FixMatch RandAugment.
"""
from __future__ import annotations

import math
from typing import Iterator, Tuple

import torch

from deepkd.data.device_loader import DeviceLoader, _generator
from deepkd.errors import ConfigError

_STREAM, _STRONG = 7, 8  # generator streams of their own: (seed, epoch, index, _STREAM | _STRONG)


class RandomResizedCropLoader(DeviceLoader):
    """Training batches of RandomResizedCrop(``size``) + flip from uint8 images kept on the device.

    Args: as :class:`DeviceLoader` (``images`` all of one size, e.g. resized and centre-cropped to
    the evaluation ``resize``), plus ``size`` (output side), ``scale`` and ``ratio`` (torchvision's).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, size: int, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), **options):
        super().__init__(images, labels, train=True, pad=0, **options)
        self.size, self.scale, self.ratio = size, scale, ratio

    def crop_boxes(self, epoch: int, index: int, count: int,
                   stream: int = _STREAM) -> Tuple[torch.Tensor, torch.Tensor]:
        """float ``[count, 4]`` boxes ``(left, top, right, bottom)`` in pixels and bool ``[count]`` flips."""
        generator = _generator(self.seed, epoch, index, stream)
        height, width = self.images.shape[-2:]
        area = torch.rand(count, 10, generator=generator, dtype=torch.float64)
        area = height * width * (self.scale[0] + area * (self.scale[1] - self.scale[0]))
        log_ratio = torch.rand(count, 10, generator=generator, dtype=torch.float64)
        aspect = torch.exp(math.log(self.ratio[0]) + log_ratio * (math.log(self.ratio[1]) - math.log(self.ratio[0])))
        w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits
        found = fits.any(dim=1)
        w = torch.where(found, w.gather(1, first)[:, 0], float(width))  # no try fits: the whole image
        h = torch.where(found, h.gather(1, first)[:, 0], float(height))
        offsets = torch.rand(2, count, generator=generator, dtype=torch.float64)
        top = torch.floor(offsets[0] * (height - h + 1))
        left = torch.floor(offsets[1] * (width - w + 1))
        flips = torch.rand(count, generator=generator) < 0.5 if self.flip else torch.zeros(count, dtype=torch.bool)
        return torch.stack([left, top, left + w, top + h], dim=1).float(), flips

    def resized_crops(self, images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """float32 ``[b, 3, size, size]`` pixels (0-255) of each image's box, flipped where asked."""
        from torchvision.ops import roi_align

        rois = torch.cat([torch.arange(len(boxes), dtype=torch.float32)[:, None], boxes], dim=1).to(self.device)
        crops = roi_align(images.float(), rois, output_size=self.size, spatial_scale=1.0, sampling_ratio=0,
                          aligned=True)
        return torch.where(flips.to(self.device)[:, None, None, None], crops.flip(-1), crops)

    def batch_views(self, epoch: int, index: int):
        raise ConfigError("random resized crops are not (dy, dx, flip) views, so the teacher-logit cache cannot "
                         "serve them: set train.teacher_cache: false")

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_batch ..`` of ``epoch``; batch ``i`` depends only on (seed, epoch, i)."""
        for index in range(start_batch, len(self)):
            chosen = self._chosen(epoch, index)
            views = [self._crops(chosen, epoch, index, _STREAM)]
            if self.strong:
                from deepkd.data.randaugment import apply

                strong = self._crops(chosen, epoch, index, _STRONG).round().clamp(0, 255).to(torch.uint8)
                views.append(apply(strong, self.strong_params(epoch, index, len(chosen))))
            images = torch.stack([self.normalize(v) for v in views]) if self.strong else self.normalize(views[0])
            yield images, self.labels[self._shard(chosen.to(self.device))]

    def _crops(self, chosen: torch.Tensor, epoch: int, index: int, stream: int) -> torch.Tensor:
        """This rank's float pixels of the global batch ``chosen``'s crops from generator ``stream``."""
        boxes, flips = self.crop_boxes(epoch, index, len(chosen), stream)
        chosen, boxes, flips = (self._shard(t.to(self.device)) for t in (chosen, boxes, flips))
        return self.resized_crops(self.images[chosen], boxes, flips)
