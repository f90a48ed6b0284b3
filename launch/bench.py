#!/usr/bin/env python
"""Per-phase throughput benchmark: each phase of a CCFS run against its compute-only ceiling.

    python launch/bench.py [--config CFG] [key.sub=value ...]      (also `ccfs bench`)

Phases (the first curriculum phase of a run, on the config's data and model, or on generated data):
  filter_train  train_model on S_0 (floor(ipc * alpha) images per class), KD from the teacher when train.kd
  score         predict.predict of that filter over the whole pool (data.train)
  select        selection.select on the scoring phase's prediction arrays (hardness = filter logits)
  select_1k     select at ImageNet-1K size (1,281,167 samples, 1000 classes, k 100) on the synthetic pool of
                launch/bench_selection.py (ccfs_dist.bench.pools.make_pool)
  eval_train    train_model on an evaluation-sized set (ipc images per class), KD unless eval.labels is hard

Ceilings, timed in the same run on the same model, batch, precision, memory format and compile setting:
  training  forward + loss + backward + optimizer step (+ the teacher's forward under no_grad when KD is on)
            on one batch already resident on the device and normalised: no indexing, no augmentation
  scoring   the model's forward (eval, no_grad) on one resident normalised batch of predict.batch_size per rank
Engine and ceiling are timed in pairs, back to back, so that load from other jobs hits both alike: every
few epochs of train_model (at least 10 steps; from its on_epoch_end hook) are followed by the ceiling for
as many steps, every scoring pass by the ceiling for as many batches. images/s is the median engine
rate, ratio the median of the per-pair ratios, and the ceiling shown is images/s / ratio. On the CPU
the JSON also has cpu_ratio, the same from process CPU time (immune to waiting for a core: on a shared
machine, with OMP_NUM_THREADS=1, it is the figure to trust). The first epoch of a training run (cold
start) is not paired; an untimed run first warms up (and compiles).
Throughput does not depend on the number of epochs, so a training run is about --steps optimizer steps
in at least 4 epochs (a set larger than steps / 4 batches is cut to that size). Weights are never trained
to convergence here: the teacher is teacher.checkpoint when given, else a freshly initialised model of the
same architecture; S_0 is data.distilled when given, else random real images; neither changes the speed.
"seconds" is the time of --steps steps (training) or of one pass over the pool (scoring) at that rate.

Peak memory per rank and phase: on the GPU torch.cuda.max_memory_allocated, on the CPU the peak resident
set size (resource.getrusage, reset per phase through /proc/self/clear_refs where Linux allows it, else
the process's peak so far; `peak_reset` in the JSON says which). Selection is host
work: its figure is always the peak RSS.

Process counts: under `accelerate launch --num_processes N` (or torchrun) every rank runs every phase on its
share, exactly as the engine does; `--baseline ONE.json` (a 1-process run's --json) adds speedup and scaling
efficiency per phase; `--scaling N` runs the benchmark itself twice (1 process, then N processes, through
torch.distributed.run) and reports both with the speedup.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from ccfs_dist.bench import seeds as bench_seeds
from ccfs_dist.runtime import seeds
from ccfs_dist.bench.report import PHASES, add_scaling, format_table  # noqa: F401  (this script's API)
from ccfs_dist.bench.pools import generated_data, make_pool  # noqa: F401  (make_pool: this script's API)
from ccfs_dist.bench.timing import clock, cpu_name, mem_kind, paired, peak_mb, reset_peak, sync, timed
from ccfs_dist.training.augment import normalize
from ccfs_dist.cli import add_timeout_arg
from ccfs_dist.config import load_config
from ccfs_dist.data.distilled import load_distilled
from ccfs_dist.data.sources import load_real
from ccfs_dist.runtime.dist import exit_process, gather_rows, make_accelerator, relaunch_cpu_processes, share
from ccfs_dist.errors import CCFSError
from ccfs_dist.training.models import build_model, load_checkpoint
from ccfs_dist.training.predict import predict
from ccfs_dist.ccfs.selection import phase_budgets, random_per_class, select
from ccfs_dist.training.train import Recipe, compiled, train_model, train_step

# generated data (no --config): sizes as the earlier throughput script, 10 classes of 8x8x1 noise
GENERATED = ["ccfs.ipc=1000", "ccfs.alpha=0.2", "train.batch_size=128", "predict.batch_size=1024"]


# ------------------------------------------------------------------------------------ shared helpers

def _per_rank(acc, value):
    """Every rank's float `value`, in rank order (on every rank)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=acc.device)
    return [float(v) for v in gather_rows(acc, {"v": t})["v"].tolist()]


