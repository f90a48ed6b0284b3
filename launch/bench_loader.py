#!/usr/bin/env python
"""What the loader workers cost to start and how fast they deliver: repeated passes over a generated
CIFAR-shaped shard set (32 x 32 RGB PNGs) through ShardPool.batches with --workers loader workers, no model.

Prints the shard writer's seconds (`ccfs shards` with --write-workers processes), then per pass the
seconds to its first batch and its images/s: the first pass of a split pays the workers' start (with a
fork server: also the server's own start, once per process), later passes reuse them (before issue 27 every
pass forked new workers). --repo runs another checkout's engine (e.g. /work/main) on the same data, so
that before and after are measured by one script:

    python launch/bench_loader.py --repo /work/main --out /tmp/bench_loader
    python launch/bench_loader.py --out /tmp/bench_loader
"""
import argparse
import os
import pickle
import shutil
import subprocess
import sys
import time


def fake_cifar(folder, n, seed=0):
    """A CIFAR-10 python-pickle set of n random training images (5 batches) and n // 5 test images."""
    import numpy as np
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)

    def batch(name, count, offset):
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": [(offset + i) % 10 for i in range(count)]}, f)
    for i in range(1, 6):
        batch(f"data_batch_{i}", n // 5, i)
    batch("test_batch", n // 5, 0)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="checkout whose ccfs_dist the steps run (default: this one; on their PYTHONPATH)")
    p.add_argument("--out", default="/tmp/bench_loader", help="folder for the generated data and shards")
    p.add_argument("--n", type=int, default=10000, help="training images")
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--workers", type=int, default=2, help="loader workers (data.num_workers)")
    p.add_argument("--write-workers", type=int, default=2, help="writer processes (ccfs shards --workers)")
    p.add_argument("--passes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--step", choices=("write", "read"), default=None,
                   help="run one step in this process (default: generate the data, then each step in a fresh one)")
    args = p.parse_args()
    source = os.path.join(args.out, "cifar")
    if args.step is None:                    # each step in a fresh process: each pays its own process starts
        if not os.path.exists(os.path.join(source, "batches.meta")):
            fake_cifar(source, args.n)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(args.repo)] +
                                                         [p for p in [os.environ.get("PYTHONPATH")] if p]))
        for step in ("write", "read"):
            subprocess.run([sys.executable, os.path.abspath(__file__), "--step", step] + sys.argv[1:], check=True,
                           env=env)
        shutil.rmtree(os.path.join(args.out, "shards"))
        return
    import numpy as np
    import torch
    import ccfs_dist
    from ccfs_dist.data.shards.reader import ShardPool
    from ccfs_dist.data.shards.writer import write_shards
    torch.set_num_threads(1)
    if args.step == "write":
        print(f"engine: {os.path.dirname(ccfs_dist.__file__)}")
    shards = os.path.join(args.out, "shards")
    if args.step == "write":
        cfg = {"source": "cifar10", "root": source, "image_size": None, "distilled": None}
        t = time.perf_counter()
        write_shards(cfg, shards, "train", per_shard=args.per_shard, workers=args.write_workers, overwrite=True,
                     log=lambda m: None)
        print(f"write: {args.n} images in {time.perf_counter() - t:.2f} s with {args.write_workers} writer "
              f"processes (in a fresh process, this one's process starts included)")
        return
    t = time.perf_counter()
    split = ShardPool(os.path.join(shards, "train.json"), num_workers=args.workers)
    index = np.arange(len(split))
    rows = []
    for i in range(args.passes):
        first, n = None, 0
        for _, _, ids in split.batches(index, args.batch_size, 0, 1, torch.device("cpu")):
            first = first or time.perf_counter() - t
            n += len(ids)
        rows.append((first, n / (time.perf_counter() - t)))
        print(f"pass {i + 1}: first batch after {first:.3f} s, {rows[-1][1]:,.0f} images/s", flush=True)
        t = time.perf_counter()
    later = rows[1:]
    print(f"read: first pass (from the split's creation in a fresh process) {rows[0][0]:.3f} s to its first batch, "
          f"{rows[0][1]:,.0f} images/s; later passes median {np.median([r[0] for r in later]):.3f} s to the first "
          f"batch, median {np.median([r[1] for r in later]):,.0f} images/s ({args.workers} workers)")


if __name__ == "__main__":
    main()
