"""The FixMatch RandAugment + Cutout strong view (deepkd.data.randaugment, spec MLKD_CRLD.md §3.2, §6.1 item 7):
each op against PIL, batched == per image, the parameter distributions, output distributions, seeding."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from deepkd.data import randaugment as ra
from deepkd.data.randaugment import (
    CUTOUT_FILL,
    IDENTITY,
    OPS,
    RANGES,
    FixMatchRandAugment,
    StrongParams,
    apply,
    apply_image,
    cutout,
    draw_params,
)

SIZES = [(32, 32), (24, 40)]  # (H, W): CIFAR and a non-square image
GEOMETRY = ["Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"]
POINT = [name for name in OPS if name not in GEOMETRY]  # point and colour ops: pixel-equal to PIL
KS_ALPHA = 1e-3  # family-wise: split over the tests of one family (Bonferroni)


def ks_critical(n: int, tests: int = 1) -> float:
    """Asymptotic one-sample Kolmogorov-Smirnov critical value c(alpha / tests) / sqrt(n), with
    c(a) = sqrt(-ln(a / 2) / 2) (1.949 at a = 0.001); for two samples of n each pass n / 2."""
    return math.sqrt(-math.log(KS_ALPHA / tests / 2) / 2) / math.sqrt(n)


# The reference's per-op PIL calls (spec §3.2), the oracle of the op-by-op tests.
PIL_OPS = {
    "AutoContrast": lambda im, v: ImageOps.autocontrast(im),
    "Brightness": lambda im, v: ImageEnhance.Brightness(im).enhance(v),
    "Color": lambda im, v: ImageEnhance.Color(im).enhance(v),
    "Contrast": lambda im, v: ImageEnhance.Contrast(im).enhance(v),
    "Equalize": lambda im, v: ImageOps.equalize(im),
    "Identity": lambda im, v: im,
    "Posterize": lambda im, v: ImageOps.posterize(im, int(v)),
    "Rotate": lambda im, v: im.rotate(v),
    "Sharpness": lambda im, v: ImageEnhance.Sharpness(im).enhance(v),
    "ShearX": lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
    "ShearY": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
    "Solarize": lambda im, v: ImageOps.solarize(im, v),
    "TranslateX": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, v * im.size[0], 0, 1, 0)),
    "TranslateY": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1])),
}


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def pil_cutout(image: Image.Image, side: float, cx: float, cy: float) -> Image.Image:
    """The reference's CutoutAbs with a given centre: shift at top/left, PIL's inclusive rectangle."""
    if side <= 0:
        return image
    w, h = image.size
    x0, y0 = int(max(0, cx - side / 2.0)), int(max(0, cy - side / 2.0))
    image = image.copy()
    ImageDraw.Draw(image).rectangle((x0, y0, min(w, x0 + side), min(h, y0 + side)), CUTOUT_FILL)
    return image


def sample_images(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """uint8 [5, 3, h, w]: noise, low-contrast noise, a smooth image, a constant and a two-level image."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 5, generator=g), size=(h, w), mode="bilinear")
    return torch.stack([
        torch.randint(0, 256, (3, h, w), generator=g).to(torch.uint8),
        torch.randint(100, 141, (3, h, w), generator=g).to(torch.uint8),
        (smooth[0] * 255).to(torch.uint8),
        torch.full((3, h, w), 77, dtype=torch.uint8),
        (torch.randint(0, 2, (3, h, w), generator=g) * 180 + 30).to(torch.uint8),
    ])



