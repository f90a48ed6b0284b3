"""Generated pools for the benchmarks: a gathered selection pool, a RealData of noise, a CIFAR-shaped image
folder (and the run artifacts two runs on it must agree on)."""
import os

import numpy as np
import torch

from ccfs_dist.data.pool import Norm, RealData, TensorPool

CIFAR = {"classes": 10, "train_per_class": 200, "test_per_class": 50, "size": 32}
# the artifacts of a run that must be byte-identical across process counts and repeats
COMPARED = ["selected_indices.json", "eval_ccfs.json", "eval_distilled_random.json", "eval_random.json"]


def make_pool(n, classes, seed):
    """A synthetic gathered pool for selection benchmarks: (index, label, pred, hardness, teacher_correct).

    Random labels, filter predictions 30 % wrong, teacher 80 % right, a forgetting-like difficulty in
    steps of 0.2 (many ties), global indices shuffled as a gathered distributed result would be.
    """
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, n)
    wrong = rng.random(n) < 0.3
    pred = np.where(wrong, (label + rng.integers(1, max(classes, 2), n)) % classes, label)
    hardness = rng.integers(0, 301, n) / 5.0                # 0.0 .. 60.0 in steps of 0.2
    teacher_correct = rng.random(n) < 0.8
    index = rng.permutation(n).astype(np.int64)             # pool arrives in gather order, not index order
    return index, label, pred, hardness, teacher_correct


def generated_data(classes, pool, size, channels, seed=0):
    """RealData of uniform uint8 noise, `pool` training images with balanced random labels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (pool, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randperm(pool, generator=g) % classes
    train = TensorPool(images, labels)
    test = TensorPool(images[:0], labels[:0])
    return RealData("generated", [str(c) for c in range(classes)], train, test,
                    Norm((0.5,) * channels, (0.25,) * channels))


def make_cifar_like(folder, c=CIFAR):
    """Generated CIFAR-shaped image folder (train/ and test/, one sub-folder per class); `c` as CIFAR."""
    from ccfs_dist.data.distilled import write_image_folder
    g = torch.Generator().manual_seed(0)
    for split, per_class in (("train", c["train_per_class"]), ("test", c["test_per_class"])):
        n = per_class * c["classes"]
        labels = torch.arange(n) % c["classes"]
        # class-dependent mean colour + noise: learnable, so the filters misclassify only part of the pool
        base = (labels[:, None, None, None].float() * 23 % 256)
        images = (base + 64 * torch.randn((n, 3, c["size"], c["size"]), generator=g)).clamp(0, 255).to(torch.uint8)
        write_image_folder(os.path.join(folder, split), images, labels, [f"c{i}" for i in range(c["classes"])])
    return folder
