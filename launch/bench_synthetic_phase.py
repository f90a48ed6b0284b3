#!/usr/bin/env python
"""A curriculum phase on a streamed pool with the synthetic set held `shared` or `resident` (train.synthetic):
peak RSS per rank flat in pool size, and memory per node (issue 15, item 2).

Uses launch/bench_shards.py's generated shard set (once, into --out: 1,281,167 random 16x16 RGB PNGs over 1,000
classes, 641 shards of 2,000, and an index over the first 128,000). For each (pool, store) in a fresh
`torch.distributed.run --nproc_per_node --ranks` run, every rank: opens the pool, builds S_{j-1} (--ipc
images per class of the pool, synthetic.build: a shared file in --out or resident tensors), then, after a
reset of the peak RSS (/proc/self/clear_refs), runs the phase through the engine's own functions: the filter
(ConvNet-D3 width 32, one epoch of train.train_model on S_{j-1}, batch 256, split over the ranks), scoring
of the streamed pool minus S_{j-1} (predict.predict), selection (selection.select, --k per class, simplest
misclassified) and S_j = S_{j-1} + the selected images (synthetic.build: each rank writes its shards' rows
into the new shared file, or every rank fetches them all). At the end every rank reads S_j whole (as the next
filter would) and reports its peak RSS (VmHWM) since the reset and its PSS (/proc/self/smaps_rollup:
shared pages count 1/n to each of the n processes mapping them); the node's memory is the sum of the PSS.

Prints per run the pool, store, ranks, peak RSS per rank, PSS per rank and per node, and the ratio of the
peak RSS with the full pool to that with the small pool (target <= 1.15).

    python launch/bench_synthetic_phase.py [--ranks 2] [--ipc 80] [--k 10] [--runs shared:small,shared:full,resident:small,resident:full]
"""
import argparse
import json
import os
import subprocess
import sys
import time