def op_values(name: str, seed: int = 0):
    """Both range ends, the middle and five uniform draws of the op's value range."""
    low, high = RANGES[name]
    draws = torch.rand(5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [low, high, (low + high) / 2] + (low + (high - low) * draws).tolist()


def one_op(name: str, value: float, rows: int = 1) -> StrongParams:
    """Parameters applying op ``name`` with ``value`` then Identity, and no Cutout (side 0)."""
    ops = torch.tensor([[OPS.index(name), IDENTITY]] * rows)
    values = torch.tensor([[value, 0.0]] * rows, dtype=torch.float64)
    return StrongParams(ops, values, torch.tensor([[0.0, 1.0, 1.0]] * rows, dtype=torch.float64))


def ks_uniform(samples, low: float, high: float) -> float:
    """One-sample Kolmogorov-Smirnov statistic of ``samples`` against U[low, high]."""
    x = np.sort((np.asarray(samples, dtype=np.float64) - low) / (high - low))
    n = len(x)
    i = np.arange(1, n + 1)
    return float(max((i / n - x).max(), (x - (i - 1) / n).max()))


def ks_two(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max())


# ------------------------------------------------------------------------------------------ op by op vs PIL

@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", POINT)
def test_point_and_colour_ops_equal_pil(name, size):
    """Exactly PIL's pixels: integer LUTs, PIL's integer greyscale and Contrast mean, Image.blend's float32
    arithmetic, the SMOOTH filter's float32 summation order (max difference 0, so no tolerance)."""
    for image in sample_images(*size, seed=OPS.index(name)):
        for value in op_values(name, seed=size[1]):
            ours = apply_image(image, one_op(name, value))
            reference = from_pil(PIL_OPS[name](to_pil(image), value))
            assert torch.equal(ours, reference), (name, size, value, (ours.int() - reference.int()).abs().max())


def test_enhance_blends_in_float32_like_pil():
    """``Image.blend`` computes ``in1 + f * (in2 - in1)`` in C float: at f = 0.67142856..., 70 -> 47 (the
    float64 product 46.99999... would truncate to 46)."""
    image = torch.tensor([70, 140, 210, 193], dtype=torch.uint8).view(1, 1, 4).expand(3, 1, 4).contiguous()
    value = 0.6714285604310007
    ours = apply_image(image, one_op("Brightness", value))
    assert ours[0, 0].tolist() == [47, 94, 141, 129]
    assert torch.equal(ours, from_pil(PIL_OPS["Brightness"](to_pil(image), value)))


@pytest.mark.parametrize("size", SIZES + [(31, 33)])
@pytest.mark.parametrize("name", GEOMETRY)
def test_geometry_ops_match_pil(name, size):
    """The spec allows 1% of pixels off by nearest-rounding boundaries; replaying PIL's 16.16 fixed-point
    affine (Rotate, Shear) and its float translation gives none on these images and values."""
    values = op_values(name, seed=size[1]) + op_values(name, seed=size[0] + 100)
    for image in sample_images(*size, seed=7)[:3]:
        for value in values:
            ours = apply_image(image, one_op(name, value))
            reference = from_pil(PIL_OPS[name](to_pil(image), value))
            mismatch = (ours != reference).any(0).float().mean().item()
            assert mismatch <= 0.01, (name, size, value, mismatch)
            assert mismatch == 0, (name, size, value, mismatch)


def test_rotate_turns_about_the_centre_counter_clockwise_and_fills_black():
    """A bar from the centre to the right turns up for +30 degrees and down for -30 (PIL's sense); the
    centre pixel stays; a corner turns out of the image and black comes in."""
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, 16, 16:29] = 255
    image[:, 0, 0] = 200
    up, down = (apply_image(image, one_op("Rotate", v))[0] for v in (30.0, -30.0))
    for out in (up, down):
        assert out[16, 16] == 255 and out[0, 0] == 0 and out.max() == 255
    assert up[:16, 17:].sum() > 0 and up[17:, 17:].sum() == 0
    assert down[17:, 17:].sum() > 0 and down[:16, 17:].sum() == 0


@pytest.mark.parametrize("size", SIZES + [(40, 24)])
def test_cutout_equals_pil_rectangle(size):
    h, w = size
    params = draw_params(400, h, w, generator=torch.Generator().manual_seed(h * w))
    images = sample_images(h, w, seed=3)[torch.arange(400) % 5]
    ours = cutout(images, params.cutout)
    for i in range(400):
        side, cx, cy = params.cutout[i].tolist()
        assert torch.equal(ours[i], from_pil(pil_cutout(to_pil(images[i]), side, cx, cy))), (size, side, cx, cy)


