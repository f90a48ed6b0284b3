"""Networks: the ConvNet-D{depth} of the distillation literature, the CIFAR-style ResNet-18 used by
CCFS for filter and evaluation models, and any torchvision classifier; checkpoint loading.

    build_model(model_cfg, num_classes, channels, image_size) -> nn.Module
    load_checkpoint(model, path) -> model            (in place)
    state_dict_of(model) -> dict                     (plain state dict, DDP / torch.compile unwrapped)
"""
import contextlib
import os

import torch
import torch.nn as nn
import torchvision

from ccfs_dist.errors import ConfigError, DataError

NORMS = ("batchnorm", "instancenorm", "none")
# prefixes added by DistributedDataParallel / DataParallel and torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class ConvNet(nn.Module):
    """`depth` blocks of Conv3x3(width) -> norm -> ReLU -> AvgPool2d(2), then a linear classifier."""

    def __init__(self, num_classes, channels, image_size, width=128, depth=3, norm="instancenorm"):
        super().__init__()
        layers = []
        in_ch = channels
        for _ in range(depth):
            layers.append(nn.Conv2d(in_ch, width, kernel_size=3, padding=1))
            if norm == "batchnorm":
                layers.append(nn.BatchNorm2d(width))
            elif norm == "instancenorm":
                # the literature's "instancenorm": GroupNorm with one group per channel, affine
                layers.append(nn.GroupNorm(width, width, affine=True))
            layers.append(nn.ReLU(inplace=True))
            layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
            in_ch = width
        self.features = nn.Sequential(*layers)
        feat = image_size // (2 ** depth)
        self.classifier = nn.Linear(width * feat * feat, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _classification_names():
    try:
        return sorted(torchvision.models.list_models(module=torchvision.models))
    except Exception:  # very old torchvision
        return ["resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "vgg11_bn"]


def _replace_resnet_stem(model, channels, name):
    if not isinstance(getattr(model, "conv1", None), nn.Conv2d):
        raise ConfigError(
            f"model.name '{name}' takes 3-channel images but the data has {channels} channel(s); "
            f"only ResNet-style models (with a 'conv1' layer) can be adapted: use model.name: convnet, "
            f"resnet18 or another resnet")
    old = model.conv1
    model.conv1 = nn.Conv2d(channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                            padding=old.padding, bias=old.bias is not None)
    return model


def seeded_model(model_cfg, data, seed):
    """A freshly initialised model for `data` (its classes, channels, image size), its weights drawn from the
    global generator seeded `seed`: identical on every rank and every device."""
    torch.manual_seed(seed)
    return build_model(model_cfg, data.num_classes, data.channels, data.image_size)


def build_model(model_cfg, num_classes, channels, image_size):
    """Build the network named by model_cfg['name'] (see module docstring); no pretrained weights."""
    name = model_cfg.get("name", "convnet")
    if name == "convnet":
        # missing keys take the config defaults (config.DEFAULTS["model"])
        width = int(model_cfg.get("width", 32))
        depth = int(model_cfg.get("depth", 3))
        norm = model_cfg.get("norm", "batchnorm")
        if norm not in NORMS:
            raise ConfigError(f"config key 'model.norm' must be one of {', '.join(NORMS)}, got {norm!r}")
        if width < 1 or depth < 1:
            raise ConfigError(f"config keys 'model.width' and 'model.depth' must be at least 1, "
                              f"got width={width}, depth={depth}")
        if image_size // (2 ** depth) < 1:
            max_depth = max(int(image_size).bit_length() - 1, 0)
            raise ConfigError(
                f"model.depth={depth} is too deep for image_size={image_size}: each block halves the image, "
                f"leaving no pixels; use model.depth <= {max_depth}")
        return ConvNet(num_classes, channels, image_size, width=width, depth=depth, norm=norm)

    if name == "resnet18":
        # CIFAR-style ResNet-18: 3x3 stride-1 stem, no max-pool
        model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model

    tv_name = "resnet18" if name == "resnet18_imagenet" else name
    valid = _classification_names()
    if tv_name not in valid:
        examples = ", ".join(["convnet", "resnet18", "resnet18_imagenet", "resnet50", "mobilenet_v3_small"])
        raise ConfigError(f"unknown model.name {name!r}; valid names include {examples} "
                          f"(or any torchvision classification model, {len(valid)} in all)")
    model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes)
    if channels != 3:
        _replace_resnet_stem(model, channels, name)
    return model


def _unwrap(model):
    """The module under DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _strip_prefixes(sd):
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out


def state_dict_of(model):
    """Plain state dict of `model` (no 'module.' / '_orig_mod.' prefixes), tensors detached."""
    return _strip_prefixes(_unwrap(model).state_dict())


def _model_name(model):
    return type(model).__name__


def _checkpoint_globals():
    """The one class besides tensors that a training script's checkpoint holds: torchvision's reference
    scripts (which SRe2L's squeeze, and so the official CCFS teachers, use) save their argparse.Namespace as
    `args`. Building a Namespace only sets attributes; no code runs. (torch < 2.5: weights_only as is.)"""
    import argparse
    allow = getattr(torch.serialization, "safe_globals", None)
    return allow([argparse.Namespace]) if allow else contextlib.nullcontext()


def load_checkpoint(model, path):
    """Load weights from `path` into `model` in place and return it.

    Accepts a plain state dict, {"model": sd} or {"state_dict": sd}, with or without
    'module.' / '_orig_mod.' key prefixes. Anything else is a DataError naming the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"checkpoint file '{path}' does not exist; check teacher.checkpoint "
                        f"(or set it to null to train a teacher)")
    from ccfs_dist.runtime.io import regular_file
    regular_file(path, "checkpoint file")          # a FIFO would block torch.load forever
    try:
        with _checkpoint_globals():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"checkpoint file '{path}' could not be loaded ({type(exc).__name__}: {first}); "
                        f"it must be a state dict saved with torch.save") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"checkpoint file '{path}' does not hold a state dict (a mapping of parameter "
                        f"names to tensors, optionally under 'model' or 'state_dict')")
    sd = _strip_prefixes(obj)
    target = _unwrap(model)
    expected = target.state_dict()
    # checkpoints written without BatchNorm's counters are fine: keep the model's counters
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = expected[key]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong_shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatch(es) (file vs model), e.g. {'; '.join(wrong_shape[:3])}")
        raise DataError(f"checkpoint file '{path}' does not match the model {_model_name(target)}: "
                        f"{'; '.join(parts)}; check model.name / width / depth / norm and the number "
                        f"of classes and channels the checkpoint was trained with")
    meta = [k for k, v in sd.items() if v.is_meta or v.layout != torch.strided or v.is_complex()]
    if meta:
        raise DataError(f"checkpoint file '{path}' holds {len(meta)} tensor(s) without values (meta, sparse "
                        f"or complex), e.g. {', '.join(meta[:3])}; save the trained weights themselves")
    kinds = [f"{k} ({sd[k].dtype}, the model's is {v.dtype})" for k, v in expected.items()
             if v.is_floating_point() != sd[k].is_floating_point() or sd[k].dtype == torch.bool]
    if kinds:
        raise DataError(f"checkpoint file '{path}' holds {len(kinds)} tensor(s) of the wrong kind, e.g. "
                        f"{', '.join(kinds[:3])}; weights must be floating point (integer weights would be "
                        f"cast silently and give a model at chance)")
    # finite in the checkpoint's dtype is not enough: 1e39 in float64 is inf in the model's float32
    bad = [k for k, v in expected.items() if v.is_floating_point()
           and not bool(torch.isfinite(sd[k].to(v.dtype)).all())]
    if bad:
        raise DataError(f"checkpoint file '{path}' holds NaN or infinite values in {len(bad)} tensor(s), e.g. "
                        f"{', '.join(bad[:3])} (in the model's dtype); expected finite weights (the training that "
                        f"wrote it diverged?)")
    target.load_state_dict(sd, strict=True)
    return model
