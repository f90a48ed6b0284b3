"""Batched on-device augmentation: RandomResizedCrop + horizontal flip as one affine grid_sample.

    normalize(x_uint8, mean, std) -> float tensor
    Augment(norm, size, scale_min=0.08, flip=True, ratio=(3/4, 4/3), crop='resized', padding=4)(x, generator=None)
    resized_crop_flip(x, size, scale_min, ...)   (float, differentiable; used by the base distiller)
    crop_boxes(batch, height, width, ...)        (the random boxes, exposed for tests)
    pad_boxes / pad_crop                         (RandomCrop(size, padding) + flip: the CIFAR teacher's recipe)

Every sample gets its own crop box and flip; the whole batch is resampled by a single
`affine_grid` + `grid_sample` (bilinear, align_corners=False, border padding) on the input's device,
with no Python loop over samples. Randomness comes from an optional torch.Generator on the CPU (the
numbers are drawn there and moved to the images' device), so runs are reproducible, and equal on every
device.

Crop sampling follows torchvision's RandomResizedCrop: area = scale * H * W with scale uniform in
[scale_min, scale_max], aspect ratio w/h log-uniform in `ratio`. Instead of torchvision's rejection
loop (and its central-crop fallback), the aspect ratio is clamped to the range in which a box of that
area fits inside the image ([area / H^2, W^2 / area]), so the area is always honoured; with
scale_min = 1 the box is the full image, as with torchvision. The box position is uniform over the
positions that keep it inside the image (continuous, not integer pixels). Downscaling is bilinear
without antialiasing. `separable=True` computes the same resampling as two batched matrix products,
whose backward pass is deterministic on CUDA (grid_sample's backward is not).
"""
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F


def _stats(mean, std, channels, device):
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device).reshape(-1)
    std = torch.as_tensor(std, dtype=torch.float32, device=device).reshape(-1)
    if mean.numel() == 1:
        mean = mean.expand(channels)
    if std.numel() == 1:
        std = std.expand(channels)
    if mean.numel() != channels or std.numel() != channels:
        raise ValueError(f"mean/std have {mean.numel()}/{std.numel()} values but the images have "
                         f"{channels} channel(s)")
    return mean.view(1, channels, 1, 1), std.view(1, channels, 1, 1)


def normalize(x_uint8, mean, std):
    """uint8 B x C x H x W -> float32 (x / 255 - mean) / std per channel, on the same device.

    Computed as x * (1 / (255 std)) - mean / std: one conversion and one fused multiply-add instead of
    four passes, with the per-channel constants made once per (mean, std, channels, device)."""
    shift, scale = _affine(_floats(mean), _floats(std), x_uint8.shape[1], x_uint8.device)
    return torch.addcmul(shift, x_uint8.float(), scale)


def _floats(values):
    """A hashable tuple of floats from a number, a sequence, an array or a tensor."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    return tuple(float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1))


@functools.lru_cache(maxsize=64)
def _affine(mean, std, channels, device):
    mean_t, std_t = _stats(mean, std, channels, device)
    return -mean_t / std_t, 1.0 / (255.0 * std_t)


def denormalize_to_uint8(x, mean, std):
    """Inverse of normalize: float normalised images -> uint8 (rounded, clamped to 0..255)."""
    mean_t, std_t = _stats(mean, std, x.shape[1], x.device)
    return ((x.detach().float() * std_t + mean_t) * 255.0).round().clamp(0, 255).to(torch.uint8)


def _rand(shape, generator, device):
    """Uniform [0, 1) numbers drawn on the CPU from `generator` (a CPU torch.Generator; None: torch's
    global CPU generator), returned on `device`.

    Every random number of a recipe passes through here (or randn_cpu), so it is the same whatever device
    the training runs on: a CUDA generator's values depend on the kernel's launch grid, which torch sizes
    by the GPU's SM count (one seed gives other crops on another GPU model)."""
    return torch.rand(shape, generator=_cpu(generator)).to(device)


def randn_cpu(shape, generator, device):
    """Standard normal numbers drawn on the CPU from `generator` (as _rand), returned on `device`."""
    return torch.randn(shape, generator=_cpu(generator)).to(device)


def _cpu(generator):
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"random draws come from a CPU generator (the same numbers on every device), "
                         f"got one on {generator.device}")
    return generator


