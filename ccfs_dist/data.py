"""In-memory sources and the distilled set: read digits, CIFAR, Tiny-ImageNet and image folders into
uint8 tensors (an in-memory pool, `pool.Split`), read and write distilled image folders.

Each real training sample has a stable global index: its row in `RealData.train`, which follows the
canonical order of its source (torchvision order for CIFAR, ImageFolder order for image folders).
`sources.load_real` chooses between these sources and the streamed one (shards.py).
"""
import errno
import gzip
import hashlib
import importlib.util
import os
import pickle
import re
import shutil
import tempfile

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError, DataError
from .images import IMG_EXTENSIONS, channel_stats, read_images
from .io import regular_file
from .pool import RealData, Split

# Default normalisation per source (config keys data.mean / data.std override them). These follow the
# official CCFS code, whose teacher checkpoints were trained with them (SRe2L's squeeze_cifar.py):
# ccfs_cifar10.py and ccfs_cifar100.py both use the CIFAR-10 mean and the std (0.2023, 0.1994, 0.2010),
# ccfs_tiny.py uses TINY_MEAN / TINY_STD. docs/official.md lists them beside each set's own statistics.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = CIFAR10_MEAN, CIFAR10_STD
TINY_MEAN, TINY_STD = (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)


def load_source(data_cfg):
    """RealData of the in-memory source named by the `data` config section (not `webdataset`), with the
    source's own normalisation (`set_normalisation` applies data.mean / data.std)."""
    source, root, image_size = data_cfg["source"], data_cfg.get("root"), data_cfg.get("image_size")
    if source in ("digits", "cifar10", "cifar100") and image_size is not None:
        native = 8 if source == "digits" else 32
        if image_size != native:
            raise ConfigError(f"data.image_size={image_size} is not supported for source '{source}' "
                              f"(its images are {native}x{native}); it applies to imagefolder and "
                              f"tiny-imagenet only: leave it unset")
    if source == "digits":
        return _load_digits()
    if data_cfg.get("download") and root is not None:
        from .download import ensure
        ensure(source, os.path.expanduser(os.fspath(root)))
    root = source_root(source, root)
    if source == "cifar10":
        return _load_cifar(root, 10)
    if source == "cifar100":
        return _load_cifar(root, 100)
    if source == "tiny-imagenet":
        return _load_tiny_imagenet(root, image_size)
    if source == "imagefolder":
        return _load_imagefolder(root, image_size)
    raise ConfigError(f"unknown data.source '{source}' "
                      f"(choose digits, cifar10, cifar100, tiny-imagenet, imagefolder or webdataset)")


WHERE_TO_GET = {
    "cifar10": "data.download=true fetches CIFAR-10 into it; docs/data.md",
    "cifar100": "data.download=true fetches CIFAR-100 into it; docs/data.md",
    "tiny-imagenet": "extract tiny-imagenet-200.zip there; docs/data.md says where to get it",
    "imagefolder": "a folder with train/ and val/ class sub-folders; docs/data.md",
}


def source_root(source, root):
    """The folder `root` (data.root) of `source`, user-expanded; a ConfigError if unset, a DataError if absent."""
    if root is None:
        raise ConfigError(f"data source '{source}' needs 'data.root' (the folder holding it)")
    root = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(root):
        raise DataError(f"data.root folder not found: {root} ({WHERE_TO_GET.get(source, 'see docs/data.md')})")
    return root


def set_normalisation(data, data_cfg):
    """`data` with data.mean / data.std, when set, in place of its source's normalisation."""
    for key in ("mean", "std"):
        values = data_cfg.get(key)
        if values is None:
            continue
        if len(values) != data.channels:
            raise ConfigError(f"config key 'data.{key}' has {len(values)} value(s) but the images of source "
                              f"'{data_cfg['source']}' have {data.channels} channel(s)")
        setattr(data, key, tuple(float(v) for v in values))
    return data


# ---------------------------------------------------------------------------------------- sources