def _build(cfg, data, seed):
    torch.manual_seed(seed)
    return build_model(cfg["model"], data.num_classes, data.channels, data.image_size)


def _teacher(cfg, data):
    model = _build(cfg, data, cfg["seed"])
    if cfg["teacher"]["checkpoint"]:
        load_checkpoint(model, cfg["teacher"]["checkpoint"])
    return model.eval()


def _first_set(cfg, data, per_class):
    """S_0: data.distilled when given, else `per_class` random real images per class (same shapes)."""
    if cfg["data"]["distilled"]:
        d = load_distilled(cfg["data"]["distilled"], data.classes, per_class, data.channels, data.image_size,
                           resize=cfg["data"]["distilled_resize"])
        return d.images, d.labels
    labels = data.train.labels.numpy()
    return data.train.fetch(random_per_class(labels, per_class, bench_seeds.first_set(cfg["seed"])))


# --------------------------------------------------------------------------------------- training

def _cut(images, labels, batch_size, steps):
    """(images, labels, epochs): a run of about `steps` optimizer steps in at least 4 epochs (a set larger
    than steps / 4 batches is cut to that size; the speed does not depend on the set's size)."""
    per_epoch = max(1, math.ceil(steps / 4))
    if math.ceil(len(images) / batch_size) > per_epoch:
        images, labels = images[:per_epoch * batch_size], labels[:per_epoch * batch_size]
    return images, labels, max(1, math.ceil(steps / math.ceil(len(images) / batch_size)))


