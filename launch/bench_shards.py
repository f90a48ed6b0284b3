#!/usr/bin/env python
"""Streaming the pool from WebDataset shards at ImageNet-1K size: memory and throughput.

1. Generates (once, into --out) a synthetic shard set of --samples images (default 1,281,167, the size of
   ImageNet-1K's training set): random 16x16 RGB PNGs, random labels over 1000 classes, --per-shard per
   shard, written by --gen-workers processes; plus a second index over its first --small samples.
2. Scores each pool (small, then full) in a fresh process (under torch.distributed.run when --processes > 1)
   with predict.predict over ShardPool.batches, --workers DataLoader workers per rank. During the pass, after
   every pass/--pairs streamed batches, the same model's forward (normalise + forward, the compute-only
   ceiling) runs on a batch already in memory for a quarter as many batches: each streamed window and
   the ceiling window after it make a pair, and the throughput ratio is the median over the pairs (this
   machine's speed swings by 2x with load and allocator state; a pair sees the same conditions). Per
   rank it reports peak RSS of the rank (getrusage) and of its largest loader worker; streaming images/s
   over the whole pass (ceiling windows taken out); and, right after, the forward alone, predict.predict
   over an in-memory pool of generated images, and the loader alone (ShardPool.batches without a
   model) over the first --loader-images samples.
3. Prints the RSS ratio full / small (target <= 1.15, peak <= 1.5 GB per rank) and the paired streaming /
   forward throughput ratio (target >= 80 %), and writes everything to --out/result.json.

   python launch/bench_shards.py --cpu                 # CPU: 1 rank, 1 loader worker, 1 compute thread
   python launch/bench_shards.py --model resnet18 --workers 12 --threads 4 --batch-size 1024 \
       --mixed-precision bf16                          # one GPU: CIFAR ResNet-18 fed by 12 loader workers

The shard set is ~3.3 GB (tar headers dominate at this image size); it is not deleted.

With --decode, instead: decode throughput at --decode-size px (224) of ImageNet-shaped JPEGs (generated once
into --out/decode: --decode-images photos of 375-500 x 333-500 px, quality 90, as an image folder, then
written by `ccfs shards` twice, --decode-per-shard per shard: as stored, and with --resize --decode-size).
For each shard set it times
ShardPool.batches over every sample (no model), twice each, best of the two: data.decode cpu (--workers
loader workers decode with PIL) and data.decode device (the workers read bytes, the rank decodes each batch
with decode_jpeg on its device: CUDA when there is one and no --cpu, else the CPU with --threads threads);
then, untimed, the mean and max |difference| between the two paths' pixels (the tolerance on that device).

   python launch/bench_shards.py --decode --cpu        # this machine: 1 worker vs the batch decode on the CPU
   python launch/bench_shards.py --decode --decode-images 4000 --workers 12   # a GPU: 12 PIL workers vs nvjpeg
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time


import numpy as np  # noqa: E402

from ccfs_dist.bench.shards import generate
from ccfs_dist.runtime.io import write_json  # noqa: E402

class Paired:
    """The split, whose `batches` runs a forward-ceiling window after every `every` streamed batches.

    Pair i = (images streamed in window i, its seconds; images of the ceiling window right after it, its
    seconds): load from other jobs, and this machine's speed swings, hit both sides of a pair alike.
    A streamed window starts with the batches the loader prefetched during the ceiling window (at most
    workers x prefetch_factor = 2 per worker): at `every` >= 10 batches that flatters it by a few %.
    """

    def __init__(self, split, every, ceiling_batches, forward, sync):
        self.split, self.every, self.ceiling_batches, self.forward, self.sync = \
            split, every, ceiling_batches, forward, sync
        self.stream_n, self.stream_s, self.ceiling_s = [], [], []

    def __len__(self):
        return len(self.split)

    def __getattr__(self, name):
        return getattr(self.split, name)

    def batches(self, index, batch_size, rank, world, device):
        n, start = 0, time.perf_counter()
        for i, batch in enumerate(self.split.batches(index, batch_size, rank, world, device), 1):
            yield batch                                  # the scorer scores it before asking for the next
            n += len(batch[1])
            if i % self.every == 0:
                self.sync()
                self.stream_n.append(n)
                self.stream_s.append(time.perf_counter() - start)
                t = time.perf_counter()
                for _ in range(self.ceiling_batches):
                    self.forward()
                self.sync()
                self.ceiling_s.append(time.perf_counter() - t)
                n, start = 0, time.perf_counter()


def child(args):
    """One measurement in a fresh process (or one per rank): stream-score the pool, then the ceilings."""
    import torch
    from ccfs_dist.training.augment import normalize
    from ccfs_dist.data.pool import Norm, TensorPool
    from ccfs_dist.runtime.dist import gather_rows, make_accelerator
    from ccfs_dist.training.models import build_model
    from ccfs_dist.training.predict import predict
    from ccfs_dist.data.shards.reader import ShardPool
    torch.set_num_threads(args.threads)
    acc = make_accelerator(args.mixed_precision)
    device = acc.device
    split = ShardPool(args.child, num_workers=args.workers)
    norm = Norm(tuple(split.meta["mean"]), tuple(split.meta["std"]))
    torch.manual_seed(0)
    model = build_model({"name": args.model, "width": args.width, "depth": args.depth, "norm": "batchnorm"},
                        len(split.classes), 3, split.shape[1]).to(device).eval()
    x = torch.randint(0, 256, (args.batch_size,) + split.shape, dtype=torch.uint8, device=device)

    @torch.no_grad()
    def forward():
        with acc.autocast():
            model(normalize(x, *norm))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    forward()
    sync()
    batches = math.ceil(len(split) / acc.num_processes / args.batch_size)
    every = max(1, min(max(10, batches // args.pairs), batches))     # at least one pair, even on a short pass
    paired = Paired(split, every, max(3, every // 4), forward, sync)
    acc.wait_for_everyone()
    _, stats = predict(acc, model, paired, np.arange(len(split)), norm=norm, batch_size=args.batch_size,
                       desc="stream")
    rss_rank = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    stream_seconds = stats["seconds"] - sum(paired.ceiling_s)          # the pass without its ceiling windows
    ceiling_images = paired.ceiling_batches * args.batch_size                # per ceiling window
    pair_ratios = [(n / s) / (ceiling_images / c)
                   for n, s, c in zip(paired.stream_n, paired.stream_s, paired.ceiling_s)]

    reps = max(3, args.forward_images // args.batch_size)                # the forward alone, after the pass
    start = time.perf_counter()
    for _ in range(reps):
        forward()
    sync()
    forward_ips = reps * args.batch_size / (time.perf_counter() - start)

    n_load = min(len(split), args.loader_images)                # the loader alone: no model, first shards
    start = time.perf_counter()
    for _ in split.batches(np.arange(n_load), args.batch_size, acc.process_index, acc.num_processes, device):
        pass
    acc.wait_for_everyone()
    loader_ips = n_load / (time.perf_counter() - start)

    n_mem = args.forward_images
    pool = TensorPool(torch.randint(0, 256, (n_mem,) + split.shape, dtype=torch.uint8),
                      torch.randint(0, len(split.classes), (n_mem,)))
    _, mem_stats = predict(acc, model, pool, np.arange(n_mem), norm=norm, batch_size=args.batch_size,
                           desc="memory")
    local = {"rss_rank": torch.tensor([rss_rank]), "rss_worker": torch.tensor([rss_worker]),
             "forward": torch.tensor([forward_ips]), "paired": torch.tensor([float(np.median(pair_ratios))]),
             "pairs": torch.tensor([len(pair_ratios)])}
    rows = gather_rows(acc, local)
    if acc.is_main_process:
        result = {"samples": len(split), "shards": len(split.shards), "processes": acc.num_processes,
                  "workers": args.workers, "threads": args.threads, "device": str(device),
                  "stream_seconds": stream_seconds, "stream_ips": len(split) / stream_seconds,
                  "paired_ratio": float(rows["paired"].min()), "pairs": int(rows["pairs"].min()),
                  "paired_ratio_per_rank": rows["paired"].tolist(),
                  "forward_ips": float(rows["forward"].sum()), "memory_score_ips": mem_stats["images_per_s"],
                  "loader_ips": loader_ips, "load_average": os.getloadavg()[0],
                  "rss_rank_mb": rows["rss_rank"].tolist(), "rss_worker_mb": rows["rss_worker"].tolist()}
        write_json(args.json, result)
    acc.wait_for_everyone()


def measure(args, index, tag):
    out = os.path.join(args.out, f"result_{tag}.json")
    flags = ["--child", index, "--json", out, "--workers", str(args.workers), "--threads", str(args.threads),
             "--batch-size", str(args.batch_size), "--model", args.model, "--width", str(args.width),
             "--depth", str(args.depth), "--forward-images", str(args.forward_images),
             "--loader-images", str(args.loader_images), "--pairs", str(args.pairs),
             "--mixed-precision", args.mixed_precision]
    script = os.path.abspath(__file__)
    cmd = [sys.executable, script] + flags if args.processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes),
         script] + flags
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run(cmd, check=True, env=env)
    with open(out) as f:
        return json.load(f)


def write_photos(folder, n, seed=0):
    """An image folder of `n` ImageNet-shaped JPEGs in 10 classes (train/; val/ holds one per class, which
    an image folder needs): smooth random colour fields (bicubic upsampled blocks) plus fine noise,
    375-500 x 333-500 px, quality 90."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(n + 10):
        w, h = int(rng.integers(375, 501)), int(rng.integers(333, 501))
        base = rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
        d = os.path.join(folder, "train" if i < n else "val", f"c{i % 10}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(img).save(os.path.join(d, f"{i:06d}.jpg"), quality=90)


def decode_bench(args):
    """--decode: images/s of the CPU decode path vs the batch decode path, on full-size and pre-resized shards."""
    import torch
    from ccfs_dist.data.shards.reader import ShardPool
    from ccfs_dist.data.shards.writer import write_shards
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    base = os.path.join(args.out, "decode")
    params = {"images": args.decode_images, "size": args.decode_size, "per_shard": args.decode_per_shard,
              "seed": args.seed}
    stamp = os.path.join(base, "params.json")
    if not (os.path.exists(stamp) and json.load(open(stamp)) == params):
        import shutil
        shutil.rmtree(base, ignore_errors=True)
        start = time.perf_counter()
        write_photos(os.path.join(base, "folder"), args.decode_images, args.seed)
        cfg = {"source": "imagefolder", "root": os.path.join(base, "folder"), "image_size": args.decode_size}
        for name, resize in (("full", None), ("resized", args.decode_size)):
            write_shards(cfg, os.path.join(base, name), per_shard=args.decode_per_shard, workers=args.gen_workers,
                         resize=resize, log=lambda *a: None)
        write_json(stamp, params)
        print(f"decode: wrote {args.decode_images} JPEGs and their shards in {time.perf_counter() - start:.0f} s",
              flush=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    for name in ("full", "resized"):
        index = os.path.join(base, name, "train.json")
        nbytes = sum(s["bytes"] for s in ShardPool(index).shards)
        for decode in ("cpu", "device"):
            split = ShardPool(index, num_workers=args.workers, decode=decode)
            best = math.inf
            for _ in range(2):                   # the first pass also warms the page cache
                start = time.perf_counter()
                n = 0
                for x, _, _ in split.batches(np.arange(len(split)), args.batch_size, 0, 1, device):
                    n += len(x)
                sync()
                best = min(best, time.perf_counter() - start)
            rows.append({"shards": name, "decode": decode, "images": n, "seconds": best, "images_per_s": n / best,
                         "mb_per_image": nbytes / len(split) / 1e6,
                         "decoded_on": "cpu (loader workers)" if decode == "cpu" else str(device)})
        # the tolerance: device-decoded against CPU-path pixels, batch by batch (the same samples, in order)
        total, peak, count = 0, 0, 0
        pair = [ShardPool(index, num_workers=args.workers, decode=d).batches(
            np.arange(len(split)), args.batch_size, 0, 1, device) for d in ("cpu", "device")]
        for (x, _, ids), (dx, _, dids) in zip(*pair):
            assert torch.equal(ids.cpu(), dids.cpu())
            diff = (x.to(device).int() - dx.int()).abs()
            total, peak, count = total + int(diff.sum()), max(peak, int(diff.max())), count + diff.numel()
        rows[-1].update(mean_abs_diff=total / count, max_abs_diff=peak)
    print(f"\ndecode throughput to {args.decode_size} px, {args.decode_images} ImageNet-shaped JPEGs, "
          f"{args.workers} loader worker(s), {args.threads} thread(s), batch {args.batch_size}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'shards':>8} {'KB/image':>9} {'decode':>7} {'decoded on':>20} {'images/s':>9} {'|diff| vs cpu':>14}")
    for r in rows:
        diff = f"{r['mean_abs_diff']:.3f} / {r['max_abs_diff']}" if "max_abs_diff" in r else ""
        print(f"{r['shards']:>8} {r['mb_per_image'] * 1000:>9.0f} {r['decode']:>7} {r['decoded_on']:>20} "
              f"{r['images_per_s']:>9.0f} {diff:>14}")
    print("|diff| vs cpu: mean / max absolute difference, in levels, between the device-decoded and the CPU "
          "path's pixels")
    write_json(os.path.join(base, "result.json"), {"rows": rows, "workers": args.workers, "threads": args.threads,
                                                   "device": str(device), **params})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/ccfs_bench_shards", help="folder for the generated shards")
    p.add_argument("--samples", type=int, default=1281167, help="pool size (ImageNet-1K train: 1,281,167)")
    p.add_argument("--small", type=int, default=128000, help="the small pool: the first shards up to this size")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--per-shard", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gen-workers", type=int, default=os.cpu_count() or 1, help="writer processes")
    p.add_argument("--processes", type=int, default=1, help="ranks")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank (data.num_workers)")
    p.add_argument("--threads", type=int, default=1, help="torch compute threads per rank")
    p.add_argument("--batch-size", type=int, default=512, help="per-rank scoring batch")
    p.add_argument("--model", default="convnet")
    p.add_argument("--width", type=int, default=32, help="convnet width")
    p.add_argument("--depth", type=int, default=3, help="convnet depth")
    p.add_argument("--forward-images", type=int, default=65536, help="images for the in-memory measurements")
    p.add_argument("--loader-images", type=int, default=128000, help="images for the loader-only measurement")
    p.add_argument("--pairs", type=int, default=20,
                   help="about this many (streamed window, forward-ceiling window) pairs per pass (default 20)")
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--cpu", action="store_true", help="score on the CPU even where CUDA is available")
    p.add_argument("--decode", action="store_true", help="measure decode throughput instead (see above)")
    p.add_argument("--decode-images", type=int, default=600, help="--decode: JPEGs generated")
    p.add_argument("--decode-size", type=int, default=224, help="--decode: the image size read (and --resize)")
    p.add_argument("--decode-per-shard", type=int, default=25,
                   help="--decode: samples per shard (default 25: enough shards for every loader worker)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.decode:
        return decode_bench(args)

    full, small = generate(args)
    results = {"small": measure(args, small, "small"), "full": measure(args, full, "full")}
    print(f"\nstreaming scoring, {args.model} (width {args.width}, depth {args.depth}) on {args.image_size} px PNGs, "
          f"{args.processes} rank(s) x {args.workers} loader worker(s), {args.threads} compute thread(s) per rank, "
          f"batch {args.batch_size}, device {results['full']['device']}")
    print(f"{'pool':>10} {'shards':>7} {'peak RSS/rank MB':>17} {'worker MB':>10} {'stream img/s':>13} "
          f"{'paired ratio':>13} {'pairs':>6} {'forward img/s':>14} {'stream/fwd':>11} {'mem-score img/s':>16} "
          f"{'loader img/s':>13} {'load avg':>9}")
    for r in results.values():
        print(f"{r['samples']:>10} {r['shards']:>7} {max(r['rss_rank_mb']):>17.0f} {max(r['rss_worker_mb']):>10.0f} "
              f"{r['stream_ips']:>13.0f} {r['paired_ratio']:>12.1%} {r['pairs']:>6} {r['forward_ips']:>14.0f} "
              f"{r['stream_ips'] / r['forward_ips']:>10.1%} {r['memory_score_ips']:>16.0f} {r['loader_ips']:>13.0f} "
              f"{r['load_average']:>9.1f}")
    ratio = max(results["full"]["rss_rank_mb"]) / max(results["small"]["rss_rank_mb"])
    peak = max(results["full"]["rss_rank_mb"])
    speed = results["full"]["paired_ratio"]
    print(f"peak RSS per rank, full / small pool: {ratio:.3f} (target <= 1.15); peak {peak:.0f} MB (target <= 1536)")
    print(f"streaming / in-memory forward throughput, full pool: {speed:.1%} (median of {results['full']['pairs']} "
          f"paired windows, slowest rank; target >= 80 %); whole pass vs the forward timed after it: "
          f"{results['full']['stream_ips'] / results['full']['forward_ips']:.1%}")
    write_json(os.path.join(args.out, "result.json"), dict(results, rss_ratio=ratio, throughput_ratio=speed))


if __name__ == "__main__":
    main()
