#!/usr/bin/env python
"""The synthetic set at ImageNet scale: memory per node of each way to hold it, and the decode cost of keeping it
encoded (issue 15, item 2: the measurement behind the decision; nothing here changes the engine).

Makes --images 224 px RGB crops of photographs (scikit-learn's two sample photos, random crop boxes of 10-100 %
of the area, resized to 224 with PIL, as selected real ImageNet images would be), encodes them as JPEG
(quality --quality; ImageNet's own are ~q90) and as PNG (lossless: what a distilled image needs), and measures
bytes per image and single-core decode throughput (PIL, and torchvision.io.decode_jpeg on the CPU) of 224 px
images into a uint8 tensor. Then prints, for ImageNet-1K IPC 50 / 100 / 200 and ImageNet-21K IPC 20
(1,000 / 21,841 classes), the memory per node with --ranks ranks of: today's resident uint8 copy per rank, one
shared uint8 copy per node, an encoded copy per rank (JPEG for the selected real share, PNG for the distilled
share at alpha --alpha), and a stream from shards (the shuffle buffer only); and the decode time of one epoch
over the set per rank when kept encoded.

    python launch/bench_synthetic_memory.py [--images 512] [--ranks 8] [--alpha 0.2] [--cores-per-rank 2]
"""
import argparse
import io
import time

import numpy as np
import torch
from PIL import Image

SIZE = 224


def crops(n, seed=0):
    from sklearn.datasets import load_sample_images
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        area = rng.uniform(0.1, 1.0) * w * h
        side = int(min(np.sqrt(area), h))
        x0, y0 = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((SIZE, SIZE), Image.BILINEAR)
        out.append(crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return out


def encode(images, fmt, **kw):
    blobs = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        blobs.append(buf.getvalue())
    return blobs


def rate(fn, blobs, repeat=2):
    best = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        for b in blobs:
            fn(b)
        best = max(best, len(blobs) / (time.perf_counter() - t))
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--ranks", type=int, default=8, help="ranks (GPUs) per node")
    p.add_argument("--alpha", type=float, default=0.2, help="distilled share of the final set (PNG), the rest JPEG")
    p.add_argument("--cores-per-rank", type=int, default=2, help="CPU cores a rank can spend decoding")
    p.add_argument("--buffer", type=int, default=4096, help="stream.shuffle_buffer of the streamed option")
    args = p.parse_args()
    torch.set_num_threads(1)
    from torchvision.io import decode_jpeg

    images = crops(args.images)
    jpeg, png = encode(images, "JPEG", quality=args.quality), encode(images, "PNG", compress_level=6)
    raw = 3 * SIZE * SIZE
    jpeg_b, png_b = float(np.mean([len(b) for b in jpeg])), float(np.mean([len(b) for b in png]))

    def pil(b):
        with Image.open(io.BytesIO(b)) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    rates = {"PIL JPEG": rate(pil, jpeg), "torchvision decode_jpeg (CPU)":
             rate(lambda b: decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8)), jpeg),
             "PIL PNG": rate(pil, png)}
    print(f"{args.images} crops of photographs at {SIZE} px: uint8 {raw / 1e3:.1f} kB, JPEG q{args.quality} "
          f"{jpeg_b / 1e3:.1f} kB ({raw / jpeg_b:.1f}x smaller), PNG {png_b / 1e3:.1f} kB ({raw / png_b:.1f}x)")
    for name, r in rates.items():
        print(f"  decode, 1 core: {name:<30} {r:8.0f} img/s")
    jpeg_rate = max(rates["PIL JPEG"], rates["torchvision decode_jpeg (CPU)"])
    # per-image cost of the mixed encoded set: distilled share PNG, the rest JPEG
    mix_bytes = args.alpha * png_b + (1 - args.alpha) * jpeg_b
    mix_seconds = args.alpha / rates["PIL PNG"] + (1 - args.alpha) / jpeg_rate

    print(f"\nmemory per node, {args.ranks} ranks, alpha {args.alpha} (GB = 1e9 bytes):")
    print(f"{'set':<24} {'images':>11} {'uint8/rank x ranks':>19} {'1 shared uint8':>15} {'encoded/rank x ranks':>21} "
          f"{'stream (buffer)':>16} {'decode/epoch/rank':>18}")
    for name, classes, ipc in (("ImageNet-1K IPC 50", 1000, 50), ("ImageNet-1K IPC 100", 1000, 100),
                               ("ImageNet-1K IPC 200", 1000, 200), ("ImageNet-21K IPC 20", 21841, 20)):
        n = classes * ipc
        per_rank = n * raw / 1e9
        encoded = n * mix_bytes / 1e9
        stream = args.buffer * raw / 1e9
        # an epoch of the whole set, every rank decoding its 1/ranks share on its cores
        decode = n / args.ranks * mix_seconds / args.cores_per_rank
        print(f"{name:<24} {n:>11,} {per_rank * args.ranks:>18.1f} {per_rank:>15.1f} {encoded * args.ranks:>21.1f} "
              f"{stream * args.ranks:>16.1f} {decode:>16.1f} s")


if __name__ == "__main__":
    main()
