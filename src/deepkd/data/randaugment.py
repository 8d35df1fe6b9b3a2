"""The strong view of MLKD and CRLD: FixMatch RandAugment + Cutout on uint8 tensors (spec MLKD_CRLD.md §3.2).

Per image: two ops picked uniformly **with replacement** from the 14 of :data:`OPS`, each with a fresh
value uniform in its range (:data:`RANGES`), applied in order, then **always** a Cutout square of side
``v = U[0, 0.5) * W`` filled with RGB (125, 123, 114). The ops reproduce the PIL calls of the reference
(``ImageOps.autocontrast/equalize/posterize/solarize``, ``ImageEnhance.*(f).enhance``, ``img.rotate(v)``,
``img.transform(size, AFFINE, ...)``, ``ImageDraw.rectangle``) on ``uint8 [.., 3, H, W]`` tensors:

- the point and colour ops and Cutout are pixel-equal to PIL: the same integer look-up tables, the
  same integer greyscale (``L = (19595 R + 38470 G + 7471 B + 2^15) >> 16``), the Contrast mean rounded
  the PIL way, and ``Image.blend``'s float32 ``in1 + f * (in2 - in1)`` truncated to uint8; Sharpness
  blends with PIL's 3x3 SMOOTH filter in PIL's float32 summation order, borders untouched;
- Rotate and Shear replay PIL's nearest-neighbour affine in its 16.16 fixed point (matrix of
  ``Image.rotate``: about ``(W/2, H/2)``, no expand, black fill), Translate PIL's float "scale" path,
  so they match PIL too, up to PIL's row-by-row float accumulation (a pixel at most in rare cases).

Why not torchvision's ``RandAugment`` or kornia (spec §3.3, §3.4): both use fixed magnitudes with a
random sign (enhance 1 +- 0.27, rotate +-9 deg, posterize always 7 bits, ...) instead of uniform ranges,
have no Cutout, and on a batch they draw one op for the whole batch (kornia: once per call, without
replacement), which correlates the batch statistics MLKD's and CRLD's losses depend on. Nor are
torchvision's v2 kernels used: in our checks ``adjust_brightness/sharpness``, ``equalize``,
``autocontrast`` and the shear ``affine`` matched PIL, but ``adjust_contrast`` (a float mean, not PIL's
rounded integer one), ``adjust_saturation`` (a float greyscale) and nearest ``rotate`` (a float grid,
~0.1% of pixels) do not, and every kernel takes one value per call, not one per image. One set of
per-image-valued kernels serves both paths instead, which is what makes them give identical images.

One seeded behaviour, two dispatchers over the same per-op kernels:

- :func:`draw_params` draws ``count`` images' parameters from a ``torch.Generator`` (or the global
  RNG): op ids ``[count, 2]``, values ``[count, 2]``, Cutout ``(side, cx, cy)``;
- :func:`apply` (batched, CPU or CUDA): for each of the 2 slots and each op, the images that drew it are
  gathered, transformed and scattered back (about 26 kernel calls per batch, no loop over images),
  then one vectorised Cutout;
- :class:`FixMatchRandAugment` (per image, for DataLoader workers): draws ``draw_params(1, H, W)`` and
  applies it with :func:`apply_image`. Given the same parameters both give identical uint8 images.

The Cutout centre is drawn as the reference draws it: ``np.random.uniform(w)`` is
``uniform(low=w, high=1.0)``, i.e. ``cx`` uniform on ``(1, W]`` (``cy`` on ``(1, H]``), not on
``[0, W)`` as the spec's table reads. So the square is less often shifted at the top/left edge and more
often clipped at the bottom/right edge.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch

OPS: Tuple[str, ...] = ("AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize",
                        "Rotate", "Sharpness", "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY")
"""The 14 ops in the reference's list order; an op id is an index into this tuple."""
RANGES = {  # value ~ low + (high - low) * U[0, 1); unused by Identity, AutoContrast and Equalize
    "AutoContrast": (0.0, 1.0), "Brightness": (0.05, 0.95), "Color": (0.05, 0.95), "Contrast": (0.05, 0.95),
    "Equalize": (0.0, 1.0), "Identity": (0.0, 1.0), "Posterize": (4.0, 8.0), "Rotate": (-30.0, 30.0),
    "Sharpness": (0.05, 0.95), "ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3), "Solarize": (0.0, 256.0),
    "TranslateX": (-0.3, 0.3), "TranslateY": (-0.3, 0.3),
}
NUM_OPS = 2  # ops per image (RandAugment(2, 10); the magnitude 10 is ignored by the reference)
MAX_CUTOUT = 0.5  # Cutout side = U[0, MAX_CUTOUT) * W
CUTOUT_FILL = (125, 123, 114)
IDENTITY = OPS.index("Identity")
_LOW = torch.tensor([RANGES[name][0] for name in OPS], dtype=torch.float64)
_HIGH = torch.tensor([RANGES[name][1] for name in OPS], dtype=torch.float64)