def digits_arrays():
    """(images float 1797 x 8 x 8 in 0..16, labels) of scikit-learn's digits, in its order.

    Read from the CSV file scikit-learn ships, found without importing scikit-learn (whose import costs
    every process of a run ~0.6 s, all for one small file); through sklearn.datasets.load_digits when the
    file is not where this scikit-learn keeps it (tests check both give the same arrays)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DataError("data source 'digits' needs scikit-learn: pip install scikit-learn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def _load_digits():
    """sklearn digits, 8x8 grey. Test = original index % 5 == 0 (360), train = the rest (1,437)."""
    pixels, target = digits_arrays()
    images = np.floor(pixels * (255.0 / 16.0) + 0.5).astype(np.uint8)  # values 0..16 -> 0..255
    images = torch.from_numpy(images).unsqueeze(1).contiguous()
    labels = torch.from_numpy(target)
    is_test = torch.arange(len(labels)) % 5 == 0
    train = Split(images[~is_test].contiguous(), labels[~is_test].contiguous())
    test = Split(images[is_test].contiguous(), labels[is_test].contiguous())
    mean, std = channel_stats(train.images)
    return RealData("digits", [str(c) for c in range(10)], train, test, mean, std)


def _load_cifar(root, num_classes):
    """CIFAR-10/100 python pickles; train order = data_batch_1..5 (torchvision order)."""
    if num_classes == 10:
        sub, title, archive = "cifar-10-batches-py", "CIFAR-10", "cifar-10-python.tar.gz"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_file, meta_file, label_key, names_key = "test_batch", "batches.meta", b"labels", b"label_names"
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        sub, title, archive = "cifar-100-python", "CIFAR-100", "cifar-100-python.tar.gz"
        train_files = ["train"]
        test_file, meta_file, label_key, names_key = "test", "meta", b"fine_labels", b"fine_label_names"
        mean, std = CIFAR100_MEAN, CIFAR100_STD
    folder = os.path.join(root, sub) if os.path.isdir(os.path.join(root, sub)) else root
    expected = train_files + [test_file, meta_file]
    missing = [f for f in expected if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(f"{title} files missing in {folder}: {', '.join(missing)} "
                        f"(expected {', '.join(expected)}, as extracted from {archive}; "
                        f"set data.root to that folder or its parent, or set data.download=true)")

    meta = _read_pickle(os.path.join(folder, meta_file))
    if not isinstance(meta, dict):
        raise DataError(f"{os.path.join(folder, meta_file)}: expected a dict with {names_key!r}, found "
                        f"{type(meta).__name__} (re-extract the archive)")
    if names_key not in meta or not isinstance(meta[names_key], list):
        raise DataError(f"{os.path.join(folder, meta_file)}: no '{names_key.decode()}' entry")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    if len(classes) != num_classes:
        raise DataError(f"{os.path.join(folder, meta_file)}: {len(classes)} class names, "
                        f"expected {num_classes}")

    def read(files):
        parts = [_read_cifar_batch(os.path.join(folder, f), label_key, num_classes) for f in files]
        return Split(torch.cat([p[0] for p in parts]).contiguous(), torch.cat([p[1] for p in parts]))

    return RealData(f"cifar{num_classes}", classes, read(train_files), read([test_file]), mean, std)


class _CifarUnpickler(pickle.Unpickler):
    """Admits what CIFAR's python release holds: dicts, lists, bytes, str, numbers, and numpy arrays through
    numpy's own reconstruction functions. Any other global (a `__reduce__` payload's os.system, ...) is
    refused before it is called: loading a data file never runs code from it."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
               ("_codecs", "encode")}   # protocol 2 pickles written by Python 3 spell bytes this way

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for the global '{module}.{name}', which a CIFAR file never holds "
                                     f"(refused: loading it could run code)")


def _read_pickle(path):
    """A CIFAR pickle, loaded Python-2 style (encoding='bytes') through the restricted unpickler."""
    if os.path.exists(path):
        regular_file(path, "CIFAR batch")                  # a FIFO would block the open forever
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    except Exception as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e} (re-extract the archive)") from None


