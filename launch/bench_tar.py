#!/usr/bin/env python
"""Python's tarfile against shard_tar.py's own tar code, on one shard as `ccfs shards` writes it.

    python launch/bench_tar.py                    # 2,000 samples of 16x16 RGB PNGs (+ .cls), in memory

Reading: shard_tar.iter_samples (strict ustar parser) against tarfile's stream mode ("r|", what a reader of
a pipe or URL must use) grouping members into samples the same way; both read the same bytes from memory
through shard_index.HashingReader. Writing: shard_tar.write_tar (hand-made headers) against
tarfile.TarFile.addfile with the same fixed metadata. Prints samples/s (median of --repeats, alternating order),
whether tarfile's headers are byte-identical to write_tar's, and what each reader does with a corrupt header in
the middle.
"""
import argparse
import io
import os
import statistics
import tarfile
import tempfile
import time


import numpy as np  # noqa: E402

from ccfs_dist.data.shards import index as shard_index, tar as shard_tar  # noqa: E402
from ccfs_dist.errors import DataError  # noqa: E402
from ccfs_dist.data.images import encode_png  # noqa: E402


def samples_of(n, size, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    labels = rng.integers(0, 1000, n)
    return [(f"{i:08d}", {"cls": str(int(labels[i])).encode(), "png": encode_png(images[i], level=1)})
            for i in range(n)]


def tar_info(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = \
        size, 0o444, shard_tar.TAR_MTIME, 0, 0, "", ""
    return info


def write_with_tarfile(samples):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext in sorted(files):
                tar.addfile(tar_info(f"{key}.{ext}", len(files[ext])), io.BytesIO(files[ext]))
    return buf.getvalue()


def read_with_tarfile(stream):
    """(key, {ext: bytes}) as shard_tar.iter_samples groups them, from tarfile's stream mode."""
    key, files = None, {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            dot = base.find(".")
            if dot <= 0:
                continue
            k, ext = member.name[:len(member.name) - len(base) + dot], base[dot + 1:].lower()
            if k != key:
                if files:
                    yield key, files
                key, files = k, {}
            files[ext] = tar.extractfile(member).read()
    if files:
        yield key, files


def read_own(stream):
    return shard_tar.iter_samples(stream, "bench")


def rate(read, data, n):
    start = time.perf_counter()
    got = sum(1 for _ in read(shard_index.HashingReader(io.BytesIO(data))))
    assert got == n, (got, n)
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    samples = samples_of(args.samples, args.image_size)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train-000000.tar")
        write_times, lib_times = [], []
        for r in range(args.repeats):
            for name in (["own", "tarfile"] if r % 2 else ["tarfile", "own"]):
                start = time.perf_counter()
                if name == "own":
                    shard_tar.write_tar(path, samples)
                    write_times.append(time.perf_counter() - start)
                else:
                    lib = write_with_tarfile(samples)
                    lib_times.append(time.perf_counter() - start)
        with open(path, "rb") as f:
            own = f.read()
    # tarfile pads the archive to a multiple of its 10,240-byte record; write_tar ends after the two zero blocks
    end = len(own) - 1024
    print(f"shard: {len(own):,} bytes ({len(own) / args.samples:.0f} a sample); tarfile's: {len(lib):,} bytes; "
          f"members and headers byte-identical: {lib[:end] == own[:end]}; whole file identical: {lib == own}")
    fields = {"chksum": (148, 156), "devmajor": (329, 337), "devminor": (337, 345)}
    differ = [n for n, (a, b) in fields.items() if lib[a:b] != own[a:b]] + \
        [f"byte {i}" for i in range(512) if lib[i] != own[i] and not any(a <= i < b for a, b in fields.values())]
    print(f"first header: fields that differ: {', '.join(differ) or 'none'} (write_tar: {own[329:345]!r}, "
          f"tarfile: {lib[329:345]!r})")
    print(f"write samples/s: own {args.samples / statistics.median(write_times):,.0f}, "
          f"tarfile {args.samples / statistics.median(lib_times):,.0f}")

    rates = {"own": [], "tarfile": []}
    readers = {"own": read_own, "tarfile": read_with_tarfile}
    for r in range(args.repeats):
        for name in (["own", "tarfile"] if r % 2 else ["tarfile", "own"]):
            rates[name].append(rate(readers[name], own, args.samples))
    own_rate, lib_rate = statistics.median(rates["own"]), statistics.median(rates["tarfile"])
    print(f"read samples/s (median of {args.repeats}): own {own_rate:,.0f}, tarfile stream mode {lib_rate:,.0f} "
          f"(own / tarfile {own_rate / lib_rate:.2f}x); per sample {1e6 / own_rate:.1f} vs {1e6 / lib_rate:.1f} us")

    bad = bytearray(own)
    bad[512 * 40 + 150] ^= 0x01                  # a header checksum digit in the middle of the shard
    for name, read in readers.items():
        try:
            got = sum(1 for _ in read(io.BytesIO(bytes(bad))))
            print(f"corrupt header, {name}: no error, {got} of {args.samples} samples (stops there silently)")
        except (DataError, tarfile.TarError) as e:
            print(f"corrupt header, {name}: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
