"""Base distiller: SRe2L / CDA "recover" -- invert a frozen BatchNorm teacher into synthetic images.

    recover(teacher, classes_in_batch, *, norm, image_size, channels, iterations, lr, r_bn,
            jitter, cda=True, init_images=None, generator=None) -> uint8 B x C x H x W

One call synthesises one batch holding one image per entry of `classes_in_batch`. The images are
optimised in normalised space with Adam (betas 0.5, 0.9) and a cosine learning rate from `lr` to 0.
Each step: random roll jitter (up to `jitter` pixels in x and y), with cda=True a RandomResizedCrop
whose minimum scale anneals 1.0 -> 0.08 with a cosine over the iterations (CDA; cda=False: no crop,
SRe2L at low resolution), a random horizontal flip per image, then

    loss = CE(teacher(x), y) + r_bn * sum_BN (||mu_batch - mu_running||_2 + ||var_batch - var_running||_2)

with the batch statistics of every BatchNorm2d input captured by forward hooks; after the step the
images are clipped to the valid pixel range.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ccfs_dist.training.augment import _rand, _stats, denormalize_to_uint8, normalize, randn_cpu, resized_crop_flip
from ccfs_dist.errors import ConfigError

CDA_SCALE_END = 0.08


class _BNStatsLoss:
    """Forward hooks on every BatchNorm2d accumulating ||mu - running_mu|| + ||var - running_var||."""

    def __init__(self, model):
        self.terms = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, nn.BatchNorm2d)]

    def _hook(self, module, inputs, output):
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.terms.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

    def pop(self):
        total = sum(self.terms) if self.terms else torch.zeros(())
        self.terms = []
        return total

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def cda_min_scale(step, iterations, start=1.0, end=CDA_SCALE_END):
    """CDA curriculum: the RandomResizedCrop minimum scale at `step`, cosine from start to end."""
    t = step / max(iterations - 1, 1)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def _randint(low, high, generator, device):
    """Integer uniform in [low, high] from `generator` (a CPU generator, as every draw: augment._rand)."""
    u = _rand((1,), generator, "cpu").item()
    return low + min(int(u * (high - low + 1)), high - low)


def recover(teacher, classes_in_batch, *, norm, image_size, channels, iterations, lr, r_bn, jitter,
            cda=True, init_images=None, generator=None):
    """Synthesise one image per class in `classes_in_batch` from the frozen `teacher` (see module doc).

    `teacher` must contain BatchNorm2d layers; its device is used. `init_images` (uint8, B x C x H x W)
    replaces the Gaussian-noise start. `generator` (a CPU torch.Generator) gives every random number: the
    noise, the jitter, the crops and flips (drawn on the CPU, so the same on every device). Returns uint8
    images B x channels x image_size x image_size.
    """
    bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        raise ConfigError(
            "the base distiller (SRe2L/CDA recover) needs a teacher with BatchNorm layers: set "
            "model.norm: batchnorm for the teacher, or give already distilled images with data.distilled")
    try:
        device = next(teacher.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    targets = torch.as_tensor(classes_in_batch, dtype=torch.long).reshape(-1).to(device)
    b = targets.numel()
    if b == 0:
        return torch.zeros(0, channels, image_size, image_size, dtype=torch.uint8)
    mean_t, std_t = _stats(*norm, channels, device)
    lo, hi = (0.0 - mean_t) / std_t, (1.0 - mean_t) / std_t

    if init_images is not None:
        if tuple(init_images.shape) != (b, channels, image_size, image_size):
            raise ValueError(f"init_images has shape {tuple(init_images.shape)}, expected "
                             f"{(b, channels, image_size, image_size)}")
        x = normalize(init_images.to(device), *norm)
    else:
        x = randn_cpu((b, channels, image_size, image_size), generator, device)
    x = x.clone().requires_grad_(True)

    opt = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9), eps=1e-8)
    was_training = teacher.training
    grad_flags = [(p, p.requires_grad) for p in teacher.parameters()]
    teacher.eval()
    for p, _ in grad_flags:
        p.requires_grad_(False)
    hooks = _BNStatsLoss(teacher)
    try:
        for step in range(iterations):
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / iterations))
            xs = x
            if jitter > 0:
                dx = _randint(-jitter, jitter, generator, device)
                dy = _randint(-jitter, jitter, generator, device)
                xs = torch.roll(xs, shifts=(dy, dx), dims=(2, 3))
            if cda:
                # separable resampling: a deterministic backward pass on CUDA
                xs = resized_crop_flip(xs, image_size, scale_min=cda_min_scale(step, iterations),
                                       flip=True, generator=generator, separable=True)
            else:
                flips = _rand((b,), generator, device) < 0.5
                xs = torch.where(flips.view(b, 1, 1, 1), xs.flip(3), xs)
            hooks.pop()
            logits = teacher(xs)
            loss = F.cross_entropy(logits, targets) + r_bn * hooks.pop()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
    finally:
        hooks.remove()
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        teacher.train(was_training)
    return denormalize_to_uint8(x, *norm).cpu()
