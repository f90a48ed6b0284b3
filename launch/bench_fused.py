#!/usr/bin/env python
"""Fused trainings (issue 23): images/s of K trainings fused into one step against the same K trainings one
after another, and the default run with plan.fuse=1 against the default.

    PYTHONPATH=. python launch/bench_fused.py [--models convnet resnet18] [--ks 1 2 4 8] [--batches 32 64]
                                             [--losses ce kd] [--size 32] [--steps 6] [--run [--run-fuse 3]] [--json OUT]

Shapes: for each model (ConvNet-D3 width --width, BatchNorm; the CIFAR ResNet-18), batch, loss (cross-entropy, or
KD from a teacher of the same architecture) and K: fused.train_fused of K fresh models on K random uint8
sets of `--size` px (1 epoch of --steps steps each), against train.train_model of the same K models one
after another (the engine's paths, augmentation included). An untimed fused and sequential training warms
up each shape. images/s counts every model's images; speedup = fused / sequential. On this shared CPU keep
--steps small; the figure is the median of --repeats paired measurements (fused then sequential).

--run: the default run (`ccfs run` with the default config into a temporary folder, in this process,
1 process) with plan.fuse=1, then with each of --run-fuse, back to back; prints the wall time of the whole
command and of its training stages (summary.json's wall_seconds, all but the distillation).
"""
import argparse
import json
import statistics
import time


def shape_rates(model_name, batch, loss, ks, size, steps, repeats, width=32):
    import torch
    from ccfs_dist.runtime.dist import OneRankAccelerator, make_accelerator
    from ccfs_dist.data.pool import Norm
    from ccfs_dist.training.fused import train_fused
    from ccfs_dist.training.models import build_model
    from ccfs_dist.runtime.progress import set_mode
    from ccfs_dist.training.train import Recipe, train_model
    set_mode("off")
    local = OneRankAccelerator(make_accelerator())
    cfg = {"name": model_name, "width": width, "depth": 3, "norm": "batchnorm"}
    classes, n = 10, steps * batch
    norm = Norm((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    teacher = build_model(cfg, classes, 3, size).eval() if loss == "kd" else None
    recipe = Recipe(epochs=1, batch_size=batch, lr=0.05)
    g = torch.Generator().manual_seed(0)
    sets = [(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
             torch.randint(0, classes, (n,), generator=g)) for _ in range(max(ks))]

    def fresh(k):
        torch.manual_seed(k)
        return build_model(cfg, classes, 3, size)

    def fused(k):
        t = time.perf_counter()
        train_fused(local, [fresh(i) for i in range(k)], sets[:k], recipe, norm=norm,
                    seeds=list(range(k)), teacher=teacher)
        return k * n / (time.perf_counter() - t)

    def sequential(k):
        t = time.perf_counter()
        for i in range(k):
            train_model(local, fresh(i), *sets[i], recipe, norm=norm, seed=i, teacher=teacher)
        return k * n / (time.perf_counter() - t)

    fused(1), sequential(1)                               # warm-up
    rows = []
    for k in ks:
        pairs = [(fused(k), sequential(k)) for _ in range(repeats)]
        f = statistics.median(p[0] for p in pairs)
        s = statistics.median(p[1] for p in pairs)
        ratio = statistics.median(p[0] / p[1] for p in pairs)
        rows.append({"model": model_name, "size": size, "batch": batch, "loss": loss, "k": k, "fused_img_s": round(f, 1),
                     "sequential_img_s": round(s, 1), "speedup": round(ratio, 2)})
        print(f"{model_name:9s} b{batch:<3d} {loss} K={k}: fused {f:8.1f} img/s, sequential {s:8.1f} img/s, "
              f"speedup {ratio:.2f}", flush=True)
    return rows


def default_run(fuse, overrides):
    """`ccfs run` of the default config (plus `overrides`) into a temporary folder, in this process, with
    plan.fuse=`fuse`: the whole command's wall time, the run's per-stage wall_seconds (summary.json) and the
    sum of those that train (teacher + scores, the phases with their baseline evaluations, the evaluation)."""
    import os
    import tempfile
    from ccfs_dist.cli import main as ccfs
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        t = time.perf_counter()
        code = ccfs(["run", "--out", out, "--progress", "off", *overrides, f"plan.fuse={fuse}"])
        wall = time.perf_counter() - t
        assert code == 0, f"the run failed ({code})"
        summary = json.load(open(os.path.join(out, "summary.json")))
    stages = summary["wall_seconds"]
    training = sum(v for k, v in stages.items() if k != "distill")
    return {"fuse": fuse, "wall_s": round(wall, 1), "training_stages_s": round(training, 1), "stages": stages,
            "ccfs_final": summary["evaluation"]["ccfs"]["final"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["convnet", "resnet18"])
    p.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--batches", nargs="+", type=int, default=[32, 64])
    p.add_argument("--losses", nargs="+", default=["ce", "kd"])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=int, default=32, help="ConvNet width (the demo's: 8)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--run", action="store_true", help="also the default run, plan.fuse=1 against the default")
    p.add_argument("--run-fuse", nargs="+", type=int, default=[3], help="plan.fuse values to compare with 1")
    p.add_argument("--run-overrides", nargs="*", default=[], help="config overrides of the compared runs")
    p.add_argument("--skip-shapes", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    rows = []
    if not args.skip_shapes:
        for model in args.models:
            for batch in args.batches:
                for loss in args.losses:
                    rows += shape_rates(model, batch, loss, args.ks, args.size, args.steps, args.repeats, args.width)
    runs = []
    if args.run:
        for fuse in [1, *args.run_fuse]:
            runs.append(default_run(fuse, args.run_overrides))
            print(json.dumps(runs[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shapes": rows, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
