"""Difficulty scores trained on the stream vs in memory, and a teacher from shards vs in memory (issue 15).

    python launch/bench_stream_scores.py [--runs 32] [--epochs 20] [--buffer 256] [--out /tmp/ccfs_bench_stream]
    python launch/bench_stream_scores.py --throughput [--sizes 8,32,224] [--out /tmp/ccfs_bench_stream]
    python launch/bench_stream_scores.py --bias [--runs 6] [--buffer 512] [--out /tmp/ccfs_bench_stream]

For planted digits and a generated class-sorted pool (5 % of the training labels flipped, ccfs_dist/bench/stream_pools.py),
both written as shards of 200: forgetting / loss / EL2N from `scores.training_dynamics` on the shards (streamed
through a shuffle buffer of --buffer samples: a pool within the buffer would be read once and score exactly as
in memory) and in memory, same recipe and seeds (ConvNet width 8, depth 2, batch 256, averaged over --runs
runs), and in memory with other seeds (the run-to-run noise that bounds any two computations' agreement). Prints the Spearman rank
correlations and the AUROC of the planted samples. Then the digits teacher recipe (30 epochs, batch 128,
lr 0.1) from shards vs in memory over 3 seeds: test accuracy.

--throughput: the cost of a score run on the stream against in memory (issue 24), per image size: a generated
pool of 8x8, 32x32 or 224x224 RGB PNGs (2,048 / 2,048 / 256 samples, shards of 256), one score run of the
default model (ConvNet-D3, width 8) for --throughput-epochs epochs (5; 224 px: 1), median of --repeat (3; 224 px: 1) after a warm-up
round, as images trained per second: resident (train_model),
streamed every epoch (stream.shuffle_buffer = N / 4) and read once (the buffer holds the pool), plus the
stream's loader alone (read, check, decode, buffer; no training).

--bias: the default config's score runs (digits, 30 epochs) one by one, --runs of them in memory and as many
streamed (shards of 200 through a --buffer-sample shuffle buffer), the same seeds: the mean forgetting / loss /
EL2N of each (a systematic shift is a different estimator) and the mean single-run Spearman memory-memory
(distinct runs) against stream-memory (distinct runs).
"""
import argparse
import os
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=32)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--buffer", type=int, default=256, help="stream.shuffle_buffer of the streamed scores")
    p.add_argument("--out", default="/tmp/ccfs_bench_stream")
    p.add_argument("--throughput", action="store_true", help="score-run images/s streamed vs resident by image size")
    p.add_argument("--sizes", default="8,32,224")
    p.add_argument("--bias", action="store_true", help="per-run means and Spearman, default config, stream vs memory")
    p.add_argument("--throughput-epochs", type=int, default=5, help="--throughput: epochs of the score run")
    p.add_argument("--repeat", type=int, default=3, help="--throughput: timed repeats (median)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.throughput:
        return throughput(args)
    if args.bias:
        return bias(args)
    from ccfs_dist.bench.stream_pools import (auroc, generated_pool, planted_digits, spearman, teacher_accuracies,
                                              write_pool_shards)
    from ccfs_dist.config import load_config
    from ccfs_dist.data.sources import load_real
    from ccfs_dist.runtime.dist import make_accelerator
    from ccfs_dist.training.scores import training_dynamics
    from ccfs_dist.data.shards.reader import load_shards

    acc = make_accelerator()
    recipe = [f"scores.runs={args.runs}", f"scores.epochs={args.epochs}", "scores.batch_size=256",
              "model.width=8", "model.depth=2"]
    default = os.path.join(ROOT, "configs", "default.yaml")
    print(f"scores: {' '.join(recipe)}")
    for name, (data, planted) in (("digits", planted_digits()), ("generated", generated_pool())):
        streamed = load_shards(write_pool_shards(data, os.path.join(args.out, name), per_shard=200))
        t0 = time.perf_counter()
        memory, _ = training_dynamics(acc, load_config(default, recipe), data)
        t1 = time.perf_counter()
        stream, _ = training_dynamics(acc, load_config(default, recipe + [f"stream.shuffle_buffer={args.buffer}"]),
                                      streamed)
        t2 = time.perf_counter()
        other, _ = training_dynamics(acc, load_config(default, recipe + ["seed=1000"]), data)
        print(f"{name}: {len(data.train)} samples, {int(planted.sum())} planted; in memory {t1 - t0:.1f} s, "
              f"streamed {t2 - t1:.1f} s")
        for m in memory:
            print(f"  {m:<10} Spearman stream vs memory {spearman(memory[m], stream[m]):.4f}   memory vs memory "
                  f"(other seeds) {spearman(memory[m], other[m]):.4f}   AUROC planted: streamed "
                  f"{auroc(stream[m], planted):.4f}, in memory {auroc(memory[m], planted):.4f}", flush=True)

    from ccfs_dist import cli
    folder = os.path.join(args.out, "digits_cli")
    if not os.path.exists(os.path.join(folder, "test.json")):
        cli.main(["shards", "--out", folder, "--per-shard", "300", "data.source=digits"])
    mem = load_real({"source": "digits"})
    sh = load_shards({"root": os.path.join(folder, "train.json"), "test_root": os.path.join(folder, "test.json")})
    results = teacher_accuracies(acc, mem, sh)
    for seed, row in enumerate(results):
        print(f"teacher seed {seed}: test accuracy in memory {100 * row[0]:.2f} %, from shards {100 * row[1]:.2f} %")
    r = np.array(results)
    print(f"teacher mean: in memory {100 * r[:, 0].mean():.2f} %, from shards {100 * r[:, 1].mean():.2f} %")


def throughput(args):
    from ccfs_dist.bench.stream_pools import generated_pool, write_pool_shards
    from ccfs_dist.config import load_config
    from ccfs_dist.runtime.dist import OneRankAccelerator, make_accelerator
    from ccfs_dist.training.scores import dynamics_run
    from ccfs_dist.data.shards.reader import load_shards
    from ccfs_dist.training.stream_train import epoch_batches, epoch_plan

    acc = OneRankAccelerator(make_accelerator())
    default = os.path.join(ROOT, "configs", "default.yaml")
    print(f"one score run of {args.throughput_epochs} epochs (224 px: 1), median of {args.repeat} (224 px: 1) after a "
          f"warm-up round, images trained per second")
    print("size  N     batch | resident | streamed (buffer N/4) | read once (buffer N) | loader alone (buffer N/4)")
    for size in (int(s) for s in args.sizes.split(",")):
        n, batch = (256, 64) if size >= 128 else (2048, 128)
        data, _ = generated_pool(classes=10, per_class=n // 10 + 1, test_per_class=1, size=size, fraction=0.0)
        n = len(data.train)
        streamed = load_shards(write_pool_shards(data, os.path.join(args.out, f"throughput_{size}"), per_shard=256))
        epochs, repeat = (1, 1) if size >= 128 else (args.throughput_epochs, args.repeat)   # 224 px: minutes an epoch
        recipe = ["scores.runs=1", f"scores.epochs={epochs}", f"scores.batch_size={batch}"]
        ways = [(data, 4096), (streamed, n // 4), (streamed, n)]
        times = [[] for _ in ways]
        for rep in range(repeat + 1):                    # interleaved: a busy machine slows all alike
            for way, (pool, buffer) in enumerate(ways):
                t = time.perf_counter()
                dynamics_run(acc, load_config(default, recipe + [f"stream.shuffle_buffer={buffer}"]), pool, 0)
                if rep:                                       # the first round warms the kernels up
                    times[way].append(time.perf_counter() - t)
        rates = [epochs * n / np.median(t) for t in times]
        plan = epoch_plan(n, batch, 1)
        loads = []
        for _ in range(repeat):
            t = time.perf_counter()
            for _ in epoch_batches(streamed.train, plan, 0, 0, 0, n // 4, 16, share=batch):
                pass
            loads.append(time.perf_counter() - t)
        print(f"{size:<5} {n:<5} {batch:<5} | {rates[0]:>8,.0f} | {rates[1]:>21,.0f} | {rates[2]:>20,.0f} | "
              f"{n / np.median(loads):>25,.0f}", flush=True)


def bias(args):
    import itertools
    from ccfs_dist.bench.stream_pools import spearman, write_pool_shards
    from ccfs_dist.config import load_config
    from ccfs_dist.runtime.dist import OneRankAccelerator, make_accelerator
    from ccfs_dist.training.scores import dynamics_run
    from ccfs_dist.data.shards.reader import load_shards
    from ccfs_dist.data.sources import load_real

    acc = OneRankAccelerator(make_accelerator())
    cfg = load_config(os.path.join(ROOT, "configs", "default.yaml"), [f"stream.shuffle_buffer={args.buffer}"])
    memory = load_real({"source": "digits"})
    streamed = load_shards(write_pool_shards(memory, os.path.join(args.out, "digits_200"), per_shard=200))
    runs = {name: [dynamics_run(acc, cfg, data, r)[0] for r in range(args.runs)]
            for name, data in (("memory", memory), ("stream", streamed))}
    print(f"default config, {args.runs} runs x {cfg['scores']['epochs']} epochs each way, buffer {args.buffer}")
    for m in ("forgetting", "loss", "el2n"):
        mm = [spearman(runs["memory"][i][m], runs["memory"][j][m]) for i, j in itertools.combinations(range(args.runs), 2)]
        sm = [spearman(runs["stream"][i][m], runs["memory"][j][m]) for i in range(args.runs) for j in range(args.runs)
              if i != j]
        print(f"  {m:<10} mean score memory {np.mean([r[m].mean() for r in runs['memory']]):.4f} stream "
              f"{np.mean([r[m].mean() for r in runs['stream']]):.4f}; single-run Spearman memory-memory "
              f"{np.mean(mm):.4f} stream-memory {np.mean(sm):.4f}", flush=True)


if __name__ == "__main__":
    main()