def bench_training(acc, cfg, data, teacher, images, labels, rec, *, steps, repeats, compile_arg, desc, seed):
    """Engine training (train_model) against its forward + backward (+ teacher forward) ceiling.

    After an untimed warm-up run and one run that measures memory, `repeats` runs of train_model each run
    the ceiling for one epoch's steps at every epoch end (from the on_epoch_end hook), so every engine
    epoch is paired with a ceiling window taken right after it under the same load. The first epoch of
    each run (cold start) is not paired. Figures are medians over the pairs.
    """
    device = acc.device
    batch = rec.batch_size
    rec = rec.replace(compile=compile_arg, checkpoint_every=0)
    mf = torch.channels_last if rec.channels_last else torch.contiguous_format
    x, y, epochs = _cut(images, labels, batch, steps)
    per_epoch = math.ceil(len(x) / batch)
    # pairs of at least 10 steps (whole epochs): switching between the two models costs some cache warmth
    chunk = min(max(1, math.ceil(10 / per_epoch)), max(1, (epochs - 1) // 2))
    common = dict(norm=data.norm, teacher=teacher, desc=desc)

    def engine(e, xs, ys, on_epoch_end=None):
        _, stats = train_model(acc, _build(cfg, data, seed), xs, ys, rec.replace(epochs=e), seed=seed,
                               on_epoch_end=on_epoch_end, **common)
        return stats

    engine(1, *_cut(images, labels, batch, min(steps, 8))[:2])         # warm-up (and compile)
    kind = mem_kind(device)
    reset = reset_peak(kind, device)
    plain = engine(epochs, x, y)                                        # memory, and the total time of a run
    peak = peak_mb(kind, device)

    # the ceiling: one resident, normalised batch of this rank's share, the same model/optimizer/precision
    lo, hi = share(acc, batch)
    rows = torch.arange(lo, hi) % len(x)
    xb = normalize(x[rows].to(device), *data.norm).contiguous(memory_format=mf)
    yb = y[rows].to(device)
    model = _build(cfg, data, seed).to(device, memory_format=mf).train()
    opt = torch.optim.SGD(model.parameters(), lr=rec.lr, momentum=rec.momentum,
                          weight_decay=rec.weight_decay)
    ddp, opt = acc.prepare(model, opt)
    opt = opt if acc.scaler is not None else opt.optimizer              # as train_model steps it
    forward = compiled(ddp, compile_arg)
    teacher_forward = None
    if teacher is not None:
        teacher_forward = compiled(teacher.to(device, memory_format=mf).eval(), compile_arg)

    def step():                                                         # the engine's own step, no schedule
        train_step(acc, opt, None, forward, xb, yb, teacher_forward=teacher_forward,
                   teacher_autocast=acc.autocast, temperature=rec.temperature)

    timed(step, 3, device)                                             # warm-up (and compile)
    engine_s, ceiling_s = [], []
    mark = {}

    def pair(epoch, _model):
        if epoch % chunk:
            return
        sync(device)
        now = clock()
        if "t" in mark:                                                 # not the first epoch of the run
            engine_s.append(now - mark["t"])
            ceiling_s.append(timed(step, per_epoch * chunk, device))
        mark["t"] = clock()

    for _ in range(repeats):
        mark.clear()
        engine(epochs, x, y, on_epoch_end=pair)
    del ddp, opt, forward, model
    acc.free_memory()
    fig = paired(engine_s, ceiling_s, batch * per_epoch * chunk, device)
    return {
        **fig, "images": batch * per_epoch * epochs, "seconds": batch * per_epoch * epochs / fig["images_per_s"],
        "run_seconds": plain["seconds"], "run_images_per_s": plain["images_per_s"],
        "peak_mem_mb": _per_rank(acc, peak), "memory": kind, "peak_reset": reset,
        "set_size": len(x), "batch_size": batch, "rank_batch": hi - lo, "steps_per_epoch": per_epoch,
        "pair_steps": per_epoch * chunk,
        "epochs": epochs, "kd": teacher is not None,
    }


# ---------------------------------------------------------------------------------------- scoring

def bench_scoring(acc, model, data, index, *, batch_size, channels_last, repeats):
    """Engine scoring (predict.predict over the pool) against the forward-only ceiling.

    Each scoring pass is paired with a ceiling window of as many batches per rank taken right after it;
    at least `repeats` and 5 pairs, more for short passes (about 2 s in all, at most 50). Figures are
    medians over the pairs. Returns (figures, the predictions of the first pass).
    """
    device = acc.device
    mf = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=mf).eval()
    kw = dict(norm=data.norm, batch_size=batch_size, channels_last=channels_last)
    kind = mem_kind(device)
    reset = reset_peak(kind, device)
    preds, first = predict(acc, model, data.train, index, desc="bench score", **kw)
    peak = peak_mb(kind, device)

    lo, hi = share(acc, len(index))
    rows = np.asarray(index)[lo:hi][:batch_size]
    xb, _ = data.train.fetch(rows)
    xb = normalize(xb.to(device), *data.norm).contiguous(memory_format=mf)
    rank_images = hi - lo                                               # the ceiling scores as many per rank

    @torch.no_grad()
    def forward():
        with acc.autocast():
            model(xb)

    def ceiling_pass():
        full, rest = divmod(rank_images, len(xb))
        timed(forward, full, device)
        if rest:
            with torch.no_grad(), acc.autocast():
                model(xb[:rest])
        acc.wait_for_everyone()               # like the engine's gather: a pass lasts as long as its slowest rank

    timed(forward, 2, device)                                          # warm-up
    pairs = max(repeats, 5, min(50, math.ceil(2.0 / max(first["seconds"], 1e-3))))
    pairs = int(_per_rank(acc, pairs)[0])                               # the same count on every rank
    engine_s, ceiling_s = [], []
    for _ in range(pairs):
        start = clock()
        predict(acc, model, data.train, index, desc="bench score", **kw)
        engine_s.append(clock() - start)
        ceiling_s.append(timed(ceiling_pass, 1, device))
    fig = paired(engine_s, ceiling_s, len(index), device)
    # ranks score their shares in parallel; the slowest share (the largest) bounds the ceiling
    return {
        **fig, "images": len(index), "seconds": len(index) / fig["images_per_s"], "run_seconds": first["seconds"],
        "peak_mem_mb": _per_rank(acc, peak), "memory": kind, "peak_reset": reset, "batch_size": batch_size,
    }, preds


# -------------------------------------------------------------------------------------- selection

def bench_select(acc, arrays, k, *, ccfs, num_classes, seed, repeats):
    """selection.select on (index, label, pred, hardness, teacher_correct); best of `repeats`."""
    device = acc.device
    index, label, pred, hardness, teacher_ok = arrays
    kw = dict(coarse=ccfs["coarse"], fine=ccfs["fine"], balance=ccfs["balance"],
              teacher_correct=teacher_ok if ccfs["teacher_correct"] else None, num_classes=num_classes, seed=seed)
    reset = reset_peak("rss", device)                                 # host work: resident set size
    best, sel = float("inf"), None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        sel = select(index, label, pred, hardness, k, **kw)
        best = min(best, time.perf_counter() - start)
    peak = peak_mb("rss", device)
    return {"images": int(len(index)), "seconds": best, "images_per_s": len(index) / max(best, 1e-9),
            "ceiling_images_per_s": None, "ratio": None, "peak_mem_mb": _per_rank(acc, peak),
            "memory": "rss", "peak_reset": reset, "k": int(k),
            "classes": int(num_classes), "selected": int(len(sel.indices))}


# ------------------------------------------------------------------------------------------ driver

def run_bench(acc, cfg, data, *, steps=60, repeats=3, phases=PHASES, compile_backend=None,
              selection_n=1_281_167, selection_classes=1000, selection_k=100):
    """Run the benchmark phases; returns the report (dict, JSON-able, identical on every rank)."""
    c = cfg["ccfs"]
    device = acc.device
    counts = np.bincount(data.train.labels.numpy(), minlength=data.num_classes)
    if c["ipc"] > counts.min():
        raise CCFSError(f"ccfs.ipc={c['ipc']} exceeds the smallest class ({counts.min()} images); lower ccfs.ipc")
    class_size = float(counts.mean())
    budgets = phase_budgets(c["ipc"], c["alpha"], c["phases"])
    n_distilled = max(1, c["ipc"] - sum(budgets))
    compile_arg = (compile_backend or True) if cfg["train"]["compile"] else False
    teacher = _teacher(cfg, data).to(device)
    kd_teacher = teacher if cfg["train"]["kd"] else None
    out = {}

    s0 = _first_set(cfg, data, n_distilled)
    filt = _build(cfg, data, bench_seeds.filter_model(cfg["seed"]))
    if "filter_train" in phases:
        rec = Recipe.for_phase(cfg, ipc=c["ipc"], class_size=class_size, per_class=n_distilled)
        out["filter_train"] = bench_training(acc, cfg, data, kd_teacher, *s0, rec, steps=steps, repeats=repeats,
                                             compile_arg=compile_arg, desc="bench filter", seed=bench_seeds.filter_model(cfg["seed"]))

    pool = np.arange(len(data.train))
    preds = None
    if "score" in phases or "select" in phases:
        kw = dict(norm=data.norm, batch_size=cfg["predict"]["batch_size"],
                  channels_last=cfg["train"]["channels_last"])
        teacher_preds, _ = predict(acc, teacher, data.train, pool, desc="teacher score", **kw)   # also a warm-up
        teacher_ok = teacher_preds["pred"] == teacher_preds["label"]
        if "score" in phases:
            out["score"], preds = bench_scoring(acc, filt, data, pool, batch_size=cfg["predict"]["batch_size"],
                                                channels_last=cfg["train"]["channels_last"], repeats=repeats)
        else:
            preds, _ = predict(acc, filt, data.train, pool, desc="bench score", **kw)
    if "select" in phases:
        arrays = (preds["index"], preds["label"], preds["pred"], -preds["true_logit"].astype(np.float64),
                  teacher_ok[preds["index"]])
        out["select"] = bench_select(acc, arrays, budgets[0], ccfs=c, num_classes=data.num_classes,
                                     seed=bench_seeds.selection(cfg["seed"]), repeats=repeats)
    if "select_1k" in phases and selection_n > 0:
        out["select_1k"] = bench_select(acc, make_pool(selection_n, selection_classes, cfg["seed"]), selection_k,
                                        ccfs=c, num_classes=selection_classes, seed=cfg["seed"], repeats=repeats)

    if "eval_train" in phases:
        final = data.train.fetch(random_per_class(data.train.labels.numpy(), c["ipc"], seeds.random_baseline(cfg["seed"])))
        rec = Recipe.for_evaluation(cfg, class_size=class_size)
        eval_teacher = teacher if cfg["eval"]["labels"] != "hard" else None     # eval.labels both: the KD one
        out["eval_train"] = bench_training(acc, cfg, data, eval_teacher, *final, rec, steps=steps, repeats=repeats,
                                           compile_arg=compile_arg, desc="bench eval", seed=bench_seeds.evaluation(cfg["seed"]))

    import accelerate
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu_name(), "cpus": os.cpu_count(),
        "threads_per_process": torch.get_num_threads(), "processes": acc.num_processes,
        "torch": torch.__version__, "accelerate": accelerate.__version__, "data": data.name,
        "image_shape": list(data.train.shape), "classes": data.num_classes, "pool": len(data.train),
        "model": cfg["model"], "mixed_precision": cfg["train"]["mixed_precision"],
        "channels_last": cfg["train"]["channels_last"], "compile": compile_arg, "kd": cfg["train"]["kd"],
        "steps": steps, "repeats": repeats, "phases": out,
    }


