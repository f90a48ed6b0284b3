#!/usr/bin/env python
"""Wall time of whole CCFS runs with 1 and 2 processes, back to back, and a cost model for many devices.

    python launch/bench_scaling.py                         # both workloads, then the cost model
    python launch/bench_scaling.py --workloads default     # the default run (configs/default.yaml) only
    python launch/bench_scaling.py --workloads default --repeat 5 eval.runs=3   # 5 pairs, with an override
    python launch/bench_scaling.py --model-only --rates R.json

Workloads: `default` (configs/default.yaml as it is) and `cifar` (CIFAR-shaped: 32x32 RGB, 10 classes,
generated images written as an image folder, a ConvNet-D3; see ccfs_dist.bench.pools.CIFAR). Each runs `python launch/ccfs.py`
and then `accelerate launch --cpu --num_processes 2 launch/ccfs.py`, both with OMP_NUM_THREADS=1, and
prints the wall seconds of every step (summary.json's wall_seconds), the whole command, the ratio, and
whether the results are byte-identical. The load average is printed before and after: other work on
the machine shifts both numbers.

The cost model (plan.py's plan of a run on W devices, each training costed in images processed at the
rates measured in the 1-process `cifar` run) predicts the paper's CIFAR-10 IPC 500 and CIFAR-100 IPC 50
pipelines on 1 / 8 / 16 devices; see BENCHMARKS.md for what it assumes.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "ccfs.py")
CIFAR_OVERRIDES = ["teacher.epochs=10", "distill.iterations=100", "distill.jitter=4", "train.epochs=30",
                   "scores.epochs=10", "aug.scale_min=0.08", "aug.flip=true", "ccfs.ipc=20"]
PAPER = {   # (config, overrides, sizes): the paper's recipes with computed forgetting scores (5 runs x 200 epochs)
    "CIFAR-10 IPC 500": ("configs/cifar10_ipc500.yaml", {"n_train": 50000, "num_classes": 10, "class_size": 5000}),
    "CIFAR-100 IPC 50": ("configs/cifar100_ipc50.yaml", {"n_train": 50000, "num_classes": 100, "class_size": 500}),
}
PAPER_OVERRIDES = ["ccfs.difficulty=forgetting", "scores.runs=5", "scores.epochs=200", "data.root=unused"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="default,cifar", help="comma-separated: default, cifar")
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    p.add_argument("--rates", default=None, help="JSON of measured rates for the cost model (default: from the "
                                                 "cifar run, else the cifar rates in BENCHMARKS.md must be given)")
    p.add_argument("--model-only", action="store_true", help="only the cost model (needs --rates)")
    p.add_argument("--split-sweep", action="store_true", help="only the measurement behind train.min_batch_per_rank: "
                   "one training whole vs split over 2 processes, per global batch size")
    p.add_argument("--repeat", type=int, default=1, help="pairs of runs per workload, back to back (default 1); "
                   "with more, the whole-command ratios and their median are printed at the end")
    p.add_argument("--sweep-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides for every run, after the workload's own (e.g. eval.runs=3)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    return args


def run(out, processes, args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    if processes == 1:
        cmd = [sys.executable, SCRIPT, "--out", out, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, "--out", out, *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        return seconds, json.load(f)


def same_results(a, b):
    from ccfs_dist.bench.pools import COMPARED
    return all(open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read() for n in COMPARED)


def bench(name, folder, args, repeat=1):
    """`repeat` pairs of runs (1 process, then 2), back to back; the step table of each pair, and with
    several pairs the whole-command ratios and their median (start-up times vary by a few tenths of a second)."""
    ratios = []
    for i in range(repeat):
        print(f"\n== {name}{f' (pair {i + 1} of {repeat})' if repeat > 1 else ''}: "
              f"load average {os.getloadavg()[0]:.2f} before", flush=True)
        one_dir, two_dir = (os.path.join(folder, f"{name}_{p}" + (f"_{i}" if i else "")) for p in (1, 2))
        one_s, one = run(one_dir, 1, args)
        two_s, two = run(two_dir, 2, args)
        print(f"{'step':<22}{'1 process s':>13}{'2 processes s':>15}{'ratio':>8}")
        for step, s1 in one["wall_seconds"].items():
            s2 = two["wall_seconds"][step]
            print(f"{step:<22}{s1:>13.1f}{s2:>15.1f}{s2 / max(s1, 1e-9):>8.2f}")
        print(f"{'whole command':<22}{one_s:>13.1f}{two_s:>15.1f}{two_s / one_s:>8.2f}")
        print(f"results byte-identical: {same_results(one_dir, two_dir)}; "
              f"load average {os.getloadavg()[0]:.2f} after", flush=True)
        ratios.append(two_s / one_s)
    if repeat > 1:
        print(f"\n== {name}: whole-command ratios {' '.join(f'{r:.2f}' for r in ratios)}; "
              f"median {sorted(ratios)[(repeat - 1) // 2]:.2f} (the lower middle one for an even count)")
    return one


def rates_of(summary):
    """Images per second measured in a 1-process run: CE training (teacher), KD training (filters), scoring."""
    phases = summary["phases"]
    kd_images = sum(p["train"]["images_per_s"] * p["train"]["seconds"] for p in phases)
    score_images = sum(p["score"]["images_per_s"] * p["score"]["seconds"] for p in phases)
    return {"train": summary["teacher"]["images_per_s"],
            "train_kd": kd_images / sum(p["train"]["seconds"] for p in phases),
            "score": score_images / sum(p["score"]["seconds"] for p in phases)}


def predict(cfg, world, sizes, rates):
    """Predicted wall seconds of a run on `world` devices: per stage, the most loaded rank's trainings
    (plan.py) at the measured rates, plus the collective steps split W ways (distillation at the CE
    training rate, scoring of the pool at the scoring rate)."""
    from ccfs_dist.training.evaluate import regime_of
    from ccfs_dist.runtime.plan import KD_COST, make_plan
    from ccfs_dist.ccfs.selection import phase_budgets
    stages = make_plan(cfg, world, **sizes)

    def seconds(job):
        kd = (job.kind == "filter" and cfg["train"]["kd"]) or (job.kind == "eval" and regime_of(job.key) == "kd")
        return job.cost / (KD_COST if kd else 1.0) / rates["train_kd" if kd else "train"]

    total = 0.0
    for stage in stages:
        shared = sum(seconds(j) for j in stage.split) / world
        total += shared + max(sum(seconds(j) for j in jobs) for jobs in stage.local)
    c, d = cfg["ccfs"], cfg["distill"]
    budgets = phase_budgets(c["ipc"], c["alpha"], c["phases"])
    n, classes = sizes["n_train"], sizes["num_classes"]
    items = (c["ipc"] - sum(budgets)) * math.ceil(classes / d["batch_classes"])
    total += math.ceil(items / world) * d["iterations"] * min(classes, d["batch_classes"]) / rates["train"]
    pool, picked = n, 0
    for k in budgets:
        total += (pool - picked) / world / rates["score"]
        picked += k * classes
    total += n / world / rates["score"]                       # the teacher's pass over the pool
    return total


def cost_model(rates):
    from ccfs_dist.config import load_config
    print(f"\n== cost model (rates, images/s: train {rates['train']:.0f}, KD train {rates['train_kd']:.0f}, "
          f"score {rates['score']:.0f})")
    print(f"{'pipeline':<20}{'1 device h':>12}{'8 devices h':>13}{'speed-up':>10}{'16 devices h':>14}{'speed-up':>10}")
    for name, (path, sizes) in PAPER.items():
        cfg = load_config(os.path.join(ROOT, path), PAPER_OVERRIDES)
        one, eight, sixteen = (predict(cfg, w, sizes, rates) for w in (1, 8, 16))
        print(f"{name:<20}{one / 3600:>12.1f}{eight / 3600:>13.1f}{one / eight:>10.2f}{sixteen / 3600:>14.1f}"
              f"{one / sixteen:>10.2f}")


SWEEP_BATCHES = (32, 64, 128, 256, 512, 1024)


def split_sweep_worker(out):
    """Under 2 processes: seconds per step of one training whole on rank 0 (rank 1 idle) and split over both
    (DDP), per global batch size, ConvNet-D3 on CIFAR-shaped images; rank 0 writes them to `out` (JSON)."""
    import torch
    from ccfs_dist.data.pool import Norm
    from ccfs_dist.runtime.dist import OneRankAccelerator, make_accelerator, wait_for_all
    from ccfs_dist.training.models import build_model
    from ccfs_dist.training.train import Recipe, train_model
    acc = make_accelerator()
    steps, rows = 12, []
    for batch in SWEEP_BATCHES:
        images = torch.randint(0, 256, (batch * steps // 2, 3, 32, 32), dtype=torch.uint8)
        labels = torch.arange(len(images)) % 10
        times = {}
        for mode in ("warm-up", "whole", "split"):
            if mode == "split" or acc.is_main_process:
                torch.manual_seed(0)
                model = build_model({"name": "convnet", "width": 32, "depth": 3, "norm": "batchnorm"}, 10, 3, 32)
                _, stats = train_model(acc if mode == "split" else OneRankAccelerator(acc), model, images, labels,
                                       Recipe(epochs=2, batch_size=batch, lr=0.01), norm=Norm((0.5,) * 3, (0.25,) * 3))
                times[mode] = stats["seconds"] / stats["steps"]
            wait_for_all(acc)
        rows.append({"batch": batch, "per_rank": batch // acc.num_processes, "whole_s": times.get("whole"),
                     "split_s": times["split"]})
    if acc.is_main_process:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    wait_for_all(acc)


def split_sweep():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "sweep.json")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines",
               "1", "--mixed_precision", "no", "--dynamo_backend", "no", os.path.abspath(__file__), "--sweep-worker",
               out]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: the split sweep failed:\n{proc.stderr[-3000:]}")
        rows = json.load(open(out))
    print(f"\n== one training whole on one rank vs split over 2 (DDP), ConvNet-D3 32x32, load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'global batch':>13}{'per rank':>10}{'whole ms/step':>15}{'split ms/step':>15}{'speed-up':>10}")
    for r in rows:
        print(f"{r['batch']:>13}{r['per_rank']:>10}{1000 * r['whole_s']:>15.1f}{1000 * r['split_s']:>15.1f}"
              f"{r['whole_s'] / r['split_s']:>10.2f}")


def main(argv=None):
    args = parse_args(argv)
    if args.sweep_worker:
        split_sweep_worker(args.sweep_worker)
        return 0
    if args.split_sweep:
        split_sweep()
        return 0
    if args.model_only:
        if not args.rates:
            sys.exit("error: --model-only needs --rates (a JSON with train, train_kd, score images/s)")
        cost_model(json.load(open(args.rates)))
        return 0
    folder = args.out or tempfile.mkdtemp(prefix="bench_scaling_")
    rates = json.load(open(args.rates)) if args.rates else None
    for name in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        if name == "default":
            bench(name, folder, args.overrides, args.repeat)
        elif name == "cifar":
            from ccfs_dist.bench.pools import make_cifar_like
            data = make_cifar_like(os.path.join(folder, "cifar_like"))
            one = bench(name, folder, ["data.source=imagefolder", f"data.root={data}", *CIFAR_OVERRIDES,
                                       *args.overrides], args.repeat)
            rates = rates or rates_of(one)
        else:
            sys.exit(f"error: --workloads: unknown workload {name!r} (default, cifar)")
    if rates:
        print(f"rates: {json.dumps({k: round(v, 1) for k, v in rates.items()})}")
        cost_model(rates)
    return 0


if __name__ == "__main__":
    from ccfs_dist.runtime.relaunch import relaunch_cpu_processes
    relaunch_cpu_processes([os.path.abspath(__file__), *sys.argv[1:]])
    from ccfs_dist.runtime.dist import exit_process
    sys.exit(exit_process(main()))
