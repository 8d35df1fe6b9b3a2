"""A device-resident loader: the whole uint8 dataset on the device, augmentation batched there.

The CIFAR recipe's augmentation (4-pixel zero padding, a random 32x32 window, horizontal flip with
p = 0.5, then normalisation) runs as one gather per batch with per-sample parameters, no worker
processes and no per-sample Python. Batch ``i`` of epoch ``e`` is a pure function of
``(seed, e, i)``: the epoch's order comes from a generator seeded by ``(seed, e)``, the batch's
augmentation from one seeded by ``(seed, e, i)``, so a run resumed at any batch sees exactly the
batches an uninterrupted run sees.

Optionally (``rotation > 0``, Tiny-ImageNet's recipe) each training image is first rotated about its
centre by its own angle, uniform in ``[-rotation, rotation]`` degrees, nearest-neighbour with zero
fill, like torchvision's ``RandomRotation(rotation)``; the angles are drawn from the batch's generator
after the crop and flip draws, so the crop/flip stream is the same with or without rotation.

With ``strong=True`` (two-view methods: MLKD, CRLD) every training batch comes as two views
``[2, b, 3, H, W]``: the weak view above, unchanged, and a strong view with its own crop, flip (and
rotation) drawn from the stream ``(seed, e, i, STRONG)`` followed by the FixMatch RandAugment + Cutout
of :mod:`deepkd.data.randaugment`, its parameters drawn per image from ``(seed, e, i, STRONG_RA)``.
"""
from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import torch
import torch.nn.functional as F

from deepkd.errors import ConfigError

_MIX = (1_000_003, 1_000_033)
STRONG, STRONG_RA = 11, 12  # the strong view's generator streams: (seed, epoch, index, STRONG[_RA])


def _generator(*parts: int) -> torch.Generator:
    value = 0
    for part in parts:
        value = (value * _MIX[0] + int(part) + _MIX[1]) % (2 ** 62)
    return torch.Generator().manual_seed(value)