# ------------------------------------------------------------------------------------ command line

def add_args(p):
    p.add_argument("--config", default=None,
                   help="YAML run config whose data, model and recipe are benchmarked (e.g. configs/default.yaml); "
                        "default: generated noise images (--classes/--pool/--size/--channels) with "
                        + " ".join(GENERATED))
    p.add_argument("--classes", type=int, default=10, help="generated data: classes (default 10)")
    p.add_argument("--pool", type=int, default=20000, help="generated data: pool (training set) size (default 20000)")
    p.add_argument("--size", type=int, default=8, help="generated data: image size in pixels (default 8)")
    p.add_argument("--channels", type=int, default=1, help="generated data: channels (default 1)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per timed training run (default 60)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per phase, interleaved with as many ceiling windows; the best counts (default 3)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {', '.join(PHASES)}")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend when train.compile=true (default: inductor; 'eager' / 'aot_eager' "
                        "check the compile path quickly)")
    p.add_argument("--selection-n", type=int, default=1_281_167,
                   help="pool size of the select_1k phase (default 1281167, ImageNet-1K; 0 skips it)")
    p.add_argument("--selection-classes", type=int, default=1000, help="classes of the select_1k phase")
    p.add_argument("--selection-k", type=int, default=100, help="images per class selected in select_1k")
    p.add_argument("--json", default=None, help="write the report (JSON) to this file")
    p.add_argument("--baseline", default=None, help="a 1-process report (--json) to compute speedup against")
    p.add_argument("--scaling", type=int, default=None, metavar="N",
                   help="run the benchmark with 1 process and then N processes (torch.distributed.run) and report "
                        "both with the speedup (do not combine with accelerate launch)")
    add_timeout_arg(p)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. model.name=resnet18 train.mixed_precision=bf16 "
                        "train.channels_last=true train.compile=true")
    return p


