"""The distilled set: read a distilled image folder (`load_distilled`) and write one (`write_image_folder`)."""
import hashlib
import os
import re
import shutil
import tempfile

import torch
from PIL import Image

from ccfs_dist.errors import DataError
from ccfs_dist.data.folders import short
from ccfs_dist.data.images import IMG_EXTENSIONS, read_images
from ccfs_dist.data.pool import TensorPool

def load_distilled(folder, classes, per_class, channels, image_size, resize=False):
    """Read `per_class` images per class from a distilled image folder (one sub-folder per class).

    Sub-folders may be named by class name, class index ("7", "007") or "new" + index ("new007").
    Files are taken in name order; the result is ordered by class, then file name. Every image must have
    the data's size and colour mode; with `resize` (data.distilled_resize) others are stretched and converted.
    """
    mode = "L" if channels == 1 else "RGB"
    if per_class == 0:
        return TensorPool(torch.empty(0, channels, image_size, image_size, dtype=torch.uint8),
                          torch.empty(0, dtype=torch.int64))
    folder = os.path.expanduser(os.fspath(folder))
    if not os.path.isdir(folder):
        raise DataError(f"distilled image folder not found: {folder}")

    by_name = {str(c): i for i, c in enumerate(classes)}
    class_dirs, extra = {}, []
    for name in sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")):
        label = _distilled_label(name, by_name, len(classes))
        if label is None:
            extra.append(name)
        elif label in class_dirs:
            raise DataError(f"{folder}: sub-folders '{class_dirs[label]}' and '{name}' "
                            f"both name class {label} ({classes[label]})")
        else:
            class_dirs[label] = name
    missing = [f"{i} ({classes[i]})" for i in range(len(classes)) if i not in class_dirs]
    if missing or extra:
        raise DataError(f"distilled folder {folder} does not match the {len(classes)} classes: "
                        f"missing {short(missing)}; extra sub-folders {short(extra)} (name sub-folders "
                        f"by class name, class index or 'new' + 3-digit index, e.g. new007)")

    files, labels = [], []
    for label in range(len(classes)):
        class_dir = os.path.join(folder, class_dirs[label])
        names = sorted(n for n in os.listdir(class_dir) if n.lower().endswith(IMG_EXTENSIONS)
                       and not n.startswith(".") and os.path.isfile(os.path.join(class_dir, n)))
        if len(names) < per_class:
            raise DataError(f"distilled class folder {class_dir} holds {len(names)} images, "
                            f"need {per_class} per class")
        files += [os.path.join(class_dir, n) for n in names[:per_class]]
        labels += [label] * per_class
    if resize:
        images = read_images(files, mode, image_size, resize="stretch", desc="distilled images")
    else:
        images = read_images(files, mode, image_size, desc="distilled images", exact_mode=True,
                             hint="pass data.distilled_resize=true to resize and convert the distilled images")
    _check_distinct(images, files)
    return TensorPool(images, torch.tensor(labels, dtype=torch.int64))


def _check_distinct(images, files):
    """Two distilled files with the same pixels (a copy, a symlink to the same file) would count one image
    twice in the synthetic set: refused, naming both."""
    seen = {}
    for i, img in enumerate(images.numpy()):
        digest = hashlib.sha256(img.tobytes()).digest()
        if digest in seen:
            raise DataError(f"distilled images {files[seen[digest]]} and {files[i]} are the same image; each "
                            f"distilled image must be distinct (remove the duplicate)")
        seen[digest] = i


def _distilled_label(name, by_name, num_classes):
    if name in by_name:
        return by_name[name]
    m = re.fullmatch(r"(?:new)?(\d+)", name)
    if m and int(m.group(1)) < num_classes:
        return int(m.group(1))
    return None


def write_image_folder(folder, images, labels, classes):
    """Write uint8 N x C x H x W images as lossless PNGs: new{c:03d}/class{c:03d}_id{i:03d}.png.

    Written to a temporary sibling folder, then renamed onto `folder` (an existing one is replaced
    only once the new one is complete). Ids are zero-padded wider than 3 digits past 999 per class.
    """
    folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 N x C x H x W images with C in (1, 3), "
                         f"got {tuple(images.shape)} {images.dtype}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"labels outside 0..{len(classes) - 1}")
    counts = torch.bincount(labels, minlength=len(classes))
    width = max(3, len(str(int(counts.max()) - 1))) if len(labels) else 3

    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(folder) + ".", suffix=".tmp")
    try:
        for c in range(len(classes)):
            os.makedirs(os.path.join(tmp, f"new{c:03d}"))
        pixels = images.permute(0, 2, 3, 1).contiguous().numpy()
        seen = [0] * len(classes)
        for img, c in zip(pixels, labels.tolist()):
            name = f"class{c:03d}_id{seen[c]:0{width}d}.png"
            seen[c] += 1
            pil = Image.fromarray(img[:, :, 0], "L") if img.shape[2] == 1 else Image.fromarray(img, "RGB")
            pil.save(os.path.join(tmp, f"new{c:03d}", name), compress_level=1)
        if os.path.exists(folder):
            old = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(folder) + ".", suffix=".old")
            os.rmdir(old)
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old)
        else:
            os.rename(tmp, folder)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