@pytest.mark.parametrize("size, box, rows, cols", [
    ((32, 32), (10.3, 16.0, 16.0), (10, 20), (10, 20)),  # inside: floor(10.3) + 1 = 11 px
    ((32, 32), (16.0, 1.0, 1.0), (0, 16), (0, 16)),  # top/left: shifted to 0, not shrunk: 17 px
    ((32, 32), (10.3, 32.0, 32.0), (26, 31), (26, 31)),  # bottom/right: clipped to 6 px
    ((24, 40), (19.9, 20.0, 20.0), (10, 23), (10, 29)),  # side from W; clipped at the bottom only
])
def test_cutout_box_rule(size, box, rows, cols):
    out = cutout(torch.zeros(1, 3, *size, dtype=torch.uint8), torch.tensor([box], dtype=torch.float64))[0]
    filled = (out == torch.tensor(CUTOUT_FILL, dtype=torch.uint8).view(3, 1, 1)).all(0)
    expected = torch.zeros(size, dtype=torch.bool)
    expected[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
    assert torch.equal(filled, expected)
    assert torch.equal(out[:, ~filled], torch.zeros_like(out[:, ~filled]))  # nothing else touched


@pytest.mark.parametrize("size", SIZES)
def test_cutout_side_is_floor_plus_one_unless_clipped(size):
    h, w = size
    params = draw_params(3000, h, w, generator=torch.Generator().manual_seed(5))
    out = cutout(torch.zeros(3000, 3, h, w, dtype=torch.uint8), params.cutout)
    filled = (out == torch.tensor(CUTOUT_FILL, dtype=torch.uint8).view(1, 3, 1, 1)).all(1)
    assert torch.equal((out != 0).any(1), filled)  # exactly the fill colour, in all three channels
    side, cx, cy = params.cutout.unbind(1)
    x0, y0 = (cx - side / 2).clamp(min=0).floor(), (cy - side / 2).clamp(min=0).floor()
    width, height = filled.any(1).sum(1), filled.any(2).sum(1)
    first_col = torch.where(width > 0, filled.any(1).float().argmax(1), -1)
    assert torch.equal(first_col, x0.long())  # starts at max(0, int(cx - v/2)): shifted at the left
    assert torch.equal(width, torch.minimum(side.floor() + 1, w - x0).long())
    assert torch.equal(height, torch.minimum(side.floor() + 1, h - y0).long())
    assert (width == side.floor() + 1).float().mean() > 0.5  # most boxes are not clipped


# ------------------------------------------------------------------------------------------ batched == per image

def per_image(images: torch.Tensor, params: StrongParams) -> torch.Tensor:
    return torch.stack([apply_image(image, params, row) for row, image in enumerate(images)])


@pytest.mark.parametrize("size", SIZES)
def test_batched_equals_per_image_for_every_op(size):
    """Slot 0: op k on every image with values across its range (ends included); slot 1: a random op,
    so each op also runs on a gathered subset; then random Cutouts."""
    g = torch.Generator().manual_seed(size[1])
    images = sample_images(*size, seed=1)[torch.arange(12) % 5]
    for op, name in enumerate(OPS):
        low, high = RANGES[name]
        params = draw_params(12, *size, generator=g)
        params.ops[:, 0] = op
        params.values[:, 0] = torch.linspace(low, high, 12, dtype=torch.float64)
        params.ops[::3, 1] = op  # the same op again in slot 1 for a subset (with replacement)
        assert torch.equal(apply(images, params), per_image(images, params)), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_equals_per_image_on_a_random_draw(seed):
    h, w = SIZES[seed % 2]
    images = sample_images(h, w, seed=seed)[torch.arange(64) % 5]
    params = draw_params(64, h, w, generator=torch.Generator().manual_seed(seed))
    out = apply(images, params)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, per_image(images, params))