def _load(args):
    overrides = list(args.overrides) if args.config else GENERATED + list(args.overrides)
    cfg = load_config(args.config, overrides)
    if args.config:
        data = load_real(cfg["data"])
    else:
        if min(args.classes, args.pool, args.size, args.channels) < 1:
            raise CCFSError("--classes, --pool, --size and --channels must be at least 1")
        data = generated_data(args.classes, args.pool, args.size, args.channels, seed=cfg["seed"])
    return cfg, data


def _child_argv(args):
    """The command line of one benchmark run with the options of `args` (less --scaling/--json/--baseline)."""
    out = []
    for key, value in vars(args).items():
        if key in ("scaling", "json", "baseline", "overrides", "func", "command") or value is None:
            continue
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out + list(args.overrides)


def _run_child(processes, argv, json_path, baseline=None):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           os.path.abspath(__file__), *argv, "--json", json_path]
    if baseline:
        cmd += ["--baseline", baseline]
    print(f"$ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        print(proc.stdout, end="")
        raise CCFSError(f"the {processes}-process benchmark failed (exit status {proc.returncode})")
    with open(json_path) as f:
        return json.load(f)


def scaling(args):
    if args.scaling < 1:
        raise CCFSError("--scaling must be at least 1")
    child = _child_argv(args)
    with tempfile.TemporaryDirectory() as tmp:
        one = _run_child(1, child, os.path.join(tmp, "p1.json"))
        many = _run_child(args.scaling, child, os.path.join(tmp, f"p{args.scaling}.json"),
                          baseline=os.path.join(tmp, "p1.json"))
    print(format_table(one, many), flush=True)
    if args.json:
        _write_json(args.json, {"runs": [one, many], "scaling_processes": args.scaling})
    return 0


def _write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def run_from_args(args):
    """The `ccfs bench` / launch/bench.py command; returns the exit status."""
    if args.scaling is not None:
        return scaling(args)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    bad = [p for p in phases if p not in PHASES]
    if bad or not phases:
        raise CCFSError(f"--phases must name some of {', '.join(PHASES)}, got {args.phases!r}")
    if args.steps < 1 or args.repeats < 1:
        raise CCFSError("--steps and --repeats must be at least 1")
    baseline = None
    if args.baseline:
        try:
            with open(args.baseline) as f:
                baseline = json.load(f)
        except (OSError, ValueError) as exc:
            raise CCFSError(f"--baseline {args.baseline}: cannot read a report ({exc})") from None
        baseline = baseline["runs"][0] if "runs" in baseline else baseline
    cfg, data = _load(args)
    acc = make_accelerator(cfg["train"]["mixed_precision"], timeout_s=args.timeout,
                           deterministic=cfg["train"]["deterministic"])
    report = run_bench(acc, cfg, data, steps=args.steps, repeats=args.repeats, phases=phases,
                       compile_backend=args.compile_backend, selection_n=args.selection_n,
                       selection_classes=args.selection_classes, selection_k=args.selection_k)
    report["config"] = args.config
    report["overrides"] = list(args.overrides)
    if baseline is not None:
        add_scaling(report, baseline)
    if acc.is_main_process:
        print(format_table(report), flush=True)
        if args.json:
            _write_json(args.json, report)
    acc.wait_for_everyone()
    acc.end_training()
    return 0


def main(argv=None, prog=None):
    p = add_args(argparse.ArgumentParser(prog=prog, description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    args = p.parse_intermixed_args(argv)         # overrides may come before and after options
    try:
        status = run_from_args(args)
    except CCFSError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return exit_process(status)                # several processes: no interpreter finalisation (see there)


if __name__ == "__main__":
    relaunch_cpu_processes([os.path.abspath(__file__), *sys.argv[1:]])
    sys.exit(main())
