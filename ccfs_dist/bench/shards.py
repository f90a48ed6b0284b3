"""A generated shard set at ImageNet-1K size for the benchmarks (random PNGs, written by worker processes that
import this module by name)."""
import json
import os
import time

import numpy as np

GEN = {}   # generation parameters, inherited by the writer processes (fork)


def _gen_shard(job):
    from ccfs_dist.data.images import encode_png
    from ccfs_dist.data.shards.tar import write_tar
    s, first, count = job
    rng = np.random.default_rng([GEN["seed"], s])
    size, labels, width = GEN["size"], GEN["labels"], GEN["width"]
    images = rng.integers(0, 256, (count, 3, size, size), dtype=np.uint8)

    def samples():
        for j in range(count):
            i = first + j
            yield f"{i:0{width}d}", {"cls": str(int(labels[i])).encode(), "png": encode_png(images[j], level=1)}
    path = os.path.join(GEN["out"], f"train-{s:06d}.tar")
    nbytes, sha = write_tar(path, samples())
    return {"file": os.path.basename(path), "first": first, "count": count, "bytes": nbytes, "sha256": sha}


def generate(args):
    """Write the synthetic shard set and its two index JSONs (skipped when they exist with these parameters)."""
    import multiprocessing
    from ccfs_dist.data.shards.index import FORMAT, key_width, write_index
    params = {"samples": args.samples, "classes": args.classes, "size": args.image_size,
              "per_shard": args.per_shard, "seed": args.seed}
    full, small = os.path.join(args.out, "train.json"), os.path.join(args.out, "train_small.json")
    if os.path.exists(full) and os.path.exists(small):
        with open(full) as f:
            if json.load(f).get("source", {}).get("bench") == params:
                print(f"shards: reusing {args.out}", flush=True)
                return full, small
    os.makedirs(args.out, exist_ok=True)
    labels = np.random.default_rng(args.seed).integers(0, args.classes, args.samples)
    GEN.update(seed=args.seed, size=args.image_size, labels=labels, width=key_width(args.samples), out=args.out)
    jobs = [(s, first, min(args.per_shard, args.samples - first))
            for s, first in enumerate(range(0, args.samples, args.per_shard))]
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(args.gen_workers) as pool:
        shards = []
        for k, entry in enumerate(pool.imap(_gen_shard, jobs, chunksize=4), 1):
            shards.append(entry)
            if k % 50 == 0 or k == len(jobs):
                print(f"  {k}/{len(jobs)} shards ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    base = {"format": FORMAT, "name": "synthetic", "split": "train", "classes": [str(c) for c in range(args.classes)],
            "shape": [3, args.image_size, args.image_size], "mean": [0.5] * 3, "std": [0.2887] * 3,
            "source": {"source": "synthetic", "bench": params}, "key_width": key_width(args.samples)}
    write_index(full, dict(base, num_samples=args.samples, shards=shards, labels=labels.tolist()))
    cut = [s for s in shards if s["first"] + s["count"] <= args.small]
    n_small = sum(s["count"] for s in cut)
    write_index(small, dict(base, num_samples=n_small, shards=cut, labels=labels[:n_small].tolist()))
    size_gb = sum(s["bytes"] for s in shards) / 1e9
    print(f"shards: {args.samples} samples, {len(shards)} shards, {size_gb:.2f} GB in {seconds:.0f} s "
          f"({args.samples / seconds:.0f} samples/s, {args.gen_workers} processes)", flush=True)
    return full, small