def crop_boxes(batch, height, width, scale_min=0.08, ratio=(3 / 4, 4 / 3), scale_max=1.0,
               generator=None, device="cpu", flip=False):
    """Random crop boxes: (boxes B x 4 float [x0, y0, w, h] in pixels, flips B bool).

    `flips` is all False when flip=False. See the module docstring for the sampling rule. The boxes are
    computed on the CPU and moved to `device`: their arithmetic (exp, sqrt) too is then the same on every
    device, not only the random numbers.
    """
    u = _rand((batch, 5), generator, "cpu")
    area_full = float(height * width)
    scale = scale_min + (scale_max - scale_min) * u[:, 0]
    area = scale * area_full
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    # clamp the aspect ratio so that a box of this area fits: w = sqrt(A r) <= W, h = sqrt(A / r) <= H
    r = torch.minimum(torch.maximum(r, area / height ** 2), width ** 2 / area)
    w = torch.sqrt(area * r).clamp(max=float(width))
    h = torch.sqrt(area / r).clamp(max=float(height))
    x0 = (width - w) * u[:, 2]
    y0 = (height - h) * u[:, 3]
    flips = (u[:, 4] < 0.5) if flip else torch.zeros(batch, dtype=torch.bool)
    return torch.stack([x0, y0, w, h], dim=1).to(device), flips.to(device)


def _interp_matrix(start, length, n_in, size, flips):
    """Bilinear resampling matrices B x size x n_in for the 1-D windows [start, start + length)."""
    o = (torch.arange(size, device=start.device, dtype=torch.float32) + 0.5) / size  # B-independent
    t = o.unsqueeze(0) * length.unsqueeze(1)                                        # B x size
    if flips is not None:
        t = torch.where(flips.unsqueeze(1), length.unsqueeze(1) - t, t)
    src = (start.unsqueeze(1) + t - 0.5).clamp(0, n_in - 1)  # border padding, as in grid_sample
    i0 = src.floor()
    frac = src - i0
    i0 = i0.long()
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return ((1 - frac).unsqueeze(2) * F.one_hot(i0, n_in) + frac.unsqueeze(2) * F.one_hot(i1, n_in))


