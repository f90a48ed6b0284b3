"""How a set that models train on is held (`train.synthetic`): the synthetic set S_j of each phase
(distilled + selected so far) and each evaluation set (ccfs, the baselines).

    resident   uint8 tensors on every rank, moved whole to the device by train.train_model (small sets:
               CIFAR, Tiny ImageNet; the fastest path)
    shared     an uncompressed .npy file in the run directory (rundir.Layout names it), written once and
               atomically, then opened read-only with np.load(mmap_mode="r") on every rank: the page cache
               holds one copy per node, shared by the node's ranks, and train_model gathers each chunk's rows
               on the host and moves only them to the device (ImageNet-1K; BENCHMARKS.md)

Both kinds offer `images` (a uint8 tensor, or a read-only memmap), `labels` (int64 tensor) and len; the
rows, the order and the augmentation of a training are the same for both, so the results are equal.

A shared file is written by every rank together: rank 0 creates it under a hidden temporary name (which
`rundir.Run.open` removes after a kill), each rank writes its share of the rows at their byte offsets (rows
held by every rank: a contiguous slice each; rows of a pool: those of the shards the rank reads, so a
streamed pool's images never go to every rank), then rank 0 renames it into place.
"""
import os

import numpy as np
import torch

from ccfs_dist.runtime.dist import share
from ccfs_dist.runtime.io import wait_for

COPY_BYTES = 64 << 20          # rows copied at a time from one held set into a new file (bounded host memory)


class Resident:
    """A set held whole as uint8 tensors on every rank."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)


class Stored:
    """A set held in the .npy file at `path` (shared by the node's ranks through the page cache); `labels`
    in memory. The file is opened when `images` is asked for, so a set whose training is already finished
    (a resumed run) is never read and may be gone."""

    def __init__(self, path, labels):
        self.path, self.labels = path, labels

    def __len__(self):
        return len(self.labels)

    @property
    def images(self):
        return np.load(wait_for(self.path), mmap_mode="r", allow_pickle=False)   # renamed by rank 0, maybe on another node


def build(accelerator, store, path, parts, shape):
    """The set whose rows are `parts` one after another, held as `store` says ("resident" or "shared").

    A part is a held set (Resident or Stored), or (pool, index): the pool's samples `index` (unique), read
    with pool.fetch (resident) or written by the ranks reading them (shared, pool.fetch_shares). Every rank
    calls this with the same parts; `path`: the .npy file of a shared set."""
    labels = labels_of(parts)
    if store == "resident":
        images = [p.images if not isinstance(p, tuple) else p[0].fetch(p[1], accelerator=accelerator)[0]
                  for p in parts]
        return Resident(images[0] if len(images) == 1 else
                        torch.cat(images) if images else torch.empty((0,) + tuple(shape), dtype=torch.uint8), labels)
    write(accelerator, path, parts, (len(labels),) + tuple(shape))
    return Stored(path, labels)


def labels_of(parts):
    """The labels of the set made of `parts` (see build); no image is read."""
    labels = [p.labels if not isinstance(p, tuple) else p[0].labels[torch.as_tensor(np.asarray(p[1], dtype=np.int64))]
              for p in parts]
    return torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)


def write(accelerator, path, parts, shape):
    """Write the uint8 array of `shape` whose rows are `parts` (see build) to the .npy file at `path`:
    every rank its share, under a temporary name, renamed by rank 0 once every rank has written."""
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.shared.tmp")         # one name every rank knows (rundir.LEFTOVER)
    if accelerator.is_main_process:
        os.makedirs(folder, exist_ok=True)
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape).flush()   # header + sparse rows
    accelerator.wait_for_everyone()
    offset = np.load(wait_for(tmp), mmap_mode="r", allow_pickle=False).offset    # (another node's file: it may show late)
    row_bytes = int(np.prod(shape[1:]))
    # plain writes at byte offsets, not a writable mmap: ranks on other nodes may share the file system
    with open(tmp, "r+b") as f:
        def put(start, rows):                                  # rows: uint8 array of consecutive rows
            f.seek(offset + start * row_bytes)
            f.write(np.ascontiguousarray(rows).tobytes())

        first = 0
        for part in parts:
            if isinstance(part, tuple):
                pool, index = part
                for positions, images in pool.fetch_shares(index, accelerator=accelerator):
                    order = np.argsort(positions)                  # one write per run of consecutive rows
                    positions, images = positions[order], images.numpy()[order]
                    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
                    for at, rows in zip(np.split(positions, breaks), np.split(images, breaks)):
                        put(first + int(at[0]), rows)
            else:
                lo, hi = share(accelerator, len(part))
                step = max(1, COPY_BYTES // max(1, row_bytes))
                images = part.images                       # a Stored part opens its file once, not per chunk
                for a in range(lo, hi, step):
                    rows = images[a:min(hi, a + step)]
                    put(first + a, rows.numpy() if isinstance(rows, torch.Tensor) else rows)
            first += len(part) if not isinstance(part, tuple) else len(part[1])
        f.flush()
        os.fsync(f.fileno())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, path)
    accelerator.wait_for_everyone()


def drop(accelerator, held):
    """Delete a shared set's file once nothing trains on it again (rank 0; a resident set: nothing)."""
    if isinstance(held, Stored) and accelerator.is_main_process and os.path.exists(held.path):
        os.remove(held.path)