class StrongParams(NamedTuple):
    """Per-image RandAugment parameters (CPU tensors from :func:`draw_params`; rows may be sliced or moved)."""

    ops: torch.Tensor  # int64 [count, 2]: op ids into OPS, applied in slot order
    values: torch.Tensor  # float64 [count, 2]: each op's value (Posterize: bits = int(value))
    cutout: torch.Tensor  # float64 [count, 3]: side v (pixels), centre cx, cy


def draw_params(count: int, height: int, width: int, generator: Optional[torch.Generator] = None) -> StrongParams:
    """Parameters of ``count`` images of ``height x width`` from ``generator`` (None: the global torch RNG).

    Three draws, in this order: op ids ``randint(14, [count, 2])``, values ``rand([count, 2])`` mapped onto
    each op's range, Cutout ``rand([count, 3])``: side ``= u0 * 0.5 * W``, ``cx = W + (1 - W) * u1``,
    ``cy = H + (1 - H) * u2`` (numpy's ``uniform(W)`` of the reference, on ``(1, W]``).
    """
    ops = torch.randint(len(OPS), (count, NUM_OPS), generator=generator)
    unit = torch.rand(count, NUM_OPS, generator=generator, dtype=torch.float64)
    values = _LOW[ops] + (_HIGH[ops] - _LOW[ops]) * unit
    u = torch.rand(count, 3, generator=generator, dtype=torch.float64)
    side = u[:, 0] * MAX_CUTOUT * width
    cx = width + (1.0 - width) * u[:, 1]
    cy = height + (1.0 - height) * u[:, 2]
    return StrongParams(ops, values, torch.stack([side, cx, cy], dim=1))


# ------------------------------------------------------------------------------------------------ kernels
# Each kernel maps uint8 [n, 3, H, W] and float64 values [n] (any device) to uint8 [n, 3, H, W].

