"""In-memory sources: read digits, CIFAR, Tiny-ImageNet and image folders into uint8 tensors (an in-memory
pool, `pool.TensorPool`).

Each real training sample has a stable global index: its row in `RealData.train`, which follows the
canonical order of its source (torchvision order for CIFAR, ImageFolder order for image folders; the file
lists come from folders.py). `sources.load_real` chooses between these sources and the streamed one
(shard_reader.py).
"""
import gzip
import importlib.util
import os
import pickle

import numpy as np
import torch

from ccfs_dist.errors import ConfigError, DataError
from ccfs_dist.data.folders import imagefolder_files, tiny_imagenet_files
from ccfs_dist.data.images import channel_stats, read_images
from ccfs_dist.runtime.io import regular_file
from ccfs_dist.data.pool import Norm, RealData, TensorPool


# Default normalisation per source (config keys data.mean / data.std override them). These follow the
# official CCFS code, whose teacher checkpoints were trained with them (SRe2L's squeeze_cifar.py):
# ccfs_cifar10.py and ccfs_cifar100.py both use the CIFAR-10 mean and the std (0.2023, 0.1994, 0.2010),
# ccfs_tiny.py uses TINY_MEAN / TINY_STD. docs/official.md lists them beside each set's own statistics.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = CIFAR10_MEAN, CIFAR10_STD
TINY_MEAN, TINY_STD = (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)


def load_source(data_cfg, test=True):
    """RealData of the in-memory source named by the `data` config section (not `webdataset`), with the
    source's own normalisation (`set_normalisation` applies data.mean / data.std). test=False leaves the
    test split unread (RealData.test is None): data.validation replaces it (sources.carve_validation)."""
    source, root, image_size = data_cfg["source"], data_cfg.get("root"), data_cfg.get("image_size")
    if source in ("digits", "cifar10", "cifar100") and image_size is not None:
        native = 8 if source == "digits" else 32
        if image_size != native:
            raise ConfigError(f"data.image_size={image_size} is not supported for source '{source}' "
                              f"(its images are {native}x{native}); it applies to imagefolder and "
                              f"tiny-imagenet only: leave it unset")
    if source == "digits":
        return _load_digits(test)
    if data_cfg.get("download") and root is not None:
        from ccfs_dist.data.download import ensure
        ensure(source, os.path.expanduser(os.fspath(root)))
    root = source_root(source, root)
    if source == "cifar10":
        return _load_cifar(root, 10, test)
    if source == "cifar100":
        return _load_cifar(root, 100, test)
    if source == "tiny-imagenet":
        return _load_tiny_imagenet(root, image_size, test)
    if source == "imagefolder":
        return _load_imagefolder(root, image_size, test)
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
        data.norm = data.norm._replace(**{key: tuple(float(v) for v in values)})
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


def _load_digits(test=True):
    """sklearn digits, 8x8 grey. Test = original index % 5 == 0 (360), train = the rest (1,437)."""
    pixels, target = digits_arrays()
    images = np.floor(pixels * (255.0 / 16.0) + 0.5).astype(np.uint8)  # values 0..16 -> 0..255
    images = torch.from_numpy(images).unsqueeze(1).contiguous()
    labels = torch.from_numpy(target)
    is_test = torch.arange(len(labels)) % 5 == 0
    train = TensorPool(images[~is_test].contiguous(), labels[~is_test].contiguous())
    test = TensorPool(images[is_test].contiguous(), labels[is_test].contiguous()) if test else None
    mean, std = channel_stats(train.images)
    return RealData("digits", [str(c) for c in range(10)], train, test, Norm(mean, std))


def _load_cifar(root, num_classes, test=True):
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
        return TensorPool(torch.cat([p[0] for p in parts]).contiguous(), torch.cat([p[1] for p in parts]))

    return RealData(f"cifar{num_classes}", classes, read(train_files),
                    read([test_file]) if test else None, Norm(mean, std))


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


def _load_tiny_imagenet(root, image_size, test=True):
    """Tiny-ImageNet-200: train = ImageFolder over train/, test = val/ with val_annotations.txt."""
    classes, train, test = _read_folders(tiny_imagenet_files(root), image_size, test,
                                         ("Tiny-ImageNet train", "Tiny-ImageNet val"))
    return RealData("tiny-imagenet", classes, train, test, Norm(TINY_MEAN, TINY_STD))


def _load_imagefolder(root, image_size, test=True):
    """root/train/<class>/... and root/val/<class>/... (or root/test/), ImageFolder order, RGB."""
    classes, train, test = _read_folders(imagefolder_files(root), image_size, test, ("train images", "test images"))
    return RealData("imagefolder", classes, train, test, Norm(*channel_stats(train.images)))


def _read_folders(found, image_size, test, descs):
    """(classes, train, test or None) read from (classes, (train files, labels), (test files, labels)), RGB; the
    test images at the train images' size (cropped only where data.image_size asks for a size)."""
    classes, (train_files, train_labels), (test_files, test_labels) = found
    train = _read_split(train_files, train_labels, "RGB", image_size, descs[0])
    if test:
        test = _read_split(test_files, test_labels, "RGB", image_size or train.images.shape[2],
                           descs[1], crop=image_size is not None)
    return classes, train, test or None


def _read_split(files, labels, mode, size, desc, crop=True):
    images = read_images(files, mode, size, resize="crop" if crop and size is not None else None, desc=desc)
    return TensorPool(images, torch.tensor(labels, dtype=torch.int64))
