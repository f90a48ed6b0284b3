"""Generated pools, in memory and as WebDataset shards with the same global index (the streamed-training and
score tests, launch/bench_stream_scores.py), and the two rank statistics they are judged by.

    planted_digits()                 digits with 5 % of the training labels flipped: (RealData, planted mask)
    generated_pool(...)              class prototypes + noise, 8x8 RGB, 5 % flipped labels: (RealData, mask)
    write_pool_shards(data, folder)  data.train and data.test as shards + train.json / test.json (as `ccfs shards`
                                     lays them out: PNG members, keys = the global index)
    teacher_accuracies(...)          the digits teacher recipe in memory and streamed from shards: test accuracies per seed
"""
import os

import numpy as np
import torch

from ccfs_dist.data.pool import Norm, RealData, TensorPool
from ccfs_dist.data.images import encode_png
from ccfs_dist.data.shards.index import FORMAT, key_width, write_index
from ccfs_dist.data.shards.tar import write_tar
from ccfs_dist.data.sources import load_real

NOISE_FRACTION = 0.05


def planted_digits(fraction=NOISE_FRACTION, seed=0):
    """Digits whose labels are changed to another (random) class on a random `fraction` of the training
    set: (data, planted boolean mask). The planted samples are the known hardest ones."""
    data = load_real({"source": "digits", "root": None, "image_size": None, "distilled": None})
    labels = data.train.labels.clone()
    rng = np.random.default_rng(seed)
    n = len(labels)
    planted = np.zeros(n, dtype=bool)
    planted[rng.choice(n, size=int(round(fraction * n)), replace=False)] = True
    shift = torch.from_numpy(rng.integers(1, data.num_classes, size=int(planted.sum())))
    mask = torch.from_numpy(planted)
    labels[mask] = (labels[mask] + shift) % data.num_classes
    noisy = RealData(data.name, data.classes, TensorPool(data.train.images, labels), data.test, data.norm)
    return noisy, planted


def auroc(scores, positive):
    """Area under the ROC curve of `scores` separating `positive` from the rest (Mann-Whitney U, ties averaged)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    uniq, inverse = np.unique(scores, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    ranks = (sums / counts)[inverse]                       # average rank within ties
    p, q = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - p * (p + 1) / 2) / (p * q))


def spearman(a, b):
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable")
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable")
    return float(np.corrcoef(ra, rb)[0, 1])


def flip_labels(labels, num_classes, fraction=0.05, seed=0):
    """(labels with a random `fraction` changed to another class, planted mask), as planted_digits does."""
    rng = np.random.default_rng(seed)
    labels = labels.clone()
    planted = np.zeros(len(labels), dtype=bool)
    planted[rng.choice(len(labels), size=int(round(fraction * len(labels))), replace=False)] = True
    mask = torch.from_numpy(planted)
    shift = torch.from_numpy(rng.integers(1, num_classes, size=int(planted.sum())))
    labels[mask] = (labels[mask] + shift) % num_classes
    return labels, planted


def generated_pool(classes=10, per_class=150, test_per_class=30, size=8, noise=60.0, fraction=0.05, seed=0):
    """A learnable generated pool: one random prototype image per class plus Gaussian pixel noise, uint8
    3 x size x size, labels sorted by class (as a class-folder source); `fraction` of the training labels
    flipped. Returns (RealData, planted mask)."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(40, 215, (classes, 3, size, size))

    def split(n):
        y = np.repeat(np.arange(classes), n)
        x = np.clip(protos[y] + rng.normal(0, noise, (len(y), 3, size, size)), 0, 255).round().astype(np.uint8)
        return torch.from_numpy(x), torch.from_numpy(y)
    (x, y), (tx, ty) = split(per_class), split(test_per_class)
    y, planted = flip_labels(y, classes, fraction, seed)
    flat = x.float().div(255).transpose(0, 1).reshape(3, -1)
    mean, std = tuple(flat.mean(1).tolist()), tuple(flat.std(1).tolist())
    return RealData("generated", [str(c) for c in range(classes)], TensorPool(x, y), TensorPool(tx, ty), Norm(mean, std)), planted


def write_pool_shards(data, folder, per_shard=200):
    """Write data.train / data.test as shards with train.json / test.json in `folder`; returns the data
    config of the webdataset source."""
    os.makedirs(folder, exist_ok=True)
    for name, split in (("train", data.train), ("test", data.test)):
        n, width = len(split), key_width(len(split))
        shards = []
        for s, first in enumerate(range(0, n, per_shard)):
            count = min(per_shard, n - first)
            path = os.path.join(folder, f"{name}-{s:06d}.tar")
            samples = ((f"{i:0{width}d}", {"cls": str(int(split.labels[i])).encode(),
                                           "png": encode_png(split.images[i].numpy())})
                       for i in range(first, first + count))
            size, sha = write_tar(path, samples)
            shards.append({"file": os.path.basename(path), "first": first, "count": count, "bytes": size,
                           "sha256": sha})
        write_index(os.path.join(folder, f"{name}.json"), {
            "format": FORMAT, "name": data.name, "split": name, "num_samples": n, "classes": list(data.classes),
            "shape": list(split.shape), "mean": list(data.norm.mean), "std": list(data.norm.std),
            "source": {"source": f"test pool, {name} split"}, "key_width": width, "shards": shards,
            "labels": split.labels.tolist()})
    return {"source": "webdataset", "root": os.path.join(folder, "train.json"),
            "test_root": os.path.join(folder, "test.json"), "image_size": None, "distilled": None}


def teacher_accuracies(accelerator, memory, streamed, seeds=(0, 1, 2)):
    """[(in-memory, from-shards test accuracy)] per seed of the teacher recipe (ConvNet-D3 width 32, 30 epochs,
    batch 128, lr 0.1), trained with train_model on `memory` and with train_stream on `streamed` (same data),
    streamed through a 256-sample shuffle buffer (a pool within the buffer would be read once: train_model)."""
    from ccfs_dist.training.models import build_model
    from ccfs_dist.training.predict import accuracy
    from ccfs_dist.training.stream_train import train_stream
    from ccfs_dist.training.train import Recipe, train_model
    out = []
    for seed in seeds:
        rec = Recipe(epochs=30, batch_size=128, lr=0.1, weight_decay=5e-4)
        kw = dict(norm=memory.norm, seed=seed)
        row = []
        for train in (lambda m: train_model(accelerator, m, memory.train.images, memory.train.labels, rec, **kw),
                      lambda m: train_stream(accelerator, m, streamed.train, rec, shuffle_buffer=256, **kw)):
            torch.manual_seed(seed)
            model, _ = train(build_model({"name": "convnet", "width": 32, "depth": 3, "norm": "batchnorm"},
                                         memory.num_classes, memory.channels, memory.image_size))
            row.append(accuracy(accelerator, model, memory.test, norm=memory.norm))
        out.append(tuple(row))
    return out
