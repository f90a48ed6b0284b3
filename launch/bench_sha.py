#!/usr/bin/env python
"""What checking every shard's sha256 while streaming costs: the loader alone (ShardPool.batches, no model,
the case where the hash is the largest share), with the check and with the hashing taken out, alternated.

    python launch/bench_sha.py                 # 64,000 16x16 RGB PNGs in 32 shards, in /tmp/ccfs_bench_sha

After a pass that warms the page cache, prints images/s of each pass (the order alternates), the median
ratio (checked / unchecked) over the pairs, and hashlib's sha256 rate alone.
"""
import argparse
import hashlib
import os
import statistics
import time


import numpy as np  # noqa: E402
import torch  # noqa: E402

from ccfs_dist.bench.shards import generate  # noqa: E402  (bench_shards.py's synthetic shard set)
from ccfs_dist.data.shards import index as shard_index, reader as shard_reader  # noqa: E402


def stream(index_path, workers, batch_size=512):
    split = shard_reader.ShardPool(index_path, num_workers=workers)
    start, n = time.perf_counter(), 0
    for _, labels, _ in split.batches(np.arange(len(split)), batch_size, 0, 1, torch.device("cpu")):
        n += len(labels)
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/ccfs_bench_sha")
    p.add_argument("--samples", type=int, default=64000)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: decode in this process)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    gen = argparse.Namespace(out=args.out, samples=args.samples, small=args.samples, classes=1000, image_size=16,
                             per_shard=2000, seed=0, gen_workers=min(4, os.cpu_count() or 1))
    index, _ = generate(gen)
    hashing_read, hashing_check = shard_index.HashingReader.read, shard_index.HashingReader.check

    def unhashed_read(self, n):             # the same reader without the digest
        data = self.stream.read(n)
        self.size += len(data)
        return data
    rates = {"checked": [], "unchecked": []}
    stream(index, args.workers)                # warm the page cache
    for r in range(args.repeats):
        for name in (["checked", "unchecked"] if r % 2 else ["unchecked", "checked"]):
            on = name == "checked"
            shard_index.HashingReader.read = hashing_read if on else unhashed_read
            shard_index.HashingReader.check = hashing_check if on else (lambda *a: None)
            rates[name].append(stream(index, args.workers))
            print(f"{name}: {rates[name][-1]:,.0f} img/s", flush=True)
    ratios = [c / u for c, u in zip(rates["checked"], rates["unchecked"])]
    blob = os.urandom(64 << 20)
    t = time.perf_counter()
    hashlib.sha256(blob).hexdigest()
    sha_rate = len(blob) / (time.perf_counter() - t) / 1e6
    size = sum(s["bytes"] for s in shard_index.read_index(index)[1])
    print(f"median checked / unchecked: {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max "
          f"{max(ratios):.3f}); {size / args.samples:.0f} bytes a sample; sha256 alone {sha_rate:,.0f} MB/s")


if __name__ == "__main__":
    main()
