#!/usr/bin/env python
"""One script that checks the engine on the device it finds: does a GPU give the same answer every time,
and how fast are its trainings against a plain-PyTorch loop of the same model.

    python launch/device_check.py --out DIR            # on a GPU: at most about 8 minutes
    python launch/device_check.py --out DIR            # without CUDA: the CPU checks (about a minute)
    python launch/device_check.py --out DIR --quick    # smaller CPU sizes (the test's)

Writes DIR/device_check.json ({"device", "command", "checks": [{name, passed, skipped, figures}]}) and
DIR/device_check.md (table rows for BENCHMARKS.md). Exit status 0 when every check that ran passed, 1 if
one failed (a check that raises is recorded as failed with its error, and the others still run).

Checks (ResNet-18 with the CIFAR stem on 32x32 images, 10 classes, KD from a second ResNet-18, on CUDA):
  environment     torch, CUDA, cuDNN, GPU name and SM count; the deterministic settings are in effect
  determinism     train_model twice (a few hundred steps at batch 32, train.deterministic on): bitwise equal
                  weights; then once with it off: the largest weight difference and the speed it gains; and
                  the crop boxes and flips of 250,000 views drawn for the device equal the CPU's
  step_time       a plain-PyTorch KD step (resident batch, no augmentation) at batch 32/64/128: eager fp32,
                  channels_last, bf16 autocast, and the fp32 step captured in a CUDA graph; eager / captured
                  says how launch-bound a step is. Passes when every variant runs.
  engine          the engine's filter (S_0 of CIFAR-10 IPC 500: 1,000 images, batch 32, KD), evaluation
                  (IPC 500: 5,000 images, batch 64, KD) and teacher (batch 128, cross-entropy) trainings
                  against the eager fp32 plain loop at their batch (the ceiling): passes at >= MIN_RATIO
  small_run       launch/ccfs.py twice on a generated CIFAR-shaped image folder (ResNet-18): the selection
                  and the evaluation files byte-identical
  small_run_bf16  the same run once with train.mixed_precision=bf16 train.channels_last=true: it finishes
  jpeg_decode     data.decode: device (images.decode_jpeg_batch, nvjpeg) against the CPU path (PIL) on
                  ImageNet-shaped JPEGs read at 224 px: mean |difference| <= JPEG_MEAN_TOL levels; images/s
Without CUDA, determinism and small_run run with a small ConvNet; the others are `skipped: no CUDA`.
"""
import argparse
import io as bytes_io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ccfs_dist.bench.pools import COMPARED, make_cifar_like  # noqa: E402
from ccfs_dist.data.pool import Norm  # noqa: E402
from ccfs_dist.training.augment import Augment  # noqa: E402
from ccfs_dist.runtime.dist import OneRankAccelerator, make_accelerator, set_determinism  # noqa: E402
from ccfs_dist.runtime.io import check_writable_folder, write_json, write_text  # noqa: E402
from ccfs_dist.training.models import build_model  # noqa: E402
from ccfs_dist.training.train import Recipe, kd_loss, train_model  # noqa: E402

