"""Fetch samples from a shard pool with the ranks sharing the reading (ShardPool.fetch with an accelerator).

Usage: shard_fetch_worker.py TRAIN_INDEX.json OUT.npz   (run directly or under `accelerate launch`)

Every rank fetches the same shuffled third of the pool, counting the shards it opens, and gathers uneven rows
(rank r sends 3 * r rows; rank 0 none) through gather_rows_in_pieces, 16 bytes (one row) a piece. Rank 0 writes the
images, labels, index, per-rank shard counts and the gathered rows to OUT.npz. Then the ranks write a shared
synthetic set (train.synthetic: shared) of 4 fetched rows + the same samples into OUT.npz.S.npy, each rank
reading its shards only (their counts: `shared_opened`).
"""
import sys

import numpy as np
import torch

from ccfs_dist.data.shards import reader as shard_reader
from ccfs_dist.data import synthetic
from ccfs_dist.runtime.dist import exit_process, gather_rows, gather_rows_in_pieces, make_accelerator, relaunch_cpu_processes

OPENED = []
_samples = shard_reader._ShardStream._samples


def counting(self, shard):
    OPENED.append(shard["url"])
    yield from _samples(self, shard)


def main(index_path, out):
    shard_reader._ShardStream._samples = counting
    acc = make_accelerator(timeout_s=120)
    split = shard_reader.ShardPool(index_path)
    index = np.random.default_rng(3).permutation(len(split))[:len(split) // 3]
    x, y = split.fetch(index, batch_size=7, accelerator=acc)
    opened = gather_rows(acc, {"n": torch.tensor([len(OPENED)])})["n"]
    r = acc.process_index
    rows = torch.arange(3 * r, dtype=torch.int64) + 100 * r
    pieces = list(gather_rows_in_pieces(acc, {"a": rows, "b": rows[:, None].repeat(1, 2).float()}, piece_bytes=16))
    del OPENED[:]
    synthetic.build(acc, "shared", out + ".S.npy", [synthetic.Resident(x[:4], y[:4]), (split, index)], split.shape)
    shared_opened = gather_rows(acc, {"n": torch.tensor([len(OPENED)])})["n"]
    if acc.is_main_process:
        np.savez(out, images=x.numpy(), labels=y.numpy(), index=index, opened=opened.numpy(),
                 world=acc.num_processes, shared_opened=shared_opened.numpy(), pieces=len(pieces), a=torch.cat([p["a"] for p in pieces]).numpy(),
                 b=torch.cat([p["b"] for p in pieces]).numpy())
    acc.wait_for_everyone()


if __name__ == "__main__":
    relaunch_cpu_processes([__file__, *sys.argv[1:]])
    main(sys.argv[1], sys.argv[2])
    exit_process(0)