def test_apply_leaves_its_input_alone_and_checks_shapes():
    images = sample_images(32, 32)
    before = images.clone()
    params = draw_params(5, 32, 32, generator=torch.Generator().manual_seed(0))
    params.ops[:] = OPS.index("Solarize")  # the whole batch takes the same op in both slots
    apply(images, params)
    assert torch.equal(images, before)
    with pytest.raises(ValueError, match="uint8"):
        apply(images.float(), params)
    with pytest.raises(ValueError, match="rows"):
        apply(images[:4], params)
    with pytest.raises(ValueError, match="uint8"):
        FixMatchRandAugment()(images[0, :1])


def test_apply_loops_over_slots_and_ops_not_images(monkeypatch):
    """At most 2 slots x 13 non-Identity kernel calls for a batch of 300; one image takes 2 calls."""
    calls = []
    counted = tuple((lambda x, v, k=kernel: calls.append(len(x)) or k(x, v)) for kernel in ra.KERNELS)
    monkeypatch.setattr(ra, "KERNELS", counted)
    params = draw_params(300, 8, 8, generator=torch.Generator().manual_seed(0))
    apply(torch.zeros(300, 3, 8, 8, dtype=torch.uint8), params)
    assert len(calls) <= 2 * (len(OPS) - 1) and sum(calls) == int((params.ops != IDENTITY).sum())
    calls.clear()
    apply_image(torch.zeros(3, 8, 8, dtype=torch.uint8), params, 0)
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------ distributions

@pytest.fixture(scope="module")
def many_params() -> StrongParams:
    return draw_params(100_000, 24, 40, generator=torch.Generator().manual_seed(2024))


def test_ops_uniform_with_replacement(many_params):
    ops = many_params.ops
    assert ops.dtype == torch.int64 and ops.shape == (100_000, 2)
    n, p = len(ops), 1 / len(OPS)
    sigma = math.sqrt(p * (1 - p) / n)
    for slot in range(2):
        freq = torch.bincount(ops[:, slot], minlength=len(OPS)).double() / n
        assert len(freq) == len(OPS) and ((freq - p).abs() <= 3 * sigma).all(), (slot, freq)
    repeats = (ops[:, 0] == ops[:, 1]).double().mean().item()  # with replacement: 1/14
    assert abs(repeats - p) <= 3 * sigma, repeats


def test_values_uniform_over_each_range(many_params):
    ops, values = many_params.ops.flatten(), many_params.values.flatten()
    assert many_params.values.dtype == torch.float64
    for op, name in enumerate(OPS):
        low, high = RANGES[name]
        drawn = values[ops == op].numpy()
        assert drawn.min() >= low and drawn.max() <= high, name
        assert ks_uniform(drawn, low, high) < ks_critical(len(drawn), tests=len(OPS)), name
    brightness = values[ops == OPS.index("Brightness")].numpy()
    assert ks_uniform(brightness, 0.05, 0.9) > ks_critical(len(brightness), tests=len(OPS))  # it has power


def test_posterize_bits_uniform_on_4_to_7(many_params):
    bits = many_params.values[many_params.ops == OPS.index("Posterize")].trunc().long()
    assert set(bits.tolist()) == {4, 5, 6, 7}
    freq = torch.bincount(bits, minlength=8)[4:].double() / len(bits)
    assert ((freq - 0.25).abs() <= 3 * math.sqrt(0.25 * 0.75 / len(bits))).all(), freq


def test_cutout_parameters(many_params):
    """Side U[0, 0.5) * W; centre as the reference's numpy ``uniform(W)``: uniform on (1, W] (and (1, H])."""
    side, cx, cy = many_params.cutout.unbind(1)
    h, w = 24, 40
    assert many_params.cutout.dtype == torch.float64
    assert side.min() >= 0 and side.max() < 0.5 * w and cx.min() > 1 and cx.max() <= w and cy.max() <= h
    crit = ks_critical(len(side), tests=3)
    assert ks_uniform(side.numpy(), 0, 0.5 * w) < crit
    assert ks_uniform(cx.numpy(), 1, w) < crit and ks_uniform(cy.numpy(), 1, h) < crit
    assert ks_uniform(cx.numpy(), 0, w) > crit  # not U[0, W)


