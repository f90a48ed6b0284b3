#!/usr/bin/env python
"""Training on the stream at ImageNet-1K size: peak RSS flat in pool size, and throughput against a resident batch.

Uses launch/bench_shards.py's synthetic shard set (generated once into --out: 1,281,167 random 16x16 RGB PNGs over
1000 classes, 641 shards of 2000, and an index over the first 128,000). For each pool (small, then full), in a
fresh process: stream_train.train_stream (ConvNet-D3 width 32, CE, SGD, batch --batch-size, --workers loader
workers, stream.shuffle_buffer --buffer, stream.interleave --interleave) for part of the first epoch,
against the same training step (augment + forward + backward + SGD) on one batch already in memory (the
ceiling), in paired windows: after --warmup steps, every --window streamed steps are followed by --window
resident steps on a copy of the model, --pairs times (this machine's speed swings with load; a pair sees
the same). Prints peak RSS of the rank and of its loader workers per pool, their ratio full / small (target
<= 1.15), median streamed and resident img/s and the median paired ratio.

    python launch/bench_stream_train.py            # CPU: 1 rank, 1 loader worker, 1 compute thread
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Stop(Exception):
    pass


def child(args):
    import copy
    import statistics
    import torch
    from ccfs_dist.data.pool import Norm
    from ccfs_dist.training.augment import Augment
    from ccfs_dist.runtime.dist import make_accelerator
    from ccfs_dist.training.models import build_model
    from ccfs_dist.data.shards.reader import ShardPool
    from ccfs_dist.training.stream_train import train_stream
    from ccfs_dist.training.train import Recipe
    torch.set_num_threads(args.threads)
    acc = make_accelerator()
    split = ShardPool(args.child, num_workers=args.workers)
    cfg = {"name": "convnet", "width": args.width, "depth": 3, "norm": "batchnorm"}
    torch.manual_seed(0)
    model = build_model(cfg, len(split.classes), 3, split.shape[1])
    norm = Norm(tuple(split.meta["mean"]), tuple(split.meta["std"]))

    # the ceiling: the same training step (augment + forward + backward + SGD) on a resident batch, on a copy
    resident = copy.deepcopy(model).train()
    augment = Augment(norm, split.shape[1])
    x = torch.randint(0, 256, (args.batch_size,) + tuple(split.shape), dtype=torch.uint8)
    y = torch.randint(0, len(split.classes), (args.batch_size,))
    opt = torch.optim.SGD(resident.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)

    def resident_window():
        t0 = time.perf_counter()
        for _ in range(args.window):
            loss = torch.nn.functional.cross_entropy(resident(augment(x, generator=gen)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return args.window * args.batch_size / (time.perf_counter() - t0)

    state = {"step": 0, "t": None, "stream": [], "resident": []}

    def on_batch(ids, logits):            # after `warmup` steps: windows of streamed steps, each followed by a
        state["step"] += 1                # resident window (paired: the same machine load)
        k = state["step"] - args.warmup
        if k == 0:
            state["t"] = time.perf_counter()
        elif k > 0 and k % args.window == 0:
            state["stream"].append(args.window * args.batch_size / (time.perf_counter() - state["t"]))
            state["resident"].append(resident_window())
            if len(state["stream"]) == args.pairs:
                raise _Stop
            state["t"] = time.perf_counter()
    try:
        train_stream(acc, model, split, Recipe(epochs=1, batch_size=args.batch_size, lr=0.05), norm=norm,
                     on_batch=on_batch, shuffle_buffer=args.buffer, interleave=args.interleave)
    except _Stop:
        pass
    ratios = [a / b for a, b in zip(state["stream"], state["resident"])]
    with open(args.json, "w") as f:
        json.dump({"samples": len(split), "shards": len(split.shards),
                   "rss_rank_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                   "stream_ips": statistics.median(state["stream"]), "resident_ips": statistics.median(state["resident"]),
                   "paired_ratio": statistics.median(ratios), "pairs": len(ratios)}, f)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/ccfs_bench_shards", help="folder of bench_shards.py's shards")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--pairs", type=int, default=12, help="(streamed window, resident window) pairs")
    p.add_argument("--window", type=int, default=10, help="steps per window")
    p.add_argument("--warmup", type=int, default=20, help="streamed steps before the first window")
    p.add_argument("--buffer", type=int, default=4096, help="stream.shuffle_buffer")
    p.add_argument("--interleave", type=int, default=16, help="stream.interleave")
    p.add_argument("--gen-workers", type=int, default=2, help="writer processes (first run only)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    from ccfs_dist.bench.shards import generate
    gen = argparse.Namespace(out=args.out, samples=1281167, small=128000, classes=1000, image_size=16,
                             per_shard=2000, seed=0, gen_workers=args.gen_workers)
    full, small = generate(gen)
    results = {}
    for tag, index in (("small", small), ("full", full)):
        out = os.path.join(args.out, f"stream_train_{tag}.result.json")   # not train_small.json: that is an index
        flags = ["--child", index, "--json", out] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                     if k not in ("child", "json", "out", "gen_workers")]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), CUDA_VISIBLE_DEVICES="",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([sys.executable, os.path.abspath(__file__)] + flags, check=True, env=env)
        with open(out) as f:
            results[tag] = json.load(f)
    print(f"\nstreamed training, convnet width {args.width} on 16 px PNGs, batch {args.batch_size}, "
          f"{args.workers} loader worker(s), {args.threads} thread(s), buffer {args.buffer}, interleave {args.interleave}")
    print(f"{'pool':>10} {'shards':>7} {'peak RSS rank MB':>17} {'worker MB':>10} {'stream img/s':>13} "
          f"{'resident img/s':>15} {'paired ratio':>13}")
    for r in results.values():
        print(f"{r['samples']:>10} {r['shards']:>7} {r['rss_rank_mb']:>17.0f} {r['rss_worker_mb']:>10.0f} "
              f"{r['stream_ips']:>13.0f} {r['resident_ips']:>15.0f} {r['paired_ratio']:>12.1%}")
    ratio = results["full"]["rss_rank_mb"] / results["small"]["rss_rank_mb"]
    print(f"peak RSS per rank, full / small pool: {ratio:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