from ccfs_dist.bench.procs import free_port, status_kb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args):
    import numpy as np
    import torch
    from ccfs_dist.data import synthetic
    from ccfs_dist.runtime.dist import exit_process, make_accelerator
    from ccfs_dist.training.models import build_model
    from ccfs_dist.training.predict import predict
    from ccfs_dist.ccfs.selection import random_per_class, select
    from ccfs_dist.data.pool import Norm
    from ccfs_dist.data.shards.reader import ShardPool
    from ccfs_dist.training.train import Recipe, train_model
    from ccfs_dist.ccfs.difficulty import to_hardness
    torch.set_num_threads(1)
    acc = make_accelerator()
    split = ShardPool(args.child)
    norm = Norm(tuple(split.meta["mean"]), tuple(split.meta["std"]))
    labels = split.labels.numpy()
    folder = os.path.join(args.out, f"synthetic_{args.store}_{len(split)}")
    if acc.is_main_process:
        os.makedirs(folder, exist_ok=True)
    acc.wait_for_everyone()
    t0 = time.perf_counter()
    first = random_per_class(labels, args.ipc, seed=0)
    previous = synthetic.build(acc, args.store, os.path.join(folder, "S_0.npy"), [(split, first)], split.shape)
    setup_s = time.perf_counter() - t0

    with open("/proc/self/clear_refs", "w") as f:          # the phase's own peak from here
        f.write("5")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_model({"name": "convnet", "width": 32, "depth": 3, "norm": "batchnorm"}, len(split.classes), 3,
                        split.shape[1])
    model, _ = train_model(acc, model, previous.images, previous.labels, Recipe(epochs=1, batch_size=256, lr=0.05),
                           norm=norm, seed=1, desc="filter")
    train_s = time.perf_counter() - t0
    pool = np.setdiff1d(np.arange(len(split)), first)
    preds, _ = predict(acc, model, split, pool, norm=norm, batch_size=512, desc="predict")
    score_s = time.perf_counter() - train_s - t0
    sel = select(preds["index"], preds["label"], preds["pred"], to_hardness(preds["true_logit"], "logits"), args.k,
                 num_classes=len(split.classes), seed=2)
    current = synthetic.build(acc, args.store, os.path.join(folder, "S_1.npy"), [previous, (split, sel.indices)],
                              split.shape)
    before = len(previous)
    synthetic.drop(acc, previous)
    previous = None                                       # as the curriculum lets S_(j-1) go
    held = current.images
    checksum = int(np.asarray(held, dtype=np.uint8).sum(dtype=np.int64))   # S_j read whole, as the next filter would
    phase_s = time.perf_counter() - t0
    out = {"rank": acc.process_index, "ranks": acc.num_processes, "pool": len(split), "store": args.store,
           "synthetic_before": before, "synthetic_after": len(current), "set_mb": held.nbytes / 2**20,
           "peak_rss_mb": status_kb("VmHWM") / 1024, "rss_mb": status_kb("VmRSS") / 1024,
           "pss_mb": status_kb("Pss", "/proc/self/smaps_rollup") / 1024, "checksum": checksum,
           "setup_s": setup_s, "train_s": train_s, "score_s": score_s, "phase_s": phase_s}
    with open(f"{args.json}.rank{acc.process_index}", "w") as f:
        json.dump(out, f)
    acc.wait_for_everyone()
    synthetic.drop(acc, current)
    if acc.is_main_process:
        os.rmdir(folder)                                   # the sets are gone: nothing of the run stays in --out
    exit_process(0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/ccfs_bench_shards", help="folder of bench_shards.py's shards")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--ipc", type=int, default=80, help="images per class of S_{j-1}")
    p.add_argument("--k", type=int, default=10, help="images per class the phase selects")
    p.add_argument("--runs", default="shared:small,shared:full,resident:small,resident:full",
                   help="comma-separated store:pool (store shared|resident, pool small|full)")
    p.add_argument("--gen-workers", type=int, default=2, help="writer processes (first run only)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    from ccfs_dist.bench.shards import generate          # by its module name: its writer processes pickle by name
    index = dict(zip(("full", "small"), generate(argparse.Namespace(
        out=args.out, samples=1281167, small=128000, classes=1000, image_size=16, per_shard=2000, seed=0,
        gen_workers=args.gen_workers))))     # the shard set bench_shards.py and bench_stream_train.py use
    results = []
    for run in args.runs.split(","):
        store, pool = run.split(":")
        out = os.path.join(args.out, f"synthetic_phase_{store}_{pool}.result.json")
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
                        "--master_port", str(free_port()), os.path.abspath(__file__), "--child", index[pool],
                        "--store", store, "--json", out, "--out", args.out, "--ipc", str(args.ipc), "--k", str(args.k)],
                       check=True, env=env)
        ranks = []
        for r in range(args.ranks):
            with open(f"{out}.rank{r}") as f:
                ranks.append(json.load(f))
        results.append(ranks)
    print(f"\na phase on a streamed pool of 16 px RGB PNGs, 1,000 classes, {args.ranks} CPU rank(s), S_(j-1) "
          f"{args.ipc} per class, k {args.k} per class")
    print(f"{'store':>9} {'pool':>10} {'S_j':>8} {'set MB':>7} {'peak RSS / rank MB':>19} {'PSS / rank MB':>14} "
          f"{'PSS / node MB':>14} {'phase s':>8}")
    peaks = {}
    for ranks in results:
        r0 = ranks[0]
        peak = max(r["peak_rss_mb"] for r in ranks)
        peaks[(r0["store"], r0["pool"])] = peak
        per_rank = {key: " / ".join(f"{r[key]:.0f}" for r in ranks) for key in ("peak_rss_mb", "pss_mb")}
        print(f"{r0['store']:>9} {r0['pool']:>10} {r0['synthetic_after']:>8} {r0['set_mb']:>7.0f} "
              f"{per_rank['peak_rss_mb']:>19} {per_rank['pss_mb']:>14} {sum(r['pss_mb'] for r in ranks):>14.0f} "
              f"{max(r['phase_s'] for r in ranks):>8.0f}")
    for store in ("shared", "resident"):
        pools = sorted(pool for s, pool in peaks if s == store)
        if len(pools) == 2:
            small, full = peaks[(store, pools[0])], peaks[(store, pools[1])]
            print(f"{store}: peak RSS per rank, {pools[1]} / {pools[0]} samples: {full / small:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