def smooth_images(count: int, h: int = 32, w: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    low = torch.rand(count, 3, 4, 4, generator=g) * 0.8 + 0.1
    return (torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear") * 255).to(torch.uint8)


def output_stats(images: torch.Tensor):
    """Per image: the fraction of Cutout-coloured pixels and the mean brightness."""
    filled = (images == torch.tensor(CUTOUT_FILL, dtype=torch.uint8).view(1, 3, 1, 1)).all(1)
    return filled.double().mean((1, 2)).numpy(), images.double().mean((1, 2, 3)).numpy()


def test_two_implementations_agree_in_distribution():
    """Batched (generator seed 11) and per image (global RNG seed 12) on the same 600 images: the
    fraction of Cutout pixels and the mean brightness pass a two-sample KS test at alpha = 0.001; a
    pipeline without the RandAugment ops, and one with a smaller Cutout, fail it."""
    images = smooth_images(600)
    batched = apply(images, draw_params(600, 32, 32, generator=torch.Generator().manual_seed(11)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12)
        augment = FixMatchRandAugment()
        looped = torch.stack([augment(image) for image in images])
    crit = ks_critical(600 // 2, tests=2)
    (fill_a, mean_a), (fill_b, mean_b) = output_stats(batched), output_stats(looped)
    assert ks_two(fill_a, fill_b) < crit and ks_two(mean_a, mean_b) < crit
    assert 0.05 < fill_a.mean() < 0.12  # E[(floor(v)+1)^2] / 1024 with v ~ U[0, 16), less the clipping
    plain = draw_params(600, 32, 32, generator=torch.Generator().manual_seed(13))
    plain.ops[:] = IDENTITY
    assert ks_two(mean_a, output_stats(apply(images, plain))[1]) > crit
    plain.cutout[:, 0] /= 2
    assert ks_two(fill_a, output_stats(apply(images, plain))[0]) > crit


# ------------------------------------------------------------------------------------------ seeding

def test_same_generator_seed_same_output():
    images = sample_images(24, 40)[torch.arange(40) % 5]
    runs = [apply(images, draw_params(40, 24, 40, generator=torch.Generator().manual_seed(s))) for s in (4, 4, 5)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_per_image_global_rng_is_reproducible():
    """Under ``torch.manual_seed(s)`` (the image-folder loader seeds each sample so, inside fork_rng) the
    per-image transform repeats exactly, draws what ``draw_params(1, H, W, Generator(s))`` draws, and a
    ``generator`` argument leaves the global RNG alone."""
    image = sample_images(32, 32)[2]
    outputs = []
    for seed in (7, 7, 8):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            outputs.append(torch.stack([FixMatchRandAugment()(image) for _ in range(6)]))
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
    expected = apply_image(image, draw_params(1, 32, 32, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(outputs[0][0], expected)
    state = torch.random.get_rng_state()
    seeded = [FixMatchRandAugment(torch.Generator().manual_seed(3))(image) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state) and torch.equal(seeded[0], seeded[1])


def test_works_as_a_torchvision_v2_step():
    from torchvision.transforms import v2

    pipeline = v2.Compose([v2.RandomHorizontalFlip(), FixMatchRandAugment(), v2.ToDtype(torch.float32, scale=True)])
    out = pipeline(sample_images(24, 40)[0])
    assert out.dtype == torch.float32 and out.shape == (3, 24, 40) and 0 <= out.min() <= out.max() <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    images = sample_images(32, 32)[torch.arange(128) % 5]
    params = draw_params(128, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = apply(images, params)
    assert torch.equal(apply(images.cuda(), params).cpu(), expected)  # CPU parameters: no device syncs
    on_device = StrongParams(*(t.cuda() for t in params))
    mismatch = (apply(images.cuda(), on_device).cpu() != expected).any(1).float().mean().item()
    assert mismatch < 1e-3  # CUDA cos/sin may move a rotation coefficient by one 1/65536 step