def apply_boxes(x, boxes, size, flips=None, separable=False):
    """Resample each image's box (x0, y0, w, h in pixels) to size x size, mirrored where flips.

    separable=False: one affine_grid + grid_sample. separable=True: the same bilinear resampling
    written as two batched matrix products (rows, then columns), whose backward pass is deterministic
    on CUDA (grid_sample's backward uses atomic adds); the base distiller uses it.
    """
    b, c, height, width = x.shape
    x0, y0, w, h = boxes.to(x.device, torch.float32).unbind(1)
    if flips is not None:
        flips = flips.to(x.device)
    if separable:
        rows = _interp_matrix(y0, h, height, size, None).to(x.dtype)       # B x size x H
        cols = _interp_matrix(x0, w, width, size, flips).to(x.dtype)       # B x size x W
        return torch.matmul(torch.matmul(rows.unsqueeze(1), x), cols.transpose(1, 2).unsqueeze(1))
    ax = w / width
    ay = h / height
    if flips is not None:
        ax = torch.where(flips, -ax, ax)
    # output normalised coordinate o in [-1, 1] -> input coordinate a * o + b (align_corners=False)
    bx = (2 * x0 + w) / width - 1
    by = (2 * y0 + h) / height - 1
    zero = torch.zeros_like(ax)
    theta = torch.stack([torch.stack([ax, zero, bx], 1), torch.stack([zero, ay, by], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resized_crop_flip(x, size, scale_min=0.08, ratio=(3 / 4, 4 / 3), flip=True, generator=None,
                      scale_max=1.0, separable=False):
    """RandomResizedCrop + flip of a float batch (differentiable w.r.t. x; see apply_boxes)."""
    if not torch.is_floating_point(x):
        raise TypeError("resized_crop_flip takes float images; use Augment for uint8 batches")
    boxes, flips = crop_boxes(x.shape[0], x.shape[2], x.shape[3], scale_min=scale_min, ratio=ratio,
                              scale_max=scale_max, generator=generator, device=x.device, flip=flip)
    return apply_boxes(x, boxes, size, flips, separable=separable)


def pad_boxes(batch, height, width, padding, generator=None, device="cpu", flip=False):
    """Random offsets of torchvision's RandomCrop((height, width), padding): boxes B x 4 [x0, y0, w, h]
    in pixels of the unpadded image (x0, y0 integers in [-padding, padding]) and flips B bool; computed on
    the CPU and moved to `device`, as crop_boxes."""
    u = _rand((batch, 3), generator, "cpu")
    offsets = (u[:, :2] * (2 * padding + 1)).floor().clamp(max=2 * padding) - padding
    size = torch.tensor([width, height], dtype=torch.float32).expand(batch, 2)
    flips = (u[:, 2] < 0.5) if flip else torch.zeros(batch, dtype=torch.bool)
    return torch.cat([offsets, size], dim=1).to(device), flips.to(device)


def pad_crop(x, boxes, padding, flips=None):
    """Crop each image of x (B x C x H x W, any dtype) at its integer box, reading zeros outside the
    image (torchvision pads with 0, i.e. black before normalisation), mirrored where flips."""
    b, c, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    x0 = boxes[:, 0].to(x.device).long() + padding
    y0 = boxes[:, 1].to(x.device).long() + padding
    cols = x0.unsqueeze(1) + torch.arange(width, device=x.device)                # B x W
    if flips is not None:
        cols = torch.where(flips.to(x.device).unsqueeze(1), cols.flip(1), cols)
    rows = y0.unsqueeze(1) + torch.arange(height, device=x.device)               # B x H
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows.unsqueeze(2), cols.unsqueeze(1)].permute(0, 3, 1, 2)


class Augment:
    """Training augmentation of uint8 batches on their device, normalised: RandomResizedCrop + flip
    (crop "resized"), or RandomCrop with zero padding + flip (crop "pad").

    A float input is taken as already normalised and only cropped/flipped (crop "resized").
    `draw` makes the random views of a number of samples, `apply` applies them to a uint8 batch.
    """

    def __init__(self, norm, size, scale_min=0.08, flip=True, ratio=(3 / 4, 4 / 3), crop="resized",
                 padding=4):
        if crop not in ("resized", "pad"):
            raise ValueError(f"crop must be 'resized' or 'pad', got {crop!r}")
        if not 0.0 < scale_min <= 1.0:
            raise ValueError(f"scale_min must lie in (0, 1], got {scale_min}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {ratio}")
        self.norm = norm   # (mean, std) per channel: a data.pool.Norm
        self.size = int(size)
        self.scale_min = float(scale_min)
        self.flip = bool(flip)
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.crop = crop
        self.padding = int(padding)

    def draw(self, samples, height, width, generator, device):
        """(boxes, flips) of `samples` random views."""
        if self.crop == "pad":
            return pad_boxes(samples, height, width, self.padding, generator=generator, device=device, flip=self.flip)
        return crop_boxes(samples, height, width, scale_min=self.scale_min, ratio=self.ratio,
                          generator=generator, device=device, flip=self.flip)

    def apply(self, x_uint8, boxes, flips):
        """The normalised float views `boxes`/`flips` (from `draw`) of the uint8 batch."""
        if self.crop == "pad":   # pad with black, then normalise, as RandomCrop before Normalize does
            return normalize(pad_crop(x_uint8, boxes, self.padding, flips), *self.norm)
        return apply_boxes(normalize(x_uint8, *self.norm), boxes, self.size, flips)

    def __call__(self, x, generator=None):
        if x.dtype == torch.uint8:
            if self.crop == "pad":
                boxes, flips = self.draw(len(x), x.shape[2], x.shape[3], generator, x.device)
                return self.apply(x, boxes, flips)
            x = normalize(x, *self.norm)
        elif not torch.is_floating_point(x) or self.crop == "pad":   # pad: black is known only for uint8
            raise TypeError(f"Augment takes uint8 (or, crop 'resized', normalised float) images, got {x.dtype}")
        return resized_crop_flip(x, self.size, scale_min=self.scale_min, ratio=self.ratio,
                                 flip=self.flip, generator=generator)

    def __repr__(self):
        if self.crop == "pad":
            return f"Augment(size={self.size}, crop='pad', padding={self.padding}, flip={self.flip})"
        return (f"Augment(size={self.size}, scale_min={self.scale_min}, ratio={self.ratio}, "
                f"flip={self.flip})")
