#!/usr/bin/env python
"""`ccfs shards` write time and disk per 100k images, on ImageNet-shaped JPEGs.

    python launch/bench_write.py                         # 2,000 photos, 1 writer process, this machine
    python launch/bench_write.py --images 4000 --workers 8

Generates (once, into --out/photos) --images photos of 375-500 x 333-500 px, quality 90 (bench_shards.py's
write_photos: ImageNet's typical size and quality), as an image folder with a train and a test split, then
times shard_writer.write_shards of the train split twice: as stored (files copied byte for byte; the train split
decodes every image once for its mean/std) and with --resize 224 (decode, resize, re-encode at quality 95).
Prints seconds and GB of shards per 100k images, extrapolated linearly from the measured set, and the
input's size per 100k images.
"""
import argparse
import os
import shutil
import time


from bench_shards import write_photos  # noqa: E402
from ccfs_dist.data.shards.writer import write_shards  # noqa: E402


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/ccfs_bench_write")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--per-shard", type=int, default=250)
    args = p.parse_args()
    photos = os.path.join(args.out, f"photos{args.images}")
    if not os.path.isdir(photos):
        write_photos(photos, args.images)
    n = sum(len(files) for _, _, files in os.walk(os.path.join(photos, "train")))
    scale = 100_000 / n
    cfg = {"source": "imagefolder", "root": photos, "image_size": 224, "distilled": None}
    print(f"{n} train photos, {folder_bytes(os.path.join(photos, 'train')) * scale / 1e9:.2f} GB per 100k as "
          f"stored; {args.workers} writer process(es), --per-shard {args.per_shard}; load {os.getloadavg()[0]:.1f}")
    for resize in (None, 224):
        out = os.path.join(args.out, f"shards_{resize}")
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        write_shards(cfg, out, "train", per_shard=args.per_shard, workers=args.workers, resize=resize,
                     log=lambda m: None)
        seconds = time.perf_counter() - start
        print(f"--resize {resize}: {seconds:.1f} s for {n} images = {seconds * scale / 60:.1f} min per 100k "
              f"({seconds / n * 1e3:.1f} ms an image per process), {folder_bytes(out) * scale / 1e9:.2f} GB "
              f"per 100k")


if __name__ == "__main__":
    main()
