"""ccfs_dist.training.augment: batched RandomResizedCrop + flip on the device, reproducible, exact geometry."""

import pytest
import torch
import torch.nn.functional as F

from ccfs_dist.data.pool import Norm
from ccfs_dist.training.augment import Augment, apply_boxes, crop_boxes, normalize, resized_crop_flip

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
NORM = Norm(MEAN, STD)


def images(b=8, c=3, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


def test_normalize_values():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    out = normalize(x, MEAN, STD)
    expected = torch.tensor([(0 - 0.5) / 0.2, (0.2 - 0.4) / 0.25, (1.0 - 0.3) / 0.3])
    assert out.dtype == torch.float32
    assert torch.allclose(out.view(3), expected, atol=1e-6)
    # one value broadcasts over channels
    assert torch.allclose(normalize(x, [0.5], [0.5]).view(3), torch.tensor([-1.0, -0.6, 1.0]), atol=1e-6)


devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", devices)
def test_shape_dtype_device(device):
    x = images().to(device)
    out = Augment(NORM, size=12)(x, generator=torch.Generator(device=device).manual_seed(0))
    assert out.shape == (8, 3, 12, 12) and out.dtype == torch.float32 and out.device.type == device
    # a CPU generator drives a batch on any device
    out2 = Augment(NORM, size=12)(x, generator=torch.Generator().manual_seed(0))
    assert out2.device.type == device
    # float input is taken as already normalised
    out3 = Augment(NORM, size=12)(normalize(x, MEAN, STD), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out2, out3, atol=1e-5)


def test_reproducible_with_seeded_generator():
    aug = Augment(NORM, size=16)
    x = images()
    a = aug(x, generator=torch.Generator().manual_seed(3))
    b = aug(x, generator=torch.Generator().manual_seed(3))
    c = aug(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # per-sample randomness: identical inputs in one batch get different crops
    same = images(b=1).expand(8, -1, -1, -1)
    out = aug(same, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("size", [16, 8, 32])
def test_identity_when_no_crop_and_no_flip(size):
    x = images(h=16, w=16)
    out = Augment(NORM, size=size, scale_min=1.0, flip=False)(x, generator=torch.Generator().manual_seed(0))
    ref = normalize(x, MEAN, STD)
    if size != 16:
        ref = F.interpolate(ref, size=(size, size), mode="bilinear", align_corners=False)
    assert torch.allclose(out, ref, atol=1e-4)


def test_identity_non_square_image_full_box():
    # scale 1 with the default ratio range still means the whole (non-square) image
    x = images(h=12, w=16)
    out = Augment(NORM, size=8, scale_min=1.0, flip=False)(x)
    ref = F.interpolate(normalize(x, MEAN, STD), size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(out, ref, atol=1e-4)


def test_flip_actually_flips():
    x = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    x[..., :3] = 255  # bright stripe on the left
    out = Augment(Norm([0.0], [1.0]), size=8, scale_min=1.0, flip=True)(x, generator=torch.Generator().manual_seed(0))
    ref = normalize(x, [0.0], [1.0])
    plain = (out - ref).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (out - ref.flip(3)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((plain | mirrored).all())
    assert 10 < int(mirrored.sum()) < 54 and 10 < int(plain.sum()) < 54


def test_crop_geometry_exact():
    # column-index ramp: a pixel-aligned box resampled at its own size gives back exactly those columns
    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(2, 1, 16, 16).contiguous()
    boxes = torch.tensor([[4.0, 2.0, 8.0, 8.0], [0.0, 0.0, 8.0, 8.0]])
    out = apply_boxes(ramp, boxes, size=8, flips=torch.tensor([False, True]))
    assert torch.allclose(out[0, 0, 0], torch.arange(4.0, 12.0))
    assert torch.allclose(out[1, 0, 0], torch.arange(7.0, -1.0, -1.0))


@pytest.mark.parametrize("scale_min", [0.08, 0.5])
def test_crop_boxes_respect_scale_ratio_and_bounds(scale_min):
    h, w = 20, 32
    boxes, flips = crop_boxes(4000, h, w, scale_min=scale_min, generator=torch.Generator().manual_seed(1), flip=True)
    x0, y0, bw, bh = boxes.unbind(1)
    area = bw * bh / (h * w)
    assert bool((area >= scale_min - 1e-4).all()) and bool((area <= 1 + 1e-4).all())
    assert area.max() > 0.9 and area.min() < scale_min + 0.05  # the whole range is used
    assert bool((x0 >= 0).all()) and bool((x0 + bw <= w + 1e-4).all())
    assert bool((y0 >= 0).all()) and bool((y0 + bh <= h + 1e-4).all())
    # the aspect ratio stays in the range where a box of that area fits inside the image
    ratio = bw / bh
    fits = (area * h * w / h ** 2 <= 3 / 4) & (w ** 2 / (area * h * w) >= 4 / 3)
    assert bool((ratio[fits] >= 3 / 4 - 1e-4).all()) and bool((ratio[fits] <= 4 / 3 + 1e-4).all())
    assert 0.4 < flips.float().mean() < 0.6


def test_full_image_when_scale_one_and_square_ratio():
    boxes, flips = crop_boxes(50, 16, 16, scale_min=1.0, ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(boxes, torch.tensor([0.0, 0.0, 16.0, 16.0]).expand(50, 4), atol=1e-4)
    assert not flips.any()


def test_crop_zooms_in():
    # column-index ramp: a box of at most 10 % of the area spans at most sqrt(0.1 * 32 * 32 * 4/3) < 12 columns
    ramp = torch.arange(32.0).view(1, 1, 1, 32).expand(64, 1, 32, 32).contiguous()
    out = resized_crop_flip(ramp, 8, scale_min=0.05, flip=False, scale_max=0.1,
                            generator=torch.Generator().manual_seed(0))
    assert out.shape == (64, 1, 8, 8)
    span = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    assert bool((span < 12).all())
    assert out.amin() < 4 and out.amax() > 27  # positions cover the image


def test_differentiable():
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    resized_crop_flip(x, 8, generator=torch.Generator().manual_seed(0)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError):
        Augment(NORM, 8, scale_min=0.0)
    with pytest.raises(ValueError, match="channel"):
        normalize(images(c=3), [0.5, 0.5], [0.2, 0.2])


@pytest.mark.parametrize("size", [8, 16, 24])
def test_separable_resampling_matches_grid_sample(size):
    # fractional, mirrored, up- and down-scaled boxes: same values and same gradients
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 3, 12, 16, generator=g)
    boxes, flips = crop_boxes(64, 12, 16, scale_min=0.08, generator=g, flip=True)
    grid_x = x.clone().requires_grad_(True)
    sep_x = x.clone().requires_grad_(True)
    a = apply_boxes(grid_x, boxes, size, flips)
    b = apply_boxes(sep_x, boxes, size, flips, separable=True)
    assert torch.allclose(a, b, atol=1e-5)
    w = torch.randn(a.shape, generator=g)
    (a * w).sum().backward()
    (b * w).sum().backward()
    assert torch.allclose(grid_x.grad, sep_x.grad, atol=1e-4)
