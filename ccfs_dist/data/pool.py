"""The pool: what every split of real data offers, declared once.

Every pool (`Pool`) has `labels`, a length, an image `shape`, `fetch` and `batches`; selection, scoring
and the curriculum use nothing else, so they run alike on an in-memory split (`TensorPool`, memory.py's
sources) and a streamed one (`shard_reader.ShardPool`). Only an in-memory pool (`in_memory` True) holds its
`images` tensor resident, which a training over the whole set can index directly; code asks
`pool.in_memory`, never the class.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from ccfs_dist.runtime.dist import rank_slice, share


class Norm(NamedTuple):
    """A source's normalisation, per channel in [0, 1] units: an image is fed as (x / 255 - mean) / std.
    Set where the data is loaded (RealData.norm) and passed whole to every training and prediction."""
    mean: tuple
    std: tuple


@runtime_checkable
class Pool(Protocol):
    """What every pool offers. Row i of the pool is the sample with global index i."""

    labels: torch.Tensor  # int64, N (a streamed pool reads them from its index: no image is decoded)
    in_memory: bool       # True: `images` (uint8 N x C x H x W) is resident (see InMemoryPool)

    def __len__(self) -> int: ...

    @property
    def shape(self) -> tuple:
        """(C, H, W) of every image."""

    def fetch(self, index, accelerator=None, batch_size=256):
        """(uint8 images, labels) of the samples `index`, in that order; every rank gets them whole. With an
        `accelerator` every rank must call it with the same index (a streamed pool splits the reading);
        `batch_size`: how many samples a streamed pool decodes at a time."""

    def fetch_shares(self, index, accelerator=None, batch_size=256):
        """Yield this rank's share of the samples `index` (unique) as (positions in `index`, uint8 images); the
        union over the ranks is every sample once (synthetic.write puts them into a file shared by the ranks).
        Every rank must iterate it to its end."""

    def batches(self, index, batch_size, rank, world, device):
        """Yield this rank's share of `index` as (uint8 images, labels, global ids) on `device`; the union
        over the ranks is every sample of `index` exactly once."""


@runtime_checkable
class InMemoryPool(Pool, Protocol):
    """A pool whose images are resident (in_memory True)."""

    images: torch.Tensor  # uint8, N x C x H x W


@dataclass
class TensorPool:
    """An in-memory pool (InMemoryPool): every rank holds the images whole."""
    images: torch.Tensor  # uint8, N x C x H x W, contiguous
    labels: torch.Tensor  # int64, N
    in_memory = True      # a class attribute, not a field

    def __len__(self):
        return int(self.labels.numel())

    @property
    def shape(self):
        """(C, H, W) of every image."""
        return tuple(int(d) for d in self.images.shape[1:])

    def fetch(self, index, accelerator=None, batch_size=256):
        """(uint8 images, labels) of the samples `index`, in that order. (`accelerator`, `batch_size`: the
        Pool interface; every rank holds an in-memory split whole and copies the rows at once.)"""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return self.images.index_select(0, idx), self.labels[idx]

    def fetch_shares(self, index, accelerator=None, batch_size=256):
        """This rank's contiguous share of the positions of `index` (Pool.fetch_shares), `batch_size` at a time."""
        index = np.asarray(index, dtype=np.int64)
        lo, hi = share(accelerator, len(index))
        for a in range(lo, hi, batch_size):
            positions = np.arange(a, min(hi, a + batch_size))
            yield positions, self.images.index_select(0, torch.from_numpy(index[positions]))

    def batches(self, index, batch_size, rank, world, device):
        """Yield this rank's share of `index` as (uint8 images, labels, global ids) on `device`.

        `index` is cut into global batches of `batch_size` (the last may be shorter), dealt whole to the
        ranks in contiguous runs: a sample is scored in the same batch whatever the process count, so its
        numbers do not depend on it (a kernel's arithmetic can depend on the batch it runs in).
        On a GPU the whole split is moved there first when it takes less than half the free memory, so
        batches are gathered on the device instead of copied from the host one at a time.
        """
        images, labels = self.images, self.labels
        if device.type == "cuda" and images.numel() < 0.5 * torch.cuda.mem_get_info(device)[0]:
            images, labels = images.to(device), labels.to(device)
        index = torch.as_tensor(np.asarray(index, dtype=np.int64))
        lo, hi = rank_slice(math.ceil(len(index) / batch_size), rank, world)
        for b in range(lo, hi):
            ids = index[b * batch_size:(b + 1) * batch_size]
            rows = ids.to(images.device)
            # index_select copies whole rows, far faster than images[rows] (the generic indexing kernel; BENCHMARKS.md)
            yield images.index_select(0, rows).to(device), labels[rows].to(device), ids.to(device)


@dataclass
class RealData:
    """A source's train pool, test split, class names and normalisation."""
    name: str
    classes: list  # class names, index = label
    train: Pool  # the pool: row i has global index i
    test: Pool
    norm: Norm

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def channels(self):
        return self.train.shape[0]

    @property
    def image_size(self):
        return self.train.shape[1]