def _read_cifar_batch(path, label_key, num_classes):
    batch = _read_pickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataError(f"{path}: expected a dict with b'data' and {label_key!r} (re-extract the archive)")
    data, labels = batch[b"data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        found = f"a {data.dtype} array" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' is {found}, expected a uint8 array of pixels 0..255 "
                        f"(as in the CIFAR release; re-extract the archive)")
    if not isinstance(labels, (list, np.ndarray)) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        raise DataError(f"{path}: {label_key!r} must be a list of integer class indices, found "
                        f"{type(labels).__name__} {str(labels)[:60]} (re-extract the archive)")
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataError(f"{path}: data of shape {data.shape} with {len(labels)} labels, "
                        f"expected N x 3072 with N labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def image_files(source, root, split="train"):
    """(paths, labels, classes) of a file-based source ('tiny-imagenet' or 'imagefolder') in its canonical
    order (the global index of the train split), without decoding anything."""
    if source == "tiny-imagenet":
        classes, train, test = _tiny_imagenet_files(root)
    elif source == "imagefolder":
        classes, train, test = _imagefolder_files(root)
    else:
        raise ConfigError(f"data source '{source}' is not file-based (tiny-imagenet or imagefolder)")
    files, labels = train if split == "train" else test
    return files, labels, classes


def _load_tiny_imagenet(root, image_size):
    """Tiny-ImageNet-200: train = ImageFolder over train/, test = val/ with val_annotations.txt."""
    classes, (train_files, train_labels), (test_files, test_labels) = _tiny_imagenet_files(root)
    train = _read_split(train_files, train_labels, "RGB", image_size, "Tiny-ImageNet train")
    test = _read_split(test_files, test_labels, "RGB", image_size or train.images.shape[2],
                       "Tiny-ImageNet val", crop=image_size is not None)
    return RealData("tiny-imagenet", classes, train, test, TINY_MEAN, TINY_STD)


def _tiny_imagenet_files(root):
    if not os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "tiny-imagenet-200")):
        root = os.path.join(root, "tiny-imagenet-200")
    classes, train_files, train_labels = _scan_image_folder(os.path.join(root, "train"))
    wnids_path = os.path.join(root, "wnids.txt")
    if os.path.exists(wnids_path):
        with open(regular_file(wnids_path, "Tiny-ImageNet class list")) as f:
            wnids = sorted(line.strip() for line in f if line.strip())
        _check_same_classes(wnids, classes, wnids_path, os.path.join(root, "train"))

    val_dir = os.path.join(root, "val")
    ann_path = os.path.join(val_dir, "val_annotations.txt")
    if not os.path.isfile(ann_path):
        raise DataError(f"Tiny-ImageNet validation labels not found: {ann_path} "
                        f"(expected val/images/*.JPEG and val/val_annotations.txt)")
    index = {c: i for i, c in enumerate(classes)}
    val = {}
    with open(regular_file(ann_path, "Tiny-ImageNet validation labels")) as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if not line.strip():
                continue
            if len(fields) < 2 or fields[1] not in index:
                raise DataError(f"{ann_path} line {n}: expected 'filename<TAB>wnid' with a wnid "
                                f"from train/, got {line.strip()!r}")
            val[fields[0]] = index[fields[1]]
    test_files = [os.path.join(val_dir, "images", name) for name in sorted(val)]
    missing = [p for p in test_files if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} files listed in {ann_path} are missing, e.g. {missing[0]}")
    test_labels = [val[name] for name in sorted(val)]
    return classes, (train_files, train_labels), (test_files, test_labels)


def _load_imagefolder(root, image_size):
    """root/train/<class>/... and root/val/<class>/... (or root/test/), ImageFolder order, RGB."""
    classes, (train_files, train_labels), (test_files, test_labels) = _imagefolder_files(root)
    train = _read_split(train_files, train_labels, "RGB", image_size, "train images")
    test = _read_split(test_files, test_labels, "RGB", image_size or train.images.shape[2],
                       "test images", crop=image_size is not None)
    mean, std = channel_stats(train.images)
    return RealData("imagefolder", classes, train, test, mean, std)


def _imagefolder_files(root):
    test_dir = os.path.join(root, "val")
    if not os.path.isdir(test_dir):
        test_dir = os.path.join(root, "test")
    if not os.path.isdir(test_dir):
        raise DataError(f"no test split in {root}: expected a 'val' (or 'test') folder with one "
                        f"sub-folder per class next to 'train'")
    train_dir = os.path.join(root, "train")
    if os.path.realpath(test_dir) == os.path.realpath(train_dir):
        raise DataError(f"the test split {test_dir} is the training folder {train_dir}; the test split must hold "
                        f"other images")
    train_links, test_links = [], []
    classes, train_files, train_labels = _scan_image_folder(train_dir, train_links)
    if _is_flat(test_dir):
        _entries(test_dir, test_links)                      # its symlinks resolved, broken ones refused
        test_files, test_labels = _flat_val(root, test_dir, classes)
    else:
        test_classes, test_files, test_labels = _scan_image_folder(test_dir, test_links)
        _check_same_classes(test_classes, classes, test_dir, train_dir)
    _check_disjoint(train_files + train_links, test_files + test_links, train_dir, test_dir)
    return classes, (train_files, train_labels), (test_files, test_labels)