MIN_RATIO = 0.5        # engine images/s over the plain loop's, for the engine check to pass
JPEG_MEAN_TOL = 1.0    # mean |difference| in levels, nvjpeg against the CPU path (docs/shards.md)
SCRIPT = os.path.join(ROOT, "launch", "ccfs.py")
# per mode: the model, the images, the determinism training (n images x epochs at batch 32), the small run
SIZES = {
    "cuda": {"model": {"name": "resnet18"}, "size": 32, "det_n": 1600, "det_epochs": 6, "steps": 40,
             "folder": {"classes": 10, "train_per_class": 200, "test_per_class": 50, "size": 32},
             "run": ["model.name=resnet18", "teacher.epochs=3", "distill.iterations=30", "train.epochs=6",
                     "scores.epochs=2", "scores.runs=1", "eval.runs=1", "ccfs.ipc=20", "distill.jitter=4"]},
    "cpu": {"model": {"name": "convnet", "width": 8, "depth": 2}, "size": 16, "det_n": 256, "det_epochs": 4,
            "folder": {"classes": 10, "train_per_class": 30, "test_per_class": 10, "size": 16},
            "run": ["model.width=8", "model.depth=2", "teacher.epochs=3", "distill.iterations=10", "train.epochs=4",
                    "scores.epochs=2", "scores.runs=1", "eval.runs=1", "ccfs.ipc=6", "distill.jitter=2"]},
    "quick": {"model": {"name": "convnet", "width": 4, "depth": 1}, "size": 8, "det_n": 64, "det_epochs": 2,
              "folder": {"classes": 4, "train_per_class": 12, "test_per_class": 4, "size": 8},
              "run": ["model.width=4", "model.depth=1", "teacher.epochs=1", "distill.iterations=2", "train.epochs=2",
                      "scores.epochs=1", "scores.runs=1", "eval.runs=1", "eval.baselines=false", "ccfs.ipc=3",
                      "ccfs.phases=1", "ccfs.alpha=0.34", "distill.jitter=1"]},
}
NORM = Norm((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
# paper shapes of the engine check (CIFAR-10 IPC 500): images, batch size, KD, epochs (about 150 steps each)
ENGINE = {"filter": (1000, 32, True, 5), "evaluation": (5000, 64, True, 2), "teacher": (6400, 128, False, 3)}
BATCHES = (32, 64, 128)


class Checks:
    """The records of the checks, in order; a check that raises fails with its error, the rest still run."""

    def __init__(self):
        self.records = []

    def run(self, name, fn, *args):
        start = time.perf_counter()
        try:
            passed, figures = fn(*args)
            record = {"name": name, "passed": bool(passed), "skipped": None, "figures": figures}
        except Exception as exc:          # noqa: BLE001 - the finding is recorded, the other checks run
            traceback.print_exc()
            record = {"name": name, "passed": False, "skipped": None,
                      "figures": {"error": f"{type(exc).__name__}: {str(exc).strip()[:500]}"}}
        record["seconds"] = round(time.perf_counter() - start, 1)
        self.records.append(record)
        print(f"{name}: {'passed' if record['passed'] else 'FAILED'} ({record['seconds']} s) "
              f"{json.dumps(record['figures'])}", flush=True)

    def skip(self, name, why):
        self.records.append({"name": name, "passed": None, "skipped": why, "figures": {}, "seconds": 0.0})
        print(f"{name}: skipped: {why}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generated(n, size, classes, seed):
    """n uint8 RGB images (noise around a colour per class: learnable) and their labels, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    base = (labels[:, None, None, None].float() * 23 % 256)
    return (base + 64 * torch.randn((n, 3, size, size), generator=g)).clamp(0, 255).to(torch.uint8), labels


def model_pair(sz, device, seed=0):
    """(student, teacher): fresh models of the mode's architecture, seeded; the teacher in eval mode."""
    torch.manual_seed(seed)
    student = build_model(sz["model"], 10, 3, sz["size"])
    torch.manual_seed(seed + 1)
    return student, build_model(sz["model"], 10, 3, sz["size"]).to(device).eval()


def flat(model):
    return torch.cat([v.detach().float().flatten().cpu() for v in model.state_dict().values()])


# ----------------------------------------------------------------------------------------------- checks

def environment(device):
    figures = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
               "deterministic": torch.are_deterministic_algorithms_enabled(),
               "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
               "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        figures.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=props.name,
                       sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                       memory_gb=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
    ok = figures["deterministic"] and not figures["cudnn_benchmark"] and figures["cublas_workspace"] is not None
    return ok, figures


def kd_training(acc, sz, deterministic):
    """train_model of the determinism check: (weights, seconds)."""
    set_determinism(deterministic)
    try:
        images, labels = generated(sz["det_n"], sz["size"], 10, seed=1)
        student, teacher = model_pair(sz, acc.device)
        model, stats = train_model(OneRankAccelerator(acc), student, images, labels, Recipe(sz["det_epochs"], 32, lr=0.05),
                                   norm=NORM, teacher=teacher, seed=3, desc="determinism")
        return flat(model), stats["seconds"], stats["steps"]
    finally:
        set_determinism(True)


def same_views(device, samples=250_000):
    """The crop boxes and flips of a score-run epoch's size drawn for `device` equal the CPU's (augment._rand)."""
    aug = Augment(NORM, 32)
    cpu, dev = (aug.draw(samples, 32, 32, torch.Generator().manual_seed(0), d) for d in ("cpu", device))
    return all(torch.equal(a, b.cpu()) for a, b in zip(cpu, dev))


def determinism(acc, sz):
    first, _, steps = kd_training(acc, sz, True)
    second, seconds, _ = kd_training(acc, sz, True)
    fast, fast_seconds, _ = kd_training(acc, sz, False)
    views = same_views(acc.device)
    return torch.equal(first, second) and views, {
        "steps": steps, "batch": 32, "bitwise_equal": torch.equal(first, second), "views_equal_cpu": views,
        "seconds": round(seconds, 2), "off_seconds": round(fast_seconds, 2),
        "off_speedup": round(seconds / max(fast_seconds, 1e-9), 3),
        "off_bitwise_equal": torch.equal(first, fast), "off_max_abs_diff": float((first - fast).abs().max())}


def plain_step_ms(sz, device, batch, variant, *, kd=True, steps=40):
    """ms per step of a plain-PyTorch training step on one resident normalised batch: the ceiling.
    variant: fp32 | channels_last | bf16 (autocast) | captured (the fp32 step replayed from a CUDA graph)."""
    student, teacher = model_pair(sz, device)
    fmt = torch.channels_last if variant == "channels_last" else torch.contiguous_format
    model = student.to(device, memory_format=fmt).train()
    teacher = teacher.to(memory_format=fmt)
    x = torch.randn(batch, 3, sz["size"], sz["size"], device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    bf16 = variant == "bf16"

    def loss_of():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
            if not kd:
                return F.cross_entropy(logits.float(), y)
            with torch.no_grad():
                target = teacher(x)
        return kd_loss(logits, target, 4.0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_of().backward()
        opt.step()
    if variant == "captured":                      # PyTorch's whole-network capture recipe
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            loss_of().backward()
            opt.step()
        step = graph.replay
    for _ in range(5):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return 1000 * (time.perf_counter() - start) / steps


def step_time(sz, device):
    figures = {}
    for batch in BATCHES:
        row = {v: round(plain_step_ms(sz, device, batch, v, steps=sz["steps"]), 3)
               for v in ("fp32", "channels_last", "bf16", "captured")}
        row["eager_over_captured"] = round(row["fp32"] / row["captured"], 2)
        figures[f"batch_{batch}_ms"] = row
    return all(np.isfinite(v) for row in figures.values() for v in row.values()), figures


def engine(acc, sz, device):
    figures, ok = {}, True
    for name, (n, batch, kd, epochs) in ENGINE.items():
        images, labels = generated(n, sz["size"], 10, seed=2)
        student, teacher = model_pair(sz, device)
        rec = Recipe(epochs, batch, lr=0.05)
        kw = dict(norm=NORM, teacher=teacher if kd else None, seed=4, desc=name)
        train_model(OneRankAccelerator(acc), model_pair(sz, device)[0], images[:batch * 4], labels[:batch * 4],
                    rec.replace(epochs=1), **kw)                                              # warm-up
        _, stats = train_model(OneRankAccelerator(acc), student, images, labels, rec, **kw)
        ceiling = 1000 * batch / plain_step_ms(sz, device, batch, "fp32", kd=kd, steps=sz["steps"])
        ratio = stats["images_per_s"] / ceiling
        ok = ok and ratio >= MIN_RATIO
        figures[name] = {"images": n, "batch": batch, "kd": kd, "steps": stats["steps"],
                         "images_per_s": round(stats["images_per_s"], 1), "ceiling_images_per_s": round(ceiling, 1),
                         "ratio": round(ratio, 3)}
    return ok, figures


def small_runs(sz, out, device, bf16=False):
    """launch/ccfs.py on a generated CIFAR-shaped folder: twice (byte-identical), or once with bf16 +
    channels_last. Each run in a process of its own, as a user starts it."""
    data = os.path.join(out, "cifar_like")
    if not os.path.isdir(data):
        make_cifar_like(data, sz["folder"])
    common = ["data.source=imagefolder", f"data.root={data}", *sz["run"]]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    runs = [("bf16", ["train.mixed_precision=bf16", "train.channels_last=true"])] if bf16 else [("a", []), ("b", [])]
    figures = {}
    for tag, extra in runs:
        folder = os.path.join(out, f"run_{tag}")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, SCRIPT, "--out", folder, "--overwrite", *common, *extra], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"run {tag} failed: {proc.stderr.strip()[-800:]}")
        with open(os.path.join(folder, "eval_ccfs.json")) as f:
            figures[f"{tag}_accuracy"] = json.load(f)["mean"]
        figures[f"{tag}_seconds"] = round(time.perf_counter() - start, 1)
    if bf16:
        return np.isfinite(figures["bf16_accuracy"]), figures
    a, b = (os.path.join(out, f"run_{t}") for t in "ab")
    names = [n for n in COMPARED if os.path.exists(os.path.join(a, n))]
    differ = [n for n in names if open(os.path.join(a, n), "rb").read() != open(os.path.join(b, n), "rb").read()]
    figures.update(compared=len(names), differ=differ)
    return bool(names) and not differ, figures


def photos(n, seed=0):
    """n ImageNet-shaped JPEG payloads (quality 90): smooth random colour fields plus fine noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = int(rng.integers(375, 501)), int(rng.integers(333, 501))
        base = rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), dtype=np.int16)
        buf = bytes_io.BytesIO()
        Image.fromarray(np.clip(img + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)).save(buf, "JPEG",
                                                                                                     quality=90)
        out.append(buf.getvalue())
    return out


def jpeg_decode(device, n=256, size=224, batch=64):
    from ccfs_dist.data.images import decode_image, decode_jpeg_batch
    payloads = photos(n)
    start = time.perf_counter()
    cpu = [decode_image(p, "RGB", (3, size, size)) for p in payloads]
    cpu_rate = n / (time.perf_counter() - start)
    tensors = [torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in payloads]
    decode_jpeg_batch(tensors[:batch], "RGB", size, device)                 # warm-up (nvjpeg's handles)
    sync(device)
    start = time.perf_counter()
    dev = [img for i in range(0, n, batch) for img in decode_jpeg_batch(tensors[i:i + batch], "RGB", size, device)]
    sync(device)
    dev_rate = n / (time.perf_counter() - start)
    diff = torch.stack([(c.int() - d.cpu().int()).abs() for c, d in zip(cpu, dev)]).float()
    mean = float(diff.mean())
    return mean <= JPEG_MEAN_TOL, {"images": n, "size": size, "mean_abs_diff": round(mean, 3),
                                   "max_abs_diff": int(diff.max()), "cpu_images_per_s": round(cpu_rate, 1),
                                   "device_images_per_s": round(dev_rate, 1), "cpu_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------- report

def markdown(report):
    lines = [f"`{report['command']}` on {report['device']} (torch {report['torch']}):", "",
             "| check | result | seconds | figures |", "|---|---|---:|---|"]
    for r in report["checks"]:
        result = f"skipped: {r['skipped']}" if r["skipped"] else ("passed" if r["passed"] else "**FAILED**")
        figures = json.dumps(r["figures"]).replace("|", "/")
        lines.append(f"| {r['name']} | {result} | {r['seconds']} | {figures} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--out", required=True, help="folder for device_check.json, device_check.md and the small runs")
    p.add_argument("--quick", action="store_true", help="the smallest CPU sizes (seconds; the test uses it)")
    args = p.parse_args(argv)
    try:
        out = check_writable_folder(args.out, "--out")
    except Exception as exc:        # noqa: BLE001 - a CCFSError: one line, status 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    acc = make_accelerator()        # train.deterministic's settings, before the first CUDA work
    device = acc.device
    cuda = device.type == "cuda"
    sz = SIZES["cuda" if cuda else "quick" if args.quick else "cpu"]
    checks = Checks()
    checks.run("environment", environment, device)
    checks.run("determinism", determinism, acc, sz)
    for name, fn, fargs in (("step_time", step_time, (sz, device)), ("engine", engine, (acc, sz, device))):
        checks.run(name, fn, *fargs) if cuda else checks.skip(name, "no CUDA")
    with tempfile.TemporaryDirectory(dir=out, prefix=".runs.") as runs:
        checks.run("small_run", small_runs, sz, runs, device)
        checks.run("small_run_bf16", small_runs, sz, runs, device, True) if cuda else checks.skip("small_run_bf16", "no CUDA")
    checks.run("jpeg_decode", jpeg_decode, device) if cuda else checks.skip("jpeg_decode", "no CUDA")
    report = {"device": environment(device)[1].get("gpu", f"CPU ({platform.processor() or platform.machine()})"),
              "torch": torch.__version__, "mode": "cuda" if cuda else "quick" if args.quick else "cpu",
              "command": "python launch/device_check.py --out DIR" + (" --quick" if args.quick else ""),
              "checks": checks.records}
    write_json(os.path.join(out, "device_check.json"), report)
    write_text(os.path.join(out, "device_check.md"), markdown(report))
    failed = [r["name"] for r in checks.records if r["passed"] is False]
    print(f"{len(checks.records) - len(failed)} of {len(checks.records)} checks passed or skipped"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