def _per_image(values: torch.Tensor, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """``values [n]`` as ``[n, 1, 1, 1]`` on ``like``'s device."""
    return values.to(device=like.device, dtype=dtype or values.dtype).view(-1, 1, 1, 1)


def _lookup(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """``lut [n, 3, 256]`` (uint8) applied to each image's channels."""
    n, c, h, w = x.shape
    return lut.gather(2, x.reshape(n, c, h * w).long()).view(n, c, h, w)


def _autocontrast(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast``: per channel, ``int(i * 255/(hi-lo) - lo * 255/(hi-lo))`` clipped."""
    lo, hi = x.amin(dim=(2, 3)).double(), x.amax(dim=(2, 3)).double()
    span = (hi - lo).clamp(min=1.0)
    scale = torch.full_like(span, 255.0) / span  # a true division (``255.0 / span`` multiplies by 1/span)
    offset = -lo * scale
    levels = torch.arange(256, dtype=torch.float64, device=x.device)
    lut = (levels * scale[..., None] + offset[..., None]).trunc().clamp(0, 255)
    lut = torch.where((hi > lo)[..., None], lut, levels)
    return _lookup(x, lut.to(torch.uint8))


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """int64 ``[n, 3, 256]`` per-channel histograms (bincount: deterministic on CUDA without weights)."""
    n, c, h, w = x.shape
    rows = torch.arange(n * c, device=x.device).unsqueeze(1) * 256
    return torch.bincount((x.reshape(n * c, h * w).long() + rows).flatten(), minlength=n * c * 256).view(n, c, 256)


def _equalize(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``ImageOps.equalize``: ``step = (pixels - count of the top level) // 255``,
    ``lut[i] = (step // 2 + pixels below i) // step`` (identity when step is 0)."""
    hist = _histogram(x)
    top = hist.gather(2, x.amax(dim=(2, 3)).long().unsqueeze(-1)).squeeze(-1)
    step = (x.shape[2] * x.shape[3] - top) // 255
    below = hist.cumsum(2) - hist
    lut = ((step // 2)[..., None] + below) // step.clamp(min=1)[..., None]
    levels = torch.arange(256, device=x.device)
    lut = torch.where((step > 0)[..., None], lut.clamp(max=255), levels)
    return _lookup(x, lut.to(torch.uint8))


def _posterize(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``ImageOps.posterize(img, int(v))``: keep the top ``bits`` bits."""
    bits = values.trunc().long().clamp(1, 8)
    mask = (256 - 2 ** (8 - bits)).to(torch.uint8)
    return x & _per_image(mask, x)


def _solarize(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``ImageOps.solarize(img, v)``: pixels ``>= v`` inverted."""
    return torch.where(x >= _per_image(values, x), 255 - x, x)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, x, f)``: ``(uint8)(in1 + f * (in2 - in1))`` in float32 (PIL's C float)."""
    factor = _per_image(values, x, torch.float32)
    base = degenerate.float()
    return (base + factor * (x.float() - base)).to(torch.uint8)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """int32 ``[n, 1, H, W]``: PIL's RGB -> L conversion (ITU-R 601-2 in 16-bit fixed point)."""
    r, g, b = x.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def _brightness(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros((), dtype=torch.uint8, device=x.device), x, values)


def _color(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return _blend(_grey(x), x, values)


def _contrast(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Blend with the grey level ``int(mean(L) + 0.5)``, computed exactly in integers."""
    pixels = x.shape[2] * x.shape[3]
    mean = (2 * _grey(x).sum(dim=(1, 2, 3), dtype=torch.int64) + pixels) // (2 * pixels)
    return _blend(mean.view(-1, 1, 1, 1), x, values)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageFilter.SMOOTH`` (1 1 1 / 1 5 1 / 1 1 1, scale 13): float32 weights and summation in
    PIL's order, ``+ 0.5`` and truncation; the border rows and columns are copied."""
    k1, k5 = (torch.tensor([1.0, 5.0], dtype=torch.float32) / torch.tensor(13.0, dtype=torch.float32)).to(x.device)
    f = x.float()

    def row(rows: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        return (rows[..., :-2] * k1 + rows[..., 1:-1] * centre) + rows[..., 2:] * k1

    total = ((0.5 + row(f[:, :, 2:], k1)) + row(f[:, :, 1:-1], k5)) + row(f[:, :, :-2], k1)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = total.clamp(0, 255).to(torch.uint8)
    return out


def _sharpness(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return _blend(_smooth(x), x, values)


def _sample(x: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour pull: output ``(y, x)`` = input ``(sy, sx)`` (int64 ``[n, H, W]``), 0 outside."""
    n, c, h, w = x.shape
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    index = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).view(n, 1, h * w).expand(n, c, h * w)
    pulled = x.reshape(n, c, h * w).gather(2, index).view(n, c, h, w)
    return pulled * inside.unsqueeze(1)


def _affine_fixed(x: torch.Tensor, a: Sequence[torch.Tensor]) -> torch.Tensor:
    """PIL's nearest affine for matrices with a shear/rotation part (``affine_fixed`` in Geometry.c):
    the inverse map ``(a0 x + a1 y + a2, a3 x + a4 y + a5)`` of pixel centres in 16.16 fixed point."""
    def fix(v: torch.Tensor) -> torch.Tensor:  # FLOOR(v * 65536 + 0.5)
        return torch.floor(v * 65536.0 + 0.5).long().to(x.device).view(-1, 1, 1)

    a0, a1, a3, a4 = fix(a[0]), fix(a[1]), fix(a[3]), fix(a[4])
    a2, a5 = fix(a[2] + a[0] * 0.5 + a[1] * 0.5), fix(a[5] + a[3] * 0.5 + a[4] * 0.5)
    ys = torch.arange(x.shape[2], device=x.device).view(1, -1, 1)
    xs = torch.arange(x.shape[3], device=x.device).view(1, 1, -1)
    sx = torch.div(a2 + ys * a1 + xs * a0, 65536, rounding_mode="floor")
    sy = torch.div(a5 + ys * a4 + xs * a3, 65536, rounding_mode="floor")
    return _sample(x, sx, sy)


def _rotate(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``img.rotate(v)``: PIL's inverse matrix about the centre ``(W/2, H/2)``, coefficients rounded to 15
    decimals as PIL rounds them."""
    h, w = x.shape[2], x.shape[3]
    angle = -(torch.remainder(values, 360.0) * (math.pi / 180.0))
    cos, sin = torch.round(torch.cos(angle), decimals=15), torch.round(torch.sin(angle), decimals=15)
    cx, cy = w / 2, h / 2
    c = ((cos * -cx + sin * -cy) + 0.0) + cx
    f = ((-sin * -cx + cos * -cy) + 0.0) + cy
    return _affine_fixed(x, (cos, sin, c, -sin, cos, f))


def _shear_x(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones_like(values), torch.zeros_like(values)
    return _affine_fixed(x, (one, values, zero, zero, one, zero))


def _shear_y(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones_like(values), torch.zeros_like(values)
    return _affine_fixed(x, (one, zero, zero, values, one, zero))


def _translate(x: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """PIL's nearest "scale" affine ``(1, 0, tx, 0, 1, ty)``: source ``floor(x + tx + 0.5)`` in float64."""
    xo = (tx + 0.5).to(x.device).view(-1, 1, 1)
    yo = (ty + 0.5).to(x.device).view(-1, 1, 1)
    ys = torch.arange(x.shape[2], device=x.device, dtype=torch.float64).view(1, -1, 1)
    xs = torch.arange(x.shape[3], device=x.device, dtype=torch.float64).view(1, 1, -1)
    return _sample(x, torch.floor(xo + xs).long().expand(-1, x.shape[2], -1),
                   torch.floor(yo + ys).long().expand(-1, -1, x.shape[3]))


def _translate_x(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return _translate(x, values * x.shape[3], torch.zeros_like(values))


def _translate_y(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return _translate(x, torch.zeros_like(values), values * x.shape[2])


def _identity(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return x


KERNELS: Tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    _autocontrast, _brightness, _color, _contrast, _equalize, _identity, _posterize, _rotate, _sharpness,
    _shear_x, _shear_y, _solarize, _translate_x, _translate_y)
"""``KERNELS[op](images uint8 [n, 3, H, W], values float64 [n]) -> uint8 [n, 3, H, W]``, in OPS order."""


def cutout_box(side: float, cx: float, cy: float, height: int, width: int) -> Optional[Tuple[int, int, int, int]]:
    """One image's Cutout as inclusive pixel bounds ``(x0, y0, x1, y1)``, already clipped; None if none."""
    if side <= 0:
        return None
    x0, y0 = int(max(0.0, cx - side / 2)), int(max(0.0, cy - side / 2))
    x1, y1 = int(min(width, x0 + side)), int(min(height, y0 + side))
    return x0, y0, min(x1, width - 1), min(y1, height - 1)


def cutout(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Cutout of each image (``boxes [n, 3]``: side v, cx, cy) as the reference draws it with PIL:
    ``x0 = int(max(0, cx - v/2))``, ``x1 = min(W, x0 + v)`` (likewise y with the same v), a rectangle
    that INCLUDES ``int(x1)``/``int(y1)``, clipped to the image, filled with (125, 123, 114); none when v <= 0.
    So the side is ``floor(v) + 1`` unless clipped at the bottom/right; at the top/left it is shifted."""
    n, _, h, w = images.shape
    side, cx, cy = boxes.to(torch.float64).unbind(1)
    x0, y0 = (cx - side / 2).clamp(min=0).floor(), (cy - side / 2).clamp(min=0).floor()
    x1, y1 = torch.clamp(x0 + side, max=w).trunc(), torch.clamp(y0 + side, max=h).trunc()
    dev = images.device
    cols = torch.arange(w, dtype=torch.float64, device=boxes.device)
    rows = torch.arange(h, dtype=torch.float64, device=boxes.device)
    in_cols = ((cols >= x0[:, None]) & (cols <= x1[:, None]) & (side > 0)[:, None]).to(dev)
    in_rows = ((rows >= y0[:, None]) & (rows <= y1[:, None])).to(dev)
    box = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)
    fill = torch.tensor(CUTOUT_FILL, dtype=torch.uint8, device=dev).view(1, 3, 1, 1)
    return torch.where(box, fill, images)


# ------------------------------------------------------------------------------------------------ dispatch

def _check(images: torch.Tensor, dims: int) -> None:
    if images.dtype != torch.uint8 or images.dim() != dims or images.shape[-3] != 3:
        shape = "[B, 3, H, W]" if dims == 4 else "[3, H, W]"
        raise ValueError(f"RandAugment takes uint8 {shape} RGB images (after crop and flip, before "
                         f"normalisation), got {images.dtype} {tuple(images.shape)}")


def apply(images: torch.Tensor, params: StrongParams) -> torch.Tensor:
    """Batched RandAugment + Cutout: uint8 ``[B, 3, H, W]`` (CPU or CUDA) -> a new uint8 ``[B, 3, H, W]``.

    ``params`` holds ``B`` rows (:func:`draw_params`), on the CPU (best: no device syncs) or on
    ``images.device``. For each slot and each op, the images that drew it are gathered, transformed and
    scattered back; then one vectorised Cutout. Equal to :func:`apply_image` row by row.
    """
    _check(images, 4)
    if len(params.ops) != len(images):
        raise ValueError(f"{len(params.ops)} rows of parameters for {len(images)} images")
    out = images.clone()
    for slot in range(NUM_OPS):
        ops, values = params.ops[:, slot], params.values[:, slot]
        for op, kernel in enumerate(KERNELS):
            if op == IDENTITY:
                continue
            chosen = (ops == op).nonzero().flatten()
            if len(chosen) == len(images):
                out = kernel(out, values)
            elif len(chosen):
                rows = chosen.to(images.device)
                out.index_copy_(0, rows, kernel(out.index_select(0, rows), values[chosen]))
    return cutout(out, params.cutout)


def apply_image(image: torch.Tensor, params: StrongParams, row: int = 0) -> torch.Tensor:
    """One image, uint8 ``[3, H, W]``, through row ``row`` of ``params``: its 2 ops in order, then Cutout."""
    _check(image, 3)
    x = image.unsqueeze(0)
    for slot in range(NUM_OPS):
        x = KERNELS[int(params.ops[row, slot])](x, params.values[row:row + 1, slot])
    out = x[0] if x.data_ptr() != image.data_ptr() else image.clone()
    box = cutout_box(*params.cutout[row].tolist(), height=image.shape[-2], width=image.shape[-1])
    if box is not None:
        x0, y0, x1, y1 = box
        out[:, y0:y1 + 1, x0:x1 + 1] = torch.tensor(CUTOUT_FILL, dtype=torch.uint8, device=out.device).view(3, 1, 1)
    return out


class FixMatchRandAugment:
    """Per-image strong augmentation: uint8 ``[3, H, W]`` (after crop and flip) -> uint8 ``[3, H, W]``.

    Each call draws ``draw_params(1, H, W, generator)`` (``generator=None``: the GLOBAL torch RNG, which
    the image-folder loader seeds per sample under ``torch.random.fork_rng``) and applies it with
    :func:`apply_image`. Usable as a step of ``torchvision.transforms.v2.Compose``.
    """

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _check(image, 3)
        return apply_image(image, draw_params(1, image.shape[-2], image.shape[-1], generator=self.generator))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_ops={NUM_OPS}, cutout={MAX_CUTOUT})"