# ImageNet's validation set as released is one flat folder; its labels come from one of these files
FLAT_VAL_LABELS = ("LOC_val_solution.csv", "val_labels.txt")
MAX_LABEL_FILE_BYTES = 64 << 20


def _is_flat(folder):
    """True when `folder` holds images but no sub-folders (ImageNet's validation set as released)."""
    entries = list(os.scandir(folder))
    return not any(e.is_dir() for e in entries) and any(e.name.lower().endswith(IMG_EXTENSIONS) for e in entries)


def _flat_val(root, folder, classes):
    """(files, labels) of a flat validation folder, sorted by file name, labelled by a ground-truth file:
    Kaggle's LOC_val_solution.csv (`ImageId,PredictionString`, the wnid first in the string) or val_labels.txt
    (`<file name or stem> <wnid>` per line), in `folder` or `root`."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMG_EXTENSIONS) and not n.startswith("."))
    found = [os.path.join(where, n) for n in FLAT_VAL_LABELS for where in (folder, root)
             if os.path.isfile(os.path.join(where, n))]
    if not found:
        raise DataError(f"{folder} holds {len(names)} images and no class sub-folders (ImageNet's flat validation "
                        f"set?): put its ground truth beside it as {' or '.join(FLAT_VAL_LABELS)} ('<file> <wnid>' "
                        f"per line), or sort the images into one sub-folder per class (docs/data.md)")
    path = found[0]
    if os.path.getsize(path) > MAX_LABEL_FILE_BYTES:
        raise DataError(f"{path}: {os.path.getsize(path):,} bytes, more than a ground-truth file holds")
    wnid_of = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            fields = line.replace(",", " ").split()
            if not fields or (n == 1 and fields[0] == "ImageId"):
                continue
            if len(fields) < 2:
                raise DataError(f"{path} line {n}: expected '<file> <wnid>', found {line.strip()[:80]!r}")
            wnid_of[os.path.splitext(fields[0])[0]] = fields[1]
    label_of = {c: i for i, c in enumerate(classes)}
    labels = []
    for name in names:
        wnid = wnid_of.get(os.path.splitext(name)[0])
        if wnid is None:
            raise DataError(f"{os.path.join(folder, name)} has no line in {path}")
        if wnid not in label_of:
            raise DataError(f"{path}: {name} is labelled {wnid!r}, which is not a class of the train split")
        labels.append(label_of[wnid])
    return [os.path.join(folder, n) for n in names], labels


def _scan_image_folder(folder, places=None):
    """(classes, files, labels) in torchvision ImageFolder order: classes sorted, then sorted walk (symlinked
    folders followed). A broken symlink, a symlink loop or an image name that is not a regular file (a FIFO,
    a device: opening it would block) is a DataError naming it, never skipped or followed forever.
    `places`: a list that gets the resolved target of every symlink met (ownership checks: io.check_outputs)."""
    if not os.path.isdir(folder):
        raise DataError(f"image folder not found: {folder} (expected one sub-folder per class)")
    places = [] if places is None else places
    entries = _entries(folder, places)
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        raise DataError(f"no class sub-folders in {folder}")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = _walk_images(os.path.join(folder, name), places)
        if not found:
            raise DataError(f"class folder {os.path.join(folder, name)} holds no images "
                            f"(extensions: {' '.join(IMG_EXTENSIONS)})")
        files += found
        labels += [label] * len(found)
    return classes, files, labels


def _entries(folder, places):
    """The entries of `folder`, every symlink among them resolved (its target into `places`) or refused."""
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise DataError(f"cannot list {folder}: {exc.strerror}") from None
    for e in entries:
        if e.is_symlink():
            if not os.path.exists(e.path):
                why = "a symlink loop" if _loops(e.path) else f"a broken symlink (to {os.readlink(e.path)!r})"
                raise DataError(f"{e.path} is {why} in an image folder; remove or fix it")
            places.append(os.path.realpath(e.path))
    return entries


def _loops(path):
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _walk_images(top, places):
    """The image files below `top` in torchvision's order (sorted(os.walk(top, followlinks=True)), names
    sorted), without its endless walk through a symlink that leads back to a folder above it."""
    found, stack = [], [(top, frozenset([os.path.realpath(top)]))]
    while stack:
        folder, above = stack.pop()
        images, subdirs = [], []
        for e in _entries(folder, places):
            if e.is_dir():
                real = os.path.realpath(e.path)
                if real in above:
                    raise DataError(f"{e.path} is a symlink loop in an image folder (it leads back to {real}, "
                                    f"which holds it); remove it")
                subdirs.append((e.path, above | {real}))
            elif e.name.lower().endswith(IMG_EXTENSIONS):
                if not e.is_file():
                    raise DataError(f"{e.path} is not a regular file (a named pipe, device or socket), refused "
                                    f"before it is opened; remove it from the image folder")
                images.append(e.name)
        found.append((folder, sorted(images)))
        stack += subdirs
    return [os.path.join(folder, name) for folder, names in sorted(found) for name in names]


def image_places(source, root):
    """Where the image-file source at `root` lies, symlinks resolved: its split and class folders and the
    targets of the symlinks in it (what no output may overlap)."""
    if source == "tiny-imagenet" and not os.path.isdir(os.path.join(root, "train")) \
            and os.path.isdir(os.path.join(root, "tiny-imagenet-200")):
        root = os.path.join(root, "tiny-imagenet-200")
    places = [root]
    splits = [os.path.join(root, "train")] + [os.path.join(root, s) for s in ("val", "test")
                                              if os.path.isdir(os.path.join(root, s))]
    for split in splits:
        places.append(split)
        if os.path.isdir(split):
            flat = split.endswith(("val", "test")) and (source == "tiny-imagenet" or _is_flat(split))
            _entries(split, places) if flat else _scan_image_folder(split, places)
    return places


def _check_disjoint(train_files, test_files, train_where, test_where):
    """The test split shares no file with the training split (also through symlinked folders or files; the
    lists hold the files and the symlink targets met in each split). Folders are resolved once each."""
    folders = {}

    def real(f):
        d = os.path.dirname(f)
        if d not in folders:
            folders[d] = os.path.realpath(d)
        return os.path.join(folders[d], os.path.basename(f))
    train = set(map(real, train_files))
    shared = [f for f in test_files if real(f) in train]
    if shared:
        raise DataError(f"the test split {test_where} holds {len(shared)} of the training files of {train_where}, "
                        f"e.g. {shared[0]}; the test split must hold other images")


def _check_same_classes(found, expected, found_where, expected_where):
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise DataError(f"classes in {found_where} differ from {expected_where}: "
                        f"missing {_short(missing)}, extra {_short(extra)}")


def _short(items, limit=10):
    items = list(items)
    text = ", ".join(str(i) for i in items[:limit]) or "none"
    return text + (f" ... ({len(items)} in all)" if len(items) > limit else "")


# --------------------------------------------------------------------------------------- decoding

def _read_split(files, labels, mode, size, desc, crop=True):
    images = read_images(files, mode, size, resize="crop" if crop and size is not None else None, desc=desc)
    return Split(images, torch.tensor(labels, dtype=torch.int64))


# ---------------------------------------------------------------------------------- distilled set

def load_distilled(folder, classes, per_class, channels, image_size, resize=False):
    """Read `per_class` images per class from a distilled image folder (one sub-folder per class).

    Sub-folders may be named by class name, class index ("7", "007") or "new" + index ("new007").
    Files are taken in name order; the result is ordered by class, then file name. Every image must have
    the data's size and colour mode; with `resize` (data.distilled_resize) others are stretched and converted.
    """
    mode = "L" if channels == 1 else "RGB"
    if per_class == 0:
        return Split(torch.empty(0, channels, image_size, image_size, dtype=torch.uint8),
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
                        f"missing {_short(missing)}; extra sub-folders {_short(extra)} (name sub-folders "
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
    return Split(images, torch.tensor(labels, dtype=torch.int64))


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