class DeviceLoader:
    """Batches ``(float32 images [b, C, H, W], int64 labels [b])`` on ``device``.

    Args:
        images: ``uint8 [N, C, H, W]`` (or ``[N, H, W, 3]``, converted once; ``C`` is 3, or 1 for grey
            images without the strong view); labels ``int64 [N]``.
        batch_size: the GLOBAL batch size. With ``world_size > 1`` every rank builds the same
            global batch and keeps its slice ``torch.tensor_split(batch, world_size)[rank]`` (equal
            when divisible; otherwise the first ranks get one more sample), so N ranks see
            exactly the batch one process sees.
        mean, std: per-channel normalisation constants in [0, 1] pixel units.
        train: shuffle and augment; False gives a fixed order and no augmentation.
        drop_last: drop the last partial batch (the reference recipe keeps it).
        pad, flip: crop padding in pixels (0: no crop) and random horizontal flip.
        rotation: largest rotation angle in degrees (0: none); rotation happens before crop and flip.
        strong: training batches are ``[2, b, 3, H, W]``: the weak view and a RandAugment strong view.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], train: bool, device="cpu", seed: int = 0, drop_last: bool = False,
                 pad: int = 4, flip: bool = True, rank: int = 0, world_size: int = 1, rotation: float = 0.0,
                 strong: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] != 3 and images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.device = torch.device(device)
        self.images = images.contiguous().to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size, self.train, self.seed, self.drop_last = batch_size, train, seed, drop_last
        self.pad, self.flip, self.rank, self.world_size = pad, flip, rank, world_size
        self.rotation, self.strong = float(rotation), strong
        channels = self.images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"{channels}-channel images need {channels} means and stds, not {len(mean)}, {len(std)}")
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, channels, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, channels, 1, 1) * 255.0

    @property
    def num_samples(self) -> int:
        """N, the number of samples in the whole set (all ranks together)."""
        return len(self.labels)

    def __len__(self) -> int:
        """Batches per epoch: ``ceil(N / batch_size)``, or ``floor`` with ``drop_last``."""
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's sample order (a seeded permutation when training)."""
        if not self.train:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=_generator(self.seed, epoch))

    def _draws(self, epoch: int, index: int, count: int, *stream: int) -> Tuple[torch.Tensor, ...]:
        generator = _generator(self.seed, epoch, index, *stream)
        offsets = torch.randint(0, 2 * self.pad + 1, (2, count), generator=generator)
        flips = torch.rand(count, generator=generator) < 0.5 if self.flip else torch.zeros(count, dtype=torch.bool)
        if not self.rotation:
            return offsets[0], offsets[1], flips, None
        # drawn last, so the offsets and flips above are those of the loader without rotation
        angles = (torch.rand(count, generator=generator, dtype=torch.float64) * 2 - 1) * self.rotation
        return offsets[0], offsets[1], flips, angles.float()

    def augment_params(self, epoch: int, index: int, count: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Crop offsets ``dy, dx`` (uniform over 0..2*pad) and flip bits of batch ``index``."""
        return self._draws(epoch, index, count)[:3]

    def rotation_angles(self, epoch: int, index: int, count: int) -> torch.Tensor:
        """float32 ``[count]`` angles in degrees (counter-clockwise) of batch ``index``; zeros without rotation."""
        angles = self._draws(epoch, index, count)[3]
        return angles if angles is not None else torch.zeros(count)

    def rotate(self, images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """Rotate uint8 ``[b, C, H, W]`` images counter-clockwise about their centres by ``angles``
        (degrees, ``[b]``), nearest neighbour, zero fill, same size: ``RandomRotation``'s defaults."""
        count, channels, height, width = images.shape
        radians = torch.deg2rad(angles.to(self.device, torch.float32))
        cos, sin = torch.cos(radians), torch.sin(radians)
        zero = torch.zeros_like(cos)
        # theta maps an output pixel to its source in normalised coordinates ([-1, 1] across each
        # axis): the inverse rotation, with the aspect ratio folded in so non-square images rotate rigidly
        theta = torch.stack([torch.stack([cos, -sin * height / width, zero], 1),
                             torch.stack([sin * width / height, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, [count, channels, height, width], align_corners=False)
        rotated = F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return rotated.to(torch.uint8)  # nearest sampling returns the uint8 values exactly

    def augment(self, images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Zero-pad, crop each image at its own offset and flip it, in one gather."""
        count, _, height, width = images.shape
        padded = F.pad(images, (self.pad,) * 4)  # zeros in raw pixel space, like RandomCrop(padding=4)
        dy, dx, flips = dy.to(self.device), dx.to(self.device), flips.to(self.device)
        columns = torch.arange(width, device=self.device)
        columns = torch.where(flips[:, None], width - 1 - columns, columns) + dx[:, None]
        rows = torch.arange(height, device=self.device) + dy[:, None]
        batch = torch.arange(count, device=self.device)[:, None, None]
        picked = padded[batch, :, rows[:, :, None], columns[:, None, :]]  # [b, H, W, C]
        return picked.permute(0, 3, 1, 2)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> float32 ``(x / 255 - mean) / std``."""
        return (images.float() - self.mean) / self.std

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if getattr(self, "_cached", (None,))[0] != epoch:
            self._cached = (epoch, self.order(epoch).to(self.device))
        return self._cached[1]

    def _shard(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.tensor_split(tensor, self.world_size)[self.rank] if self.world_size > 1 else tensor

    def _chosen(self, epoch: int, index: int) -> torch.Tensor:
        """The global batch's sample indices (all ranks)."""
        return self._epoch_order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]

    def _batch(self, epoch: int, index: int, *stream: int) -> Tuple[torch.Tensor, ...]:
        chosen = self._chosen(epoch, index)
        draws = [t for t in self._draws(epoch, index, len(chosen), *stream) if t is not None]
        return tuple(self._shard(t.to(self.device)) for t in (chosen, *draws))

    def strong_params(self, epoch: int, index: int, count: int):
        """This rank's RandAugment parameters of batch ``index`` (``count``: the global batch's size)."""
        from deepkd.data.randaugment import draw_params

        height, width = self.images.shape[-2:]
        params = draw_params(count, height, width, generator=_generator(self.seed, epoch, index, STRONG_RA))
        return type(params)(*(self._shard(t) for t in params))  # on the CPU: no device syncs in apply

    def _view(self, chosen, dy, dx, flips, *angles) -> torch.Tensor:
        """uint8 training pixels: (rotated,) padded-cropped and flipped images ``chosen``."""
        images = self.images[chosen]
        if angles:
            images = self.rotate(images, angles[0])  # first, as RandomRotation precedes the flip
        return self.augment(images, dy, dx, flips)

    def _strong_view(self, epoch: int, index: int) -> torch.Tensor:
        """uint8 strong view of batch ``index``: its own crop/flip (and rotation), then RandAugment."""
        from deepkd.data.randaugment import apply

        chosen, *draws = self._batch(epoch, index, STRONG)
        return apply(self._view(chosen, *draws), self.strong_params(epoch, index, len(self._chosen(epoch, index))))

    def batch_indices(self, epoch: int, index: int) -> torch.Tensor:
        """This rank's sample indices (int64 ``[b]`` on the device, positions in the set) of batch ``index``."""
        return self._shard(self._chosen(epoch, index).to(self.device))

    def batch_views(self, epoch: int, index: int) -> Tuple[torch.Tensor, ...]:
        """This rank's sample indices and view parameters ``(indices, dy, dx, flips)`` of a batch."""
        if self.rotation:
            raise ConfigError(f"with rotation={self.rotation:g} a batch's views are not (dy, dx, flip) views, so the "
                             "teacher-logit cache cannot serve them: set train.teacher_cache: false")
        return self._batch(epoch, index)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_batch ..`` of ``epoch``: (float32 ``[b, 3, H, W]``, int64 ``[b]``) on the device.

        ``b`` is this rank's slice of the global batch; batch ``i`` depends only on (seed, epoch, i).
        """
        for index in range(start_batch, len(self)):
            chosen, *draws = self._batch(epoch, index)  # this rank's slice only
            if not self.train:
                yield self.normalize(self.images[chosen]), self.labels[chosen]
            elif not self.strong:
                yield self.normalize(self._view(chosen, *draws)), self.labels[chosen]
            else:
                views = (self._view(chosen, *draws), self._strong_view(epoch, index))
                yield torch.stack([self.normalize(v) for v in views]), self.labels[chosen]

    def __iter__(self):
        """Epoch 0 from its first batch (for ad-hoc use; the trainer calls ``iter_epoch``)."""
        return self.iter_epoch(0)
