"""WebDataset shards: write any source as tar shards plus an index JSON, and stream them as a pool (pool.Pool).

Writing (`ccfs shards`):

    write_shards(data_cfg, out_dir, split="train", per_shard=2000)   -> index dict, written to out_dir/<split>.json

One tar member pair per sample: `<key>.cls` (the class label as decimal text) and `<key>.<ext>` (the image
bytes as stored: files are copied byte for byte, in-memory sources are encoded as lossless PNG), where
key = the global index, zero-padded, without dots. Shards are `<split>-NNNNNN.tar`, each holding a
contiguous run of global indices. The same input gives byte-identical shards (fixed tar metadata,
sorted order); every file is written under a temporary name and renamed.

The index JSON (`<split>.json`) holds what selection needs without reading an image: the sample count,
class names, every label, the image shape, mean/std, a fingerprint of the source, and per shard its file
(relative to the JSON's folder), first index, sample count, byte size and sha256. An index may come from
anywhere, so its `file` entries are a trust boundary (docs/safety.md): a URL or `pipe:` command (which
webdataset would open or run) is refused unless data.allow_urls, and an absolute path or one climbing out
of the index's folder unless data.allow_outside.

Reading (`data.source: webdataset`):

    ShardSplit(index_path, image_size=None, num_workers=0) -> a pool.Pool: labels, len, shape, fetch, batches
    load_shards(data_cfg, num_workers=0)                -> RealData with ShardSplit train / test

`batches` streams the shards that hold wanted samples: split over ranks (shard i goes to rank i % world),
then over the rank's loader workers (every num_workers-th of the rank's shards; _Workers), no resampling or shuffling;
samples not in the wanted index are skipped before decoding. A rank or worker without shards yields
nothing. Every shard is checked while it streams: its keys must be the index's contiguous run, its labels
the index's labels, its sample count the index's count; a violation, an unreadable tar or an undecodable
image is a DataError naming the shard (and the sample key). The bytes read are hashed on the way: a shard
whose sha256 or size differs from its index entry is a DataError once it has been read to its end (the
samples already yielded are then discarded with the failing run); `verify_shards` checks whole shards.

The tar code is this module's own (`write_tar`, `iter_tar`), not Python's tarfile or webdataset's (which
reads through tarfile), for three measured reasons (BENCHMARKS.md, "Tar: tarfile or our own",
`python launch/bench_tar.py`): tarfile's ustar headers differ from the shards already written (it leaves
a regular file's devmajor/devminor empty and pads the archive to a 10,240-byte record), so the same
input would no longer give the same bytes; tarfile's stream mode, the one a pipe or URL allows, ends
silently at a corrupt header after the first, where `iter_tar` names the byte; and it reads a shard
several times slower, in the loop that bounds a loader worker's samples per second.
"""
import copy
import ctypes
import hashlib
import io
import json
import math
import multiprocessing
import os
import queue
import re
import signal
import sys
import threading
import time
import traceback
import weakref

import numpy as np
import torch
from PIL import Image

from . import io as ccfs_io
from . import progress
from .config import MAX_SIDE      # stated limit of an image side (index shape, data.image_size)
from .data import TINY_MEAN, TINY_STD, image_files, load_source, set_normalisation, source_root
from .dist import deal, die_with_parent, rank_world, tune_malloc
from .errors import CCFSError, ConfigError, DataError
from .images import (decode_image, decode_jpeg_batch, encode_png, fast_png_decoder, is_jpeg, resize_shorter,
                     square_side)
from .pool import RealData

FORMAT = "ccfs-shards/1"
PROGRESS_FORMAT = "ccfs-shards-progress/1"   # <out>/<split>.progress.json of an unfinished write
TAR_MTIME = 0                 # fixed tar metadata: the same input gives byte-identical shards
READ_BUFFER = 1 << 20
RESIZE_JPEG_QUALITY = 95      # `ccfs shards --resize`: default JPEG quality of the re-encoded JPEGs (4:4:4 chroma)
SHARD_RE = re.compile(r"^(train|test)-\d{6}\.tar$")
DECODE = ("cpu", "device")    # data.decode: loader workers decode (PIL), or hand JPEG bytes to the rank's device
URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")     # pipe:, http:, s3:, file:, ... (not a one-letter drive)
KEY_RE = re.compile(rb"[0-9]{1,18}")                     # a sample key / .cls label: ASCII digits only, never isdigit
MAX_MEMBER = 1 << 30          # stated limit of one tar member (an image, a label, a pax header): 1 GiB
WORKER_TIMEOUT_S = 600        # data.worker_timeout's default: docs/configuration.md says why
PREFETCH = 2                  # batches a loader worker may have ready ahead of its rank (DataLoader's default)
LIVENESS_S = 5.0              # how often a waiting rank checks its workers, and an idle worker its rank
SLOTS = 64                    # shards per worker recorded as open, for the error that names a stalled loader's


def start_context():
    """The multiprocessing context that loader workers (and writer processes beside other threads) start in:
    `forkserver` where the platform has it, else `spawn`; not `fork`. A rank runs threads (gloo's, the TCP
    store's, tqdm's monitor), and a process forked while another thread holds a lock (the interpreter's,
    malloc's) waits for it forever.
    The fork server is a fresh single-threaded process that imports this module (torch, numpy, PIL) once and
    forks every worker from there, so a worker starts in milliseconds. Not torchvision: a worker loads its PNG
    op library alone (images.fast_png_decoder, milliseconds); the package would add about 1 s of CPU per server."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", __name__])   # no effect once the server runs
    return ctx


def start_fork_server():
    """Start the fork server now (if start_context uses one): it imports while this process does other work,
    instead of when the first worker is wanted."""
    if start_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver
        forkserver.ensure_running()


# ============================================================================================ writing

def shard_name(split, i):
    return f"{split}-{i:06d}.tar"


def key_width(n):
    """Digits of the zero-padded sample key: at least 8 (room for 100 M samples)."""
    return max(8, len(str(max(n - 1, 0))))


def _tar_header(name, size):
    """A ustar header for a regular file: mode 0444, uid/gid 0, no user/group names, mtime TAR_MTIME."""
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    h = bytearray(512)
    h[0:len(raw)] = raw
    h[100:108] = b"0000444\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % TAR_MTIME
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[329:337] = h[337:345] = b"0000000\0"
    h[148:155] = b"%06o\0" % sum(h)
    return bytes(h)


def write_tar(path, samples):
    """Write `samples` = iterable of (key, {ext: bytes}) as a ustar file at `path`, deterministically and
    atomically (temporary name, then rename). Members are `<key>.<ext>`, extensions sorted; every header
    has the same mode, owner and mtime. Returns (bytes written, sha256 hex of the file).

    Not tarfile: its headers are not these bytes (see the module docstring), and the sha256 is taken
    here on the way to the disk instead of by reading the file again."""
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.tmp")
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb", buffering=READ_BUFFER) as f:
            def put(block):
                nonlocal size
                f.write(block)
                digest.update(block)
                size += len(block)
            for key, files in samples:
                for ext in sorted(files):
                    data = files[ext]
                    put(_tar_header(f"{key}.{ext}", len(data)))
                    put(data)
                    if len(data) % 512:
                        put(bytes(512 - len(data) % 512))
            put(bytes(1024))                                      # end-of-archive marker
        os.replace(tmp, path)
        return size, digest.hexdigest()
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _Source:
    """One split of a supported source, as records: record(i) -> (ext, stored bytes, fingerprint bytes)."""

    def __init__(self, name, split, classes, labels, shape, mean, std, images=None, files=None,
                 stats=False, image_size=None, resize=None, jpeg_quality=RESIZE_JPEG_QUALITY):
        self.name, self.split, self.classes = name, split, classes
        self.labels = np.asarray(labels, dtype=np.int64)
        self.shape, self.mean, self.std = tuple(int(d) for d in shape), mean, std
        self.images, self.files, self.stats, self.image_size = images, files, stats, image_size
        self.resize, self.jpeg_quality = resize, jpeg_quality

    def __len__(self):
        return len(self.labels)

    def record(self, i):
        if self.images is not None:
            pixels = self.images[i].numpy()
            return "png", encode_png(pixels), pixels.tobytes()
        path = self.files[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e}") from e
        if self.resize:
            return self._resized(path, data)
        if not self.stats:                       # without a full decode, at least check it is an image
            try:
                Image.open(io.BytesIO(data)).close()
            except Exception as e:
                raise DataError(f"cannot read image {path}: {e} (replace or delete the file)") from e
        ext = os.path.splitext(path)[1][1:].lower()
        return ext, data, data

    def _resized(self, path, data):
        """`ccfs shards --resize`: the image with its shorter side self.resize, re-encoded: a JPEG as JPEG
        (still decodable on the device; quality self.jpeg_quality, chroma not subsampled: at 4:2:0 the
        error at 95 is 2.5x that of 4:4:4, docs/shards.md), anything else as lossless PNG."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                img = resize_shorter(img.convert("RGB"), self.resize)
        except Exception as e:
            raise DataError(f"cannot read image {path}: {e} (replace or delete the file)") from e
        if is_jpeg(data):
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=self.jpeg_quality, subsampling=0)
            return "jpg", buf.getvalue(), data
        return "png", encode_png(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)), data


def _open_source(data_cfg, split, resize=None, jpeg_quality=RESIZE_JPEG_QUALITY):
    """The `_Source` of a `data` config section's split (digits, CIFAR: decoded; image files: by path, with
    `resize`: pre-resized to that shorter side)."""
    source, image_size = data_cfg["source"], data_cfg.get("image_size")
    if source == "webdataset":
        raise ConfigError("data.source is already 'webdataset'; name the original source (digits, cifar10, "
                          "cifar100, tiny-imagenet, imagefolder) to write shards from it")
    if source in ("tiny-imagenet", "imagefolder"):
        root = source_root(source, data_cfg.get("root"))
        train_files, train_labels, classes = image_files(source, root, "train")
        files, labels = (train_files, train_labels) if split == "train" else image_files(source, root, split)[:2]
        size = square_side(train_files[0], "RGB") if image_size is None else image_size
        if resize is not None and resize < size:
            raise ConfigError(f"--resize {resize} is smaller than the image size {size} the shards are read at "
                              f"(data.image_size); pass at least {size}, or lower data.image_size")
        if source == "tiny-imagenet":
            mean, std, stats = TINY_MEAN, TINY_STD, False
        else:
            mean, std, stats = None, None, split == "train"   # imagefolder: measured while writing train
        return _Source(source, split, classes, labels, (3, size, size), mean, std, files=files, stats=stats,
                       image_size=size, resize=resize, jpeg_quality=jpeg_quality)
    if resize is not None:
        raise ConfigError(f"--resize applies to image-file sources (imagefolder, tiny-imagenet); '{source}' is "
                          f"stored at its own size as lossless PNG")
    real = set_normalisation(load_source(data_cfg), data_cfg)
    part = real.train if split == "train" else real.test
    return _Source(real.name, split, list(real.classes), part.labels.numpy(), part.shape, real.mean, real.std,
                   images=part.images)


_WRITE_SOURCE = None   # the _Source the writer's processes read (set by _writer_init in each)


def _writer_context():
    """How the writer's processes start: `fork` while this process runs a single thread (no lock can be held
    by another thread; the source is inherited, and no fork server has to start first), else start_context()
    (the source is then pickled to each process once, an in-memory source's images through shared memory).
    `ccfs shards` forks under OMP_NUM_THREADS=1 (else numpy's OpenBLAS pool is a second thread)."""
    try:
        single = len(os.listdir("/proc/self/task")) == 1
    except OSError:                              # no /proc: cannot tell
        single = False
    return multiprocessing.get_context("fork") if single else start_context()


def _writer_init(src):
    """In a writer process: the source to read; the process ends with the writer."""
    global _WRITE_SOURCE
    die_with_parent(signal.SIGKILL)
    _WRITE_SOURCE = src


def _write_one(job):
    """Write shard `job` = (path, first, count, width) of _WRITE_SOURCE; returns its index entry + digests."""
    path, first, count, width = job
    src = _WRITE_SOURCE
    digest = hashlib.sha256()
    channels = src.shape[0]
    sums = np.zeros((2, channels), dtype=np.int64)
    pixels_seen = 0

    def samples():
        nonlocal pixels_seen
        for i in range(first, first + count):
            ext, data, raw = src.record(i)
            label = int(src.labels[i])
            digest.update(f"{i}:{label}:".encode() + hashlib.sha256(raw).digest())
            if src.stats:
                img = decode_image(data, "RGB", src.shape, what=src.files[i]).reshape(channels, -1)
                img = img.numpy().astype(np.int64)
                sums[0] += img.sum(1)
                sums[1] += (img * img).sum(1)
                pixels_seen += img.shape[1]
            yield f"{i:0{width}d}", {"cls": str(label).encode(), ext: data}

    size, sha = write_tar(path, samples())
    return ({"file": os.path.basename(path), "first": first, "count": count, "bytes": size, "sha256": sha},
            digest.digest(), sums, pixels_seen)


def write_shards(data_cfg, out_dir, split="train", per_shard=2000, overwrite=False, workers=None, log=print,
                 resize=None, jpeg_quality=RESIZE_JPEG_QUALITY):
    """Write `split` of the source named by `data_cfg` as WebDataset shards + `<out_dir>/<split>.json`.

    Returns the index dict. Refuses to replace an existing index unless `overwrite`; with it, shard files
    of this split that the new index does not list are removed after the new index is in place.

    `resize` (image-file sources): store every image with its shorter side `resize` (at least the image size
    it is read at), re-encoded (_Source._resized, JPEGs at `jpeg_quality`), so that reading decodes smaller
    files and only crops (when `resize` is that size); the index's source.resize records it.

    Progress is reported per shard (progress.track). A killed write resumes: the next write of the same job
    into `out_dir` keeps the shards `<split>.progress.json` lists and that are whole, and writes the rest
    (_Manifest).
    """
    if split not in ("train", "test"):
        raise ConfigError(f"--split must be train or test, got {split!r}")
    if per_shard < 1:
        raise ConfigError(f"--per-shard must be at least 1, got {per_shard}")
    if resize is not None and resize < 1:
        raise ConfigError(f"--resize must be at least 1, got {resize}")
    if not 1 <= jpeg_quality <= 100:
        raise ConfigError(f"--jpeg-quality must lie in 1..100, got {jpeg_quality}")
    out_dir = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
    index_path = os.path.join(out_dir, f"{split}.json")
    if os.path.lexists(index_path) and not overwrite:
        raise CCFSError(f"{index_path} already exists; pass --overwrite to replace these shards, "
                        f"or choose another --out")
    _refuse_foreign(out_dir, split, index_path)
    src = _open_source(data_cfg, split, resize, jpeg_quality)
    n = len(src)
    if n == 0:
        raise DataError(f"the {split} split of '{src.name}' holds no samples")
    os.makedirs(out_dir, exist_ok=True)
    remove_leftovers(out_dir, split)
    width = key_width(n)
    jobs = [(os.path.join(out_dir, shard_name(split, s)), first, min(per_shard, n - first), width)
            for s, first in enumerate(range(0, n, per_shard))]
    manifest = _Manifest(out_dir, split, _job_key(src, data_cfg, per_shard, width, resize, jpeg_quality),
                         overwrite)
    results = manifest.completed(jobs)           # shard number -> result, of shards an earlier attempt wrote
    todo = [job for s, job in enumerate(jobs) if s not in results]
    workers = max(1, min(workers or min(8, os.cpu_count() or 1), max(len(todo), 1)))
    kept = f"; {len(results)} kept from an earlier attempt" if results else ""
    log(f"writing {n} {split} samples of '{src.name}' as {len(jobs)} shard(s) of up to {per_shard} "
        f"to {out_dir} ({workers} process(es){kept})")
    number = {job[0]: s for s, job in enumerate(jobs)}
    for path, result in progress.track(_run_jobs(src, todo, workers), desc=f"shards {split}", total=len(jobs),
                                       initial=len(results), unit="shard"):
        results[number[path]] = result
        manifest.add(number[path], result)
    results = [results[s] for s in range(len(jobs))]
    stored = f"resize={resize},q={jpeg_quality}:" if resize else ""        # what the members are of the source
    fingerprint = hashlib.sha256(f"{src.name}:{split}:{n}:{src.shape}:{stored}".encode())
    for _, digest, _, _ in results:
        fingerprint.update(digest)
    mean, std = src.mean, src.std
    if src.stats:
        sums = sum(r[2] for r in results)
        count = sum(r[3] for r in results)
        m = sums[0] / (255.0 * count)
        v = np.maximum(sums[1] / (255.0 ** 2 * count) - m * m, 0.0)
        mean, std = tuple(float(x) for x in m), tuple(float(x) for x in np.sqrt(v))
    index = {
        "format": FORMAT,
        "name": src.name,
        "split": split,
        "num_samples": n,
        "classes": [str(c) for c in src.classes],
        "shape": list(src.shape),
        "mean": list(mean) if mean is not None else None,
        "std": list(std) if std is not None else None,
        "source": {"source": data_cfg["source"], "image_size": data_cfg.get("image_size"),
                   "fingerprint": "sha256:" + fingerprint.hexdigest(),
                   **({"resize": resize, "jpeg_quality": jpeg_quality} if resize else {})},
        "key_width": width,
        "shards": [r[0] for r in results],
        "labels": src.labels.tolist(),
    }
    write_index(index_path, index)
    listed = {s["file"] for s in index["shards"]}
    for name in os.listdir(out_dir):
        if name.startswith(f"{split}-") and SHARD_RE.match(name) and name not in listed:
            os.remove(os.path.join(out_dir, name))
    manifest.remove()
    return index


def _run_jobs(src, jobs, workers):
    """Write the shards `jobs` of `src`; yields (shard path, _write_one's result) as each shard is complete."""
    global _WRITE_SOURCE
    _WRITE_SOURCE = src
    try:
        if workers == 1:
            for job in jobs:
                yield job[0], _write_one(job)
            return
        # a process pool that fails (BrokenProcessPool) instead of waiting forever when a process dies
        from concurrent.futures import ProcessPoolExecutor, as_completed
        with ProcessPoolExecutor(workers, mp_context=_writer_context(), initializer=_writer_init,
                                 initargs=(src,)) as pool:
            futures = {pool.submit(_write_one, job): job[0] for job in jobs}
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            finally:                             # a failed shard: the others not yet started are not started
                pool.shutdown(cancel_futures=True)
    finally:
        _WRITE_SOURCE = None


def _job_key(src, data_cfg, per_shard, width, resize, jpeg_quality):
    """A sha256 over what decides a write's bytes: the source (an in-memory source's pixels; image files' paths,
    sizes and mtimes), labels, classes, shape, statistics, split, per_shard and --resize / --jpeg-quality.
    Shards of an earlier attempt are kept only under the same key (_Manifest)."""
    h = hashlib.sha256(json.dumps([FORMAT, src.name, src.split, len(src), list(src.shape), data_cfg["source"],
                                   data_cfg.get("image_size"), [str(c) for c in src.classes], src.mean, src.std,
                                   src.stats, per_shard, width, resize, jpeg_quality if resize else None],
                                  default=str).encode())
    h.update(np.ascontiguousarray(src.labels).tobytes())
    if src.images is not None:
        h.update(np.ascontiguousarray(src.images.numpy()).data)
    else:
        for path in src.files:
            try:
                st = os.stat(path)
            except OSError as e:
                raise DataError(f"cannot read image {path}: {e}") from e
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return "sha256:" + h.hexdigest()


class _Manifest:
    """`<out>/<split>.progress.json`: the shards of an unfinished write that are complete, so that a killed
    write resumes where it stopped. Rewritten atomically after each shard file is renamed into place; per
    shard its index entry (file, first, count, bytes, sha256) and what the index needs besides (the samples'
    digest, pixel sums); removed once the index is written. A later write of the same job (_job_key) keeps a
    listed shard only if its file is a regular file of the listed size and sha256; every other shard is
    written again, so the result is byte-identical to an uninterrupted write."""

    def __init__(self, out_dir, split, job, overwrite):
        self.path, self.job, self.shards = os.path.join(out_dir, f"{split}.progress.json"), job, {}
        self.prior = {}
        if os.path.lexists(self.path):
            prior = _read_manifest(self.path)
            if prior.get("job") == job:
                self.prior = prior.get("shards") if isinstance(prior.get("shards"), dict) else {}
            elif not overwrite:
                raise CCFSError(f"--out holds an unfinished write of the {split} split with other data or settings "
                                f"({self.path}); rerun that command to finish it, or pass --overwrite to start "
                                f"this one afresh")

    def completed(self, jobs):
        """{shard number: result} of the listed shards that are whole and in place; starts the manifest."""
        done = {}
        for s, (path, first, count, _) in enumerate(jobs):
            entry = self.prior.get(str(s))
            try:
                shard = entry["shard"]
                if shard["file"] != os.path.basename(path) or shard["first"] != first or shard["count"] != count \
                        or not _file_matches(path, shard["bytes"], shard["sha256"]):
                    continue
                sums = np.asarray(entry["sums"], dtype=np.int64).reshape(2, -1)
                done[s] = (shard, bytes.fromhex(entry["digest"]), sums, int(entry["pixels"]))
            except (KeyError, TypeError, ValueError, AttributeError):    # absent or malformed: written again
                continue
            self.shards[str(s)] = entry
        self._write()
        return done

    def add(self, s, result):
        shard, digest, sums, pixels = result
        self.shards[str(s)] = {"shard": shard, "digest": digest.hex(), "sums": sums.tolist(), "pixels": int(pixels)}
        self._write()

    def _write(self):
        write_index(self.path, {"format": PROGRESS_FORMAT, "job": self.job, "shards": self.shards})

    def remove(self):
        if os.path.lexists(self.path):
            os.remove(self.path)


def _read_own(path, what, fmt, verb):
    """The JSON file `path` if it is a `what` this writer made (format `fmt`), else the CCFSError that leaves
    --out alone (`verb`: what is not done to it)."""
    try:
        meta = ccfs_io.read_json(path, what)
    except DataError as exc:
        raise CCFSError(f"--out: {exc}; it is not a ccfs {what}, so {verb}: choose another --out") from None
    if not (isinstance(meta, dict) and meta.get("format") == fmt):
        raise CCFSError(f"--out: {path} is not a ccfs {what} (no format {fmt!r}), so {verb}: choose another --out")
    return meta


def _read_manifest(path):
    return _read_own(path, "shard progress manifest", PROGRESS_FORMAT, "it is not replaced")


def _file_matches(path, size, sha256):
    """Whether `path` is a regular file (not a link) of `size` bytes with that sha256."""
    if not (isinstance(size, int) and isinstance(sha256, str)) or os.path.islink(path) or not os.path.isfile(path) \
            or os.path.getsize(path) != size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ_BUFFER), b""):
            digest.update(block)
    return digest.hexdigest() == sha256


def _refuse_foreign(out_dir, split, index_path):
    """--overwrite replaces only shards this writer made: an existing `<split>.json` must be a ccfs shard
    index (its format), and `<split>-NNNNNN.tar` files may exist only beside such an index or the progress
    manifest of an unfinished write (_Manifest)."""
    if os.path.lexists(index_path):
        _read_own(index_path, "shard index", FORMAT, "--overwrite does not replace it")
    elif os.path.lexists(os.path.join(out_dir, f"{split}.progress.json")):
        _read_manifest(os.path.join(out_dir, f"{split}.progress.json"))     # an unfinished write of ours
    elif os.path.isdir(out_dir):
        ours = [n for n in os.listdir(out_dir) if n.startswith(f"{split}-") and SHARD_RE.match(n)]
        if ours:
            raise CCFSError(f"--out '{out_dir}' holds {ours[0]} but no {split}.json written by `ccfs shards`; "
                            f"those files are not replaced: choose another --out")


def remove_leftovers(out_dir, split):
    """Remove the temporary files a killed writer of `split` left in `out_dir` (shards, index)."""
    leftover = re.compile(rf"^\.({split}-\d{{6}}\.tar|{split}\.json|{split}\.progress\.json)\..+\.tmp$")
    for name in os.listdir(out_dir):
        if leftover.match(name) and os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def write_index(path, index):
    """Write an index dict as compact, deterministic JSON (atomically)."""
    from .io import atomic_path
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(index, f, separators=(",", ":"))
            f.write("\n")


# ============================================================================================ reading

def _is_url(path):
    return bool(URL_RE.match(path))


def shard_location(index_path, file, allow_urls=False, allow_outside=False):
    """Where the index at `index_path` says a shard is: a path, or a URL / `pipe:` command when allowed.

    Refused (DataError naming the index and the entry): URLs and `pipe:` commands unless `allow_urls`
    (webdataset opens URLs through shell commands: `pipe:cmd` runs cmd), absolute paths and paths that
    climb out of the index's folder unless `allow_outside`."""
    if "\0" in file:
        raise DataError(f"shard index {index_path}: shard file {file!r} holds a NUL byte")
    if _is_url(file):
        if not allow_urls:
            raise DataError(f"shard index {index_path}: shard file {file!r} is a URL or command, refused (it "
                            f"would be opened or run by webdataset); pass data.allow_urls=true if you trust "
                            f"this index")
        return file
    folder = os.path.dirname(os.path.abspath(index_path))
    path = os.path.normpath(os.path.join(folder, file))
    real_folder = os.path.realpath(folder)
    if not allow_outside and (os.path.isabs(file) or os.path.commonpath([folder, path]) != folder
                              or os.path.commonpath([real_folder, os.path.realpath(path)]) != real_folder):
        raise DataError(f"shard index {index_path}: shard file {file!r} lies outside the index's folder "
                        f"{folder} (by its path or through a symlink), refused; pass data.allow_outside=true "
                        f"if you trust this index")
    return path


def read_index(path, allow_urls=False, allow_outside=False):
    """Load and validate an index JSON; returns (dict, list of shard dicts with resolved 'url').
    `allow_urls`, `allow_outside`: see shard_location."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path) or os.path.isdir(path):
        hint = " (data.root / data.test_root of the webdataset source name the index JSON written by " \
               "`ccfs shards`, e.g. shards/train.json)" if os.path.isdir(path) else ""
        raise DataError(f"shard index not found: {path}{hint}")
    meta = ccfs_io.read_json(path, "shard index")

    def bad(what):
        return DataError(f"shard index {path} is malformed: {what} (rewrite it with `ccfs shards`)")

    if not isinstance(meta, dict):
        raise bad("expected a JSON object")
    for key in ("num_samples", "classes", "shape", "shards", "labels"):
        if key not in meta:
            raise bad(f"no '{key}' entry")
    n = meta["num_samples"]
    if type(n) is not int or n < 0:
        raise bad(f"num_samples {n!r}")
    shape = meta["shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(d) is int and d > 0 for d in shape)
            and shape[0] in (1, 3) and shape[1] == shape[2] and shape[1] <= MAX_SIDE):
        raise bad(f"shape {shape!r} (expected [C, S, S] with C 1 or 3 and S at most {MAX_SIDE})")
    for key in ("mean", "std"):
        values = meta.get(key)
        # statistics of pixels in [0, 1]: a mean in [0, 1], a std in [1e-8, 1]; anything else normalises to
        # inf or NaN and would surface only after a filter has trained, naming a staged file
        if values is not None and not (isinstance(values, list) and len(values) == shape[0] and all(
                type(v) in (int, float) and math.isfinite(v) and (0 <= v <= 1 if key == "mean" else 1e-8 <= v <= 1)
                for v in values)):
            raise bad(f"{key} {values!r:.80} (expected {shape[0]} number(s) in "
                      f"{'[0, 1]' if key == 'mean' else '[1e-8, 1]'}, one per channel, of pixels in [0, 1])")
    classes = meta["classes"]
    if not isinstance(classes, list) or not classes:
        raise bad("classes must be a non-empty list")
    labels = meta["labels"]
    if not isinstance(labels, list) or len(labels) != n:
        raise bad(f"{len(labels) if isinstance(labels, list) else 'no'} labels for {n} samples")
    try:
        raw = np.asarray(labels)
        if raw.ndim != 1 or (n and raw.dtype.kind not in "iu") or any(type(v) is bool for v in labels):
            raise TypeError                            # 1.5, "3" or true must not become a class quietly
        labels = raw.astype(np.int64)
    except (TypeError, ValueError, OverflowError):
        raise bad("labels must be integers") from None
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        raise bad(f"labels outside 0..{len(classes) - 1}")
    shards, expect_first = [], 0
    if not isinstance(meta["shards"], list):
        raise bad("shards must be a list")
    for i, s in enumerate(meta["shards"]):
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and type(s.get("first")) is int
                and type(s.get("count")) is int and s["count"] >= 1):
            raise bad(f"shard entry {i} must have 'file', 'first' and a positive 'count'")
        if s["first"] != expect_first:
            raise bad(f"shard {s['file']} starts at index {s['first']}, expected {expect_first} "
                      f"(shards must cover 0..num_samples-1 in order)")
        if "bytes" in s and not (type(s["bytes"]) is int and s["bytes"] >= 0):
            raise bad(f"shard {s['file']}: bytes {s['bytes']!r}")
        if "sha256" in s and not (isinstance(s["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", s["sha256"])):
            raise bad(f"shard {s['file']}: sha256 {s['sha256']!r} (expected 64 hex digits)")
        expect_first += s["count"]
        shards.append(dict(s, url=shard_location(path, s["file"], allow_urls, allow_outside)))
    if expect_first != n:
        raise bad(f"the shards hold {expect_first} samples, num_samples is {n}")
    meta["labels"] = labels
    return meta, shards


def index_places(path, data_cfg):
    """The index file at `path` and the local shard files it names (ownership: io.check_outputs)."""
    _, shards = read_index(path, bool(data_cfg.get("allow_urls")), bool(data_cfg.get("allow_outside")))
    return [path] + [s["url"] for s in shards if not _is_url(s["url"])]


class ShardSplit:
    """A split stored as WebDataset shards: a streamed pool (pool.Pool, `in_memory` False).

    `labels` come from the index JSON, so selection never reads an image; `fetch` and `batches` stream
    only the shards that hold wanted samples. `image_size` overrides the index's image size (images are
    then resized and center-cropped). `num_workers` loader worker processes read and decode per rank
    (_Workers: started on the first pass that needs them, reused by every later one, ended by `close` or
    with the split); with `decode="device"` they pass JPEG members on undecoded and `batches` / `stream`
    decode each batch's JPEGs on the device they are given (decode_jpeg_batch), other members as before in
    the workers. A worker that delivers nothing for `worker_timeout` seconds fails the pass (CCFSError
    naming the step and the shards it was reading).
    """
    in_memory = False

    def __init__(self, index_path, image_size=None, num_workers=0, check_files=True, allow_urls=False,
                 allow_outside=False, decode="cpu", worker_timeout=WORKER_TIMEOUT_S):
        if decode not in DECODE:
            raise ConfigError(f"data.decode must be one of {', '.join(DECODE)}, got {decode!r}")
        self.decode = decode
        self.worker_timeout = float(worker_timeout)
        self._workers = None
        self.index_path = os.path.expanduser(os.fspath(index_path))
        self.meta, self.shards = read_index(self.index_path, allow_urls, allow_outside)
        self.labels = torch.from_numpy(self.meta["labels"])
        channels, size, _ = self.meta["shape"]
        size = int(image_size) if image_size is not None else size
        if not 1 <= size <= MAX_SIDE:
            raise ConfigError(f"data.image_size must lie in 1..{MAX_SIDE}, got {size}")
        self._shape = (channels, size, size)
        self.mode = "L" if channels == 1 else "RGB"
        self.num_workers = int(num_workers)
        self._firsts = np.array([s["first"] for s in self.shards], dtype=np.int64)
        if check_files:
            self._check_files()
        if self.num_workers:
            start_fork_server()

    def _check_files(self):
        missing, wrong = [], []
        for s in self.shards:
            if _is_url(s["url"]):
                continue
            if not os.path.exists(s["url"]):
                missing.append(s["url"])
                continue
            ccfs_io.regular_file(s["url"], f"shard (listed in {self.index_path})")
            size = os.path.getsize(s["url"])
            if "bytes" in s and size != s["bytes"]:
                wrong.append(f"shard {s['url']} is truncated or was replaced: {size} bytes, "
                             f"its index says {s['bytes']}")
        if missing:
            raise DataError(f"{len(missing)} shard file(s) listed in {self.index_path} are missing: "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if wrong:
            raise DataError(f"{'; '.join(wrong[:3])}{f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''} "
                            f"(index {self.index_path}; rewrite the shards with `ccfs shards`)")

    def __len__(self):
        return int(self.labels.numel())

    def __getstate__(self):
        """What a loader worker is sent once at its start: the index (labels as numpy), not the label tensor
        (pickling it would move it into shared memory) nor the workers."""
        state = dict(self.__dict__)
        del state["labels"], state["_workers"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _workers=None)
        self.labels = torch.from_numpy(self.meta["labels"])

    def close(self):
        """End this split's loader workers (a later pass starts new ones)."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    @property
    def shape(self):
        return self._shape

    @property
    def classes(self):
        return list(self.meta["classes"])

    def shards_with(self, mask):
        """Positions of the shards holding at least one sample where the boolean `mask` is True."""
        if not len(self.shards):
            return []
        hits = np.add.reduceat(mask.astype(np.int64), self._firsts)
        return np.flatnonzero(hits).tolist()

    def _mask(self, index):
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"index outside 0..{len(self) - 1} of {self.index_path}")
        mask = np.zeros(len(self), dtype=bool)
        mask[index] = True
        return index, mask

    def rank_shards(self, mask, rank, world):
        """Positions of the shards `rank` reads (for `batches` and `fetch`): those holding a wanted sample,
        dealt round-robin to the ranks."""
        return deal(self.shards_with(mask), rank, world)

    def _loader(self, mask, batch_size, rank, world, pin_memory=False, device=None):
        """Batches (uint8 images, labels, global ids) of the wanted samples in this rank's shards; with a
        `device`, JPEGs are decoded there (see _iterate)."""
        mine = self.rank_shards(mask, rank, world)
        if mine:
            stream = _ShardStream(self, [self.shards[i] for i in mine], mask, batch_size, encoded=device is not None)
            yield from self._iterate(stream, len(mine), batch_size, pin_memory, device)

    def _decode_on(self, device):
        """The device to decode JPEGs on for a pass to `device` (None: in the loader workers)."""
        return device if self.decode == "device" else None

    def stream(self, positions, mask, batch_size, interleave=1, seed=(0,), pin_memory=False, device=None):
        """Batches (uint8 images, labels, global ids) of the wanted samples (`mask`) of the shards at
        `positions`, for training on the stream (stream_train). The shards are dealt round-robin to this
        split's loader workers in the given order; each worker reads `interleave` of its shards at once and
        draws every next sample from one of them at random (probability proportional to its wanted samples
        left, from `seed` + the worker id), so that a batch mixes several shards (a class-sorted source
        puts few classes in one shard). The shard checks are those of `batches`. With decode="device" the
        images come decoded on `device` (labels and ids stay on the CPU); else on the CPU."""
        if len(positions):
            decode_on = self._decode_on(device)
            stream = _InterleavedStream(self, [self.shards[i] for i in positions], mask, batch_size,
                                        interleave, tuple(seed), encoded=decode_on is not None)
            yield from self._iterate(stream, len(positions), batch_size, pin_memory, decode_on)

    def _iterate(self, stream, n_shards, batch_size, pin_memory, device=None):
        """(images, labels, ids) views of the packed batches of a _ShardStream, through this split's loader
        workers (min(num_workers, n_shards) of them; none: in this process); an encoded stream's batches are
        decoded on `device` (fresh image tensors there)."""
        workers = min(self.num_workers, n_shards)
        if workers == 0:
            items = iter(stream)
        else:
            if self._workers is None:
                self._workers = _Workers(self, self.worker_timeout)
            items = self._workers.run(stream, workers)
        for item in items:
            if pin_memory and workers:           # as the DataLoader did: a worker's batch, pinned for the copy
                item = (item[0].pin_memory(), item[1])
            if stream.encoded:
                yield self._decoded(*_unpack_encoded(*item, batch_size), device)
            else:
                yield _unpack(*item, batch_size, self._shape)

    def _decoded(self, payloads, jpeg, labels, ids, device):
        """(uint8 images on `device`, labels, ids) of an encoded batch: the JPEGs decoded together on the device
        (decode_jpeg_batch), the members the workers decoded (PNG, ...) copied there."""
        out = torch.empty((len(payloads),) + self._shape, dtype=torch.uint8, device=device)
        rows = np.flatnonzero(jpeg)
        if len(rows):
            try:
                images = decode_jpeg_batch([payloads[i] for i in rows], self.mode, self._shape[1], device)
            except RuntimeError:          # decode_jpeg names no image: decode them one by one, see _decode_one
                images = [self._decode_one(payloads[i], int(ids[i]), device) for i in rows]
            out[torch.from_numpy(rows).to(device)] = torch.stack(images)
        rows = np.flatnonzero(~jpeg)
        if len(rows):
            pixels = torch.stack([payloads[i].view(self._shape) for i in rows])
            out[torch.from_numpy(rows).to(device)] = pixels.to(device)
        return out, labels, ids

    def _decode_one(self, payload, gid, device):
        """One JPEG the batch decode failed on: on the device alone, else by the CPU path (PIL: it may read what
        the device's decoder does not), whose DataError names the shard and key as decode="cpu" does."""
        try:
            return decode_jpeg_batch([payload], self.mode, self._shape[1], device)[0]
        except RuntimeError:
            shard = self.shards[int(np.searchsorted(self._firsts, gid, side="right")) - 1]
            key = f"{gid:0{self.meta.get('key_width', key_width(len(self)))}d}"
            img = decode_image(payload.numpy().tobytes(), self.mode, self._shape,
                               what=f"shard {shard['url']}, sample {key}")
            return img.to(device)

    def batches(self, index, batch_size, rank, world, device):
        """Yield this rank's wanted samples as (uint8 images, labels, global ids) on `device`.

        Shards holding wanted samples are dealt round-robin to ranks, then to DataLoader workers; unwanted
        samples are skipped. The union over ranks is every wanted sample exactly once.
        """
        _, mask = self._mask(index)
        cuda = device.type == "cuda"
        decode_on = self._decode_on(device)
        for x, y, ids in self._loader(mask, batch_size, rank, world, pin_memory=cuda and decode_on is None,
                                      device=decode_on):
            if cuda:
                yield (x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                       ids.to(device, non_blocking=True))
            else:   # labels and ids of their own: a consumer keeping them must not keep the batch buffer alive
                    # (x is a view of it too under decode="cpu")
                yield x, y.clone(), ids.clone()

    def fetch(self, index, accelerator=None, batch_size=256):
        """(uint8 images, labels) of the samples `index`, in that order: one pass over the shards holding them.

        With an `accelerator` of N processes (every rank must call it, with the same index) the shards are
        dealt to the ranks as in `batches`, each rank reads and decodes its share only, and the images are
        all-gathered in pieces: every rank returns the same tensors having read 1/N of the data.
        """
        index, mask = self._mask(index)
        wanted = np.flatnonzero(mask)
        rank, world = rank_world(accelerator)
        if world == 1:
            out, found = self._fetch_into(mask, wanted, batch_size, 0, 1)
        else:
            from .dist import gather_rows_in_pieces
            in_mine = np.zeros(len(self), dtype=bool)                  # the samples of this rank's shards
            for s in self.rank_shards(mask, rank, world):
                in_mine[self.shards[s]["first"]:self.shards[s]["first"] + self.shards[s]["count"]] = True
            mine = wanted[in_mine[wanted]]
            local, local_found = self._fetch_into(mask, mine, batch_size, rank, world)
            if not local_found.all():                                  # reported below, on every rank alike
                local, mine = local[torch.from_numpy(local_found)], mine[local_found]
            out = torch.empty((len(wanted),) + self._shape, dtype=torch.uint8)
            found = np.zeros(len(wanted), dtype=bool)
            for got in gather_rows_in_pieces(accelerator, {"images": local, "ids": torch.from_numpy(mine)}):
                pos = np.searchsorted(wanted, got["ids"].numpy())
                out[torch.from_numpy(pos)] = got["images"]
                found[pos] = True
        if not found.all():
            raise DataError(f"{self.index_path}: {int((~found).sum())} wanted samples not found in the shards, "
                            f"e.g. index {int(wanted[~found][0])}")
        if not (len(index) == len(wanted) and np.array_equal(index, wanted)):
            out = out.index_select(0, torch.from_numpy(np.searchsorted(wanted, index)))
        return out, self.labels[torch.from_numpy(index)]

    def fetch_shares(self, index, accelerator=None, batch_size=256):
        """Yield this rank's share of the samples `index` (unique) as (positions in `index`, uint8 images):
        those of the shards `fetch` deals to this rank, read once and handed over batch by batch, so a caller
        writing them into a shared file (synthetic.write) never holds the whole set. Every rank must iterate
        it to its end (the check that every sample was found is collective)."""
        index, mask = self._mask(index)
        order = np.argsort(index, kind="stable")
        ordered = index[order]
        if len(index) > 1 and (ordered[1:] == ordered[:-1]).any():
            raise ValueError("fetch_shares needs unique indices")
        rank, world = rank_world(accelerator)
        found = 0
        for x, _, ids in self._loader(mask, batch_size, rank, world):
            found += len(ids)
            yield order[np.searchsorted(ordered, ids.numpy())], x
        if world > 1:
            found = int(accelerator.gather(torch.tensor([found], device=accelerator.device)).sum())
        if found != len(index):
            raise DataError(f"{self.index_path}: {len(index) - found} wanted samples not found in the shards")

    def _fetch_into(self, mask, rows, batch_size, rank, world):
        """Read this rank's share of the wanted samples into a new tensor whose row i is sample rows[i] (rows:
        sorted global indices). Returns (images, found per row)."""
        out = torch.empty((len(rows),) + self._shape, dtype=torch.uint8)
        found = np.zeros(len(rows), dtype=bool)
        for x, _, ids in self._loader(mask, batch_size, rank, world):
            pos = np.searchsorted(rows, ids.numpy())
            if pos.max(initial=-1) >= len(rows) or not np.array_equal(rows[pos], ids.numpy()):
                raise DataError(f"{self.index_path}: a shard yielded samples outside this rank's share")
            out[torch.from_numpy(pos)] = x
            found[pos] = True
        return out, found


def _pack(batch_size, shape):
    """One uint8 buffer holding a batch: labels and ids (int64, 2 x batch_size) first, then the images.

    A worker sends one tensor per batch instead of three: each tensor crossing from a DataLoader worker
    costs the rank a file-descriptor hand-over, which limits the batches per second a rank can take in.
    Returns (buffer, images view, meta view)."""
    b, pixels = batch_size, int(np.prod(shape))
    buf = torch.empty(16 * b + b * pixels, dtype=torch.uint8)
    return buf, buf[16 * b:].view((b,) + tuple(shape)), buf[:16 * b].view(torch.int64).view(2, b)


def _unpack(buf, n, batch_size, shape):
    """(images, labels, ids) views of the first n samples of a packed batch."""
    b = batch_size
    meta = buf[:16 * b].view(torch.int64).view(2, b)
    return buf[16 * b:].view((b,) + tuple(shape))[:n], meta[0, :n], meta[1, :n]


def _pack_encoded(batch_size, payloads, jpeg, labels, ids):
    """One uint8 buffer of an encoded batch (decode="device"), one tensor per batch as _pack: int64 labels,
    ids, payload lengths and is-JPEG flags (4 x batch_size) first, then the payloads end to end: JPEG bytes
    as stored, or the C x H x W pixels a worker decoded (a member that is not a JPEG)."""
    b, n = batch_size, len(ids)
    meta = np.zeros((4, b), dtype=np.int64)
    meta[0, :n], meta[1, :n] = labels, ids
    meta[2, :n] = [len(p) for p in payloads]
    meta[3, :n] = jpeg
    return torch.frombuffer(bytearray(meta.tobytes() + b"".join(payloads)), dtype=torch.uint8), n


def _unpack_encoded(buf, n, batch_size):
    """(payload views, is-JPEG flags as numpy bools, labels, ids) of the first n samples of _pack_encoded's buffer."""
    b = batch_size
    meta = buf[:32 * b].view(torch.int64).view(4, b)
    ends = np.cumsum(meta[2, :n].numpy()) + 32 * b
    payloads = [buf[end - length:end] for end, length in zip(ends.tolist(), meta[2, :n].tolist())]
    return payloads, meta[3, :n].numpy().astype(bool), meta[0, :n], meta[1, :n]


class _ShardStream:
    """One pass: `shards` -> WebDataset samples -> checked, filtered by the mask, decoded -> batches; in loader
    worker w of n (`worker` = (w, n), set by _Workers.run) only its share of `shards` (every n-th, from the
    w-th). A worker without shards yields nothing. `encoded` (decode="device"): JPEG members are passed on
    as their bytes (_pack_encoded), others decoded."""

    def __init__(self, split, shards, mask, batch_size, encoded=False):
        self.split, self.shards, self.mask, self.batch_size = split, shards, mask, batch_size
        self.encoded = encoded
        self.worker = None           # (id, count) in a loader worker
        self.slots = None            # in a loader worker: (shared array, first slot) recording the open shards

    def __iter__(self):
        shards = self.shards if self.worker is None else deal(self.shards, *self.worker)
        yield from self._batches(shards)

    def _reading(self, shard):
        """self._samples(shard), recorded in this worker's slots while it is open (the rank names the shards
        of a stalled worker from them)."""
        slot = None
        if self.slots is not None:
            array, first = self.slots
            slot = next((i for i in range(first, first + SLOTS) if array[i] < 0), None)
            if slot is not None:
                array[slot] = shard["first"]
        try:
            yield from self._samples(shard)
        finally:
            if slot is not None:
                array[slot] = -1

    def _batches(self, shards):
        """Packed batches (buffer, n): see _pack."""
        imgs, labels, ids = [], [], []
        for shard in shards:
            for gid, label, img in self._reading(shard):
                imgs.append(img)
                labels.append(label)
                ids.append(gid)
                if len(ids) == self.batch_size:
                    yield self._packed(imgs, labels, ids)
                    imgs, labels, ids = [], [], []
        if ids:
            yield self._packed(imgs, labels, ids)

    def _packed(self, imgs, labels, ids):
        """One packed buffer of a batch (torch.stack into it: one call instead of a copy per image)."""
        if self.encoded:
            jpeg = [isinstance(p, bytes) for p in imgs]                  # the rest: pixels a worker decoded
            return _pack_encoded(self.batch_size, [p if j else p.numpy().tobytes() for p, j in zip(imgs, jpeg)],
                                 jpeg, labels, ids)
        buf, images, meta = _pack(self.batch_size, self.split.shape)
        n = len(ids)
        torch.stack(imgs, out=images[:n])
        meta[0, :n], meta[1, :n] = torch.tensor(labels), torch.tensor(ids)
        return buf, n

    def _samples(self, shard):
        """(global index, label, uint8 image) of the wanted samples of one shard, with its accounting checked."""
        url, first, count = shard["url"], shard["first"], shard["count"]
        split, mask, shape, mode = self.split, self.mask, self.split.shape, self.split.mode
        labels = split.meta["labels"]                             # numpy: cheaper to index than the tensor
        expect, last_key = first, None
        where = f"shard {url}"
        stream = _HashingReader(_open_shard(url, where))
        try:
            for key, files in iter_samples(stream, where):
                if not KEY_RE.fullmatch(key.encode("utf-8", "surrogateescape")) or int(key) != expect:
                    after = f" after key {last_key}" if last_key is not None else " as its first sample"
                    raise DataError(f"{where}: found key {key!r}{after}, expected index {expect} "
                                    f"(shard and index {split.index_path} disagree)")
                if expect >= first + count:
                    raise DataError(f"{where}: more samples than the {count} its index {split.index_path} lists")
                last_key, expect = key, expect + 1
                gid = int(key)
                exts = [e for e in files if e != "cls"]
                if "cls" not in files or len(exts) != 1:
                    raise DataError(f"{where}, sample {key}: expected a .cls label and one image, found "
                                    f"{sorted(files)} (truncated shard?)")
                label = files["cls"].strip()
                if not KEY_RE.fullmatch(label) or int(label) != labels[gid]:
                    raise DataError(f"{where}, sample {key}: label {label.decode(errors='replace')!r} differs "
                                    f"from the index's {labels[gid]}")
                if mask[gid]:
                    data = files[exts[0]]
                    if self.encoded and is_jpeg(data):
                        yield gid, int(label), data
                    else:
                        yield gid, int(label), decode_image(data, mode, shape, what=f"{where}, sample {key}")
            if expect == first + count:
                stream.read_to_end()
        except OSError as e:
            raise DataError(f"cannot read {where} after key {last_key}: {e}") from e
        finally:
            stream.close()
        if expect != first + count:
            detail = f" (the last is {last_key})" if last_key is not None else ""
            raise DataError(f"{where} holds {expect - first} samples{detail}, its index {split.index_path} "
                            f"says {count}: truncated or corrupt shard")
        stream.check(shard, where, split.index_path)


def _open_shard(url, where):
    """A binary stream of the shard at `url` (a path, or a URL / command shard_location let through)."""
    try:
        if _is_url(url):
            from webdataset.gopen import gopen   # pipe:, http(s):, s3 via pipe: ... as webdataset opens them
            return gopen(url)
        return open(ccfs_io.regular_file(url, "shard"), "rb", buffering=READ_BUFFER)
    except Exception as e:
        raise DataError(f"cannot open {where}: {e}") from e


class _HashingReader:
    """A read-only stream that hashes (sha256) and counts the bytes read through it."""

    def __init__(self, stream):
        self.stream, self.digest, self.size = stream, hashlib.sha256(), 0

    def read(self, n):
        data = self.stream.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data

    def read_to_end(self):
        """Hash the rest (the end-of-archive blocks and padding after the last member)."""
        while self.read(READ_BUFFER):
            pass

    def close(self):
        self.stream.close()

    def check(self, shard, where, index_path):
        """A DataError when the bytes read differ from the index entry's size or sha256 (if it records them)."""
        if "bytes" in shard and self.size != shard["bytes"]:
            raise DataError(f"{where} is {self.size} bytes, its index {index_path} says {shard['bytes']}: "
                            f"the shard was replaced or is corrupt (rewrite it with `ccfs shards`)")
        if "sha256" in shard and self.digest.hexdigest() != shard["sha256"]:
            raise DataError(f"{where}: content differs from its index {index_path} (sha256 "
                            f"{self.digest.hexdigest()[:16]}..., the index says {shard['sha256'][:16]}...): the "
                            f"shard was modified or is corrupt (rewrite it with `ccfs shards`)")


def verify_shards(index_path, allow_urls=False, allow_outside=False):
    """Read every shard of an index whole: its keys, labels and sample count against the index, and its size
    and sha256 against those recorded. Images are not decoded. Returns the number of shards; the first
    disagreement is a DataError naming the shard."""
    split = ShardSplit(index_path, allow_urls=allow_urls, allow_outside=allow_outside)
    stream = _ShardStream(split, split.shards, np.zeros(len(split), dtype=bool), 1)
    for shard in split.shards:
        for _ in stream._samples(shard):           # nothing is wanted: every sample is checked, none decoded
            pass
    return len(split.shards)


class _InterleavedStream(_ShardStream):
    """A _ShardStream whose worker reads `interleave` of its shards at once (opening the next when one ends)
    and draws each next sample from an open shard chosen at random with probability proportional to its
    wanted samples left: a uniformly random merge of the open shards' sample sequences."""

    def __init__(self, split, shards, mask, batch_size, interleave, seed, encoded=False):
        super().__init__(split, shards, mask, batch_size, encoded)
        self.interleave, self.seed = max(1, int(interleave)), seed

    def _batches(self, shards):
        rng = np.random.default_rng(list(self.seed) + [0 if self.worker is None else self.worker[0]])
        pending, readers, left, total = list(shards), [], [], 0
        imgs, labels, ids = [], [], []
        uniform = iter(())
        while pending or readers:
            while pending and len(readers) < self.interleave:
                shard = pending.pop(0)
                readers.append(self._reading(shard))
                left.append(int(self.mask[shard["first"]:shard["first"] + shard["count"]].sum()))
                total += left[-1]
            pick = 0
            if total:                                  # the open shard holding the r-th of the samples left
                u = next(uniform, None)
                if u is None:                          # random numbers drawn 4096 at a time: cheaper per sample
                    uniform = iter(rng.random(4096).tolist())
                    u = next(uniform)
                r = min(int(u * total), total - 1)
                while r >= left[pick]:
                    r -= left[pick]
                    pick += 1
            if left[pick]:
                gid, label, img = next(readers[pick])
                imgs.append(img)
                labels.append(label)
                ids.append(gid)
                left[pick] -= 1
                total -= 1
                if len(ids) == self.batch_size:
                    yield self._packed(imgs, labels, ids)
                    imgs, labels, ids = [], [], []
            if not left[pick]:                         # read the shard to its end: its count checks run there
                for gid, _, _ in readers[pick]:
                    raise DataError(f"{self.split.index_path}: sample {gid} is wanted beyond its shard's count")
                del readers[pick], left[pick]
        if ids:
            yield self._packed(imgs, labels, ids)


# --------------------------------------------------------------------------------- loader workers

class _Workers:
    """One rank's loader worker processes for one split: started (start_context) as passes need them, then
    reused by every later pass, each told its pass through a pipe of its own.

    A pass over n workers is exactly what a DataLoader with n fresh workers gave it: worker w reads every
    n-th shard from the w-th (_ShardStream.worker) and the rank takes the workers' batches round-robin, one
    from each worker still holding one, in worker order; a worker has at most PREFETCH batches ready ahead.
    Every wait for a batch is bounded: a worker that delivers nothing for `timeout` seconds, or ends, fails
    the pass (CCFSError naming the step and the shards the worker was reading) and ends every worker."""

    def __init__(self, split, timeout):
        self.ctx = start_context()
        self.timeout, self.index_path = timeout, split.index_path
        self.shards, self.firsts = split.shards, split._firsts
        self.split = copy.copy(split)            # what the workers are sent (__getstate__); not the split itself,
        self.procs, self.tasks, self.results, self.slots = [], [], [], []   # which ends them when it goes
        self.dealt, self.passes = [], 0
        self.tuned = tune_malloc.cache_info().currsize > 0 and tune_malloc()     # as its rank: tuned or not
        weakref.finalize(split, self.close)

    def _start(self, n):
        while len(self.procs) < n:
            w = len(self.procs)
            # pipes, not multiprocessing queues: their semaphores would be reported as leaked when a rank leaves
            # through os._exit (dist.exit_process)
            (tasks, to_worker), (results, from_worker) = self.ctx.Pipe(duplex=False), self.ctx.Pipe(duplex=False)
            slots = self.ctx.RawArray(ctypes.c_int64, SLOTS)
            slots[:] = [-1] * SLOTS
            proc = self.ctx.Process(target=_worker_main, name=f"ccfs-loader-{w}", daemon=True,
                                    args=(self.split, w, tasks, from_worker, slots, os.getpid(), self.tuned))
            proc.start()
            tasks.close()                        # the worker's ends: its death is then an EOF here
            from_worker.close()
            self.procs.append(proc)
            self.tasks.append(_Outbox(to_worker))
            self.results.append(results)
            self.slots.append(slots)
            self.dealt.append([])

    def run(self, stream, n):
        """The packed batches of `stream` (a _ShardStream) read by workers 0..n-1."""
        self._start(n)
        self.passes += 1
        p = self.passes
        spec = copy.copy(stream)
        spec.split = None                        # each worker has the split from its start
        for w, tasks in enumerate(self.tasks):
            mine = None
            if w < n:
                mine = copy.copy(spec)
                mine.worker = (w, n)
                self.dealt[w] = deal(stream.shards, w, n)
            tasks.put(("pass", p, mine))         # also to the idle ones: whatever they still read is dropped
            if w < n:
                tasks.put(("more", p, PREFETCH))
        live = list(range(n))
        while live:
            for w in list(live):
                kind, item = self._receive(w, p)
                if kind == "end":
                    live.remove(w)
                    continue
                self.tasks[w].put(("more", p, 1))
                yield item

    def _receive(self, w, p):
        """Worker w's next message of pass p: ("batch", item) or ("end", None)."""
        start = time.monotonic()
        while True:
            if self.passes != p:
                raise RuntimeError(f"{self.index_path}: a pass over the split started while another was being read; "
                                   f"passes over one split must not nest")
            waited = time.monotonic() - start
            try:
                if not self.results[w].poll(max(0.01, min(LIVENESS_S, self.timeout - waited))):
                    raise queue.Empty
                got, kind, item = self.results[w].recv()
            except (queue.Empty, EOFError, OSError) as e:
                proc = self.procs[w]
                closed = not isinstance(e, queue.Empty)          # the worker's pipe ended: so did the worker
                if closed:
                    proc.join(timeout=LIVENESS_S)                # for its exit code
                ended = closed or not proc.is_alive()
                if not ended and time.monotonic() - start < self.timeout:
                    continue
                reading = self._reading(w)
                self.close()
                if ended:
                    raise CCFSError(f"loader worker {w} (pid {proc.pid}) of {self.index_path} ended with exit code "
                                    f"{proc.exitcode} in {_stage()} while {reading} (killed, or out of memory?)")
                raise CCFSError(f"the loader of {self.index_path} delivered nothing for {self.timeout:g} s "
                                f"(data.worker_timeout) in {_stage()}: worker {w} (pid {proc.pid}) stalled while "
                                f"{reading}; check the storage (or the pipe: command) it reads, or raise "
                                f"data.worker_timeout if one batch can take that long")
            if got != p:                         # left over from a pass that was left before its end
                continue
            if kind == "error":
                raise DataError(item)
            if kind == "failed":
                self.close()
                raise RuntimeError(f"loader worker {w} of {self.index_path} failed:\n{item}")
            return kind, item

    def _reading(self, w):
        """The shards worker w has open, in words."""
        firsts = sorted(v for v in self.slots[w] if v >= 0)
        if not firsts:
            dealt = [s["url"] for s in self.dealt[w]]
            return (f"opening none of its {len(dealt)} shard(s) yet ({', '.join(dealt[:3])}"
                    f"{' ...' if len(dealt) > 3 else ''})")
        urls = [self.shards[int(np.searchsorted(self.firsts, f, side="right")) - 1]["url"] for f in firsts]
        return f"reading shard(s) {', '.join(urls)}"

    def close(self):
        """End every worker now (SIGKILL: a worker holds nothing that must be saved)."""
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(timeout=LIVENESS_S)
        for channel in self.tasks + self.results:
            channel.close()
        self.procs, self.tasks, self.results, self.slots, self.dealt = [], [], [], [], []


class _Outbox:
    """Messages to one loader worker, written to its pipe by a thread of their own: the rank never waits for a
    worker to read (a pass's message holds its mask, larger than a pipe's buffer)."""

    def __init__(self, conn):
        self.conn, self.queue = conn, queue.SimpleQueue()
        threading.Thread(target=self._send, daemon=True, name="ccfs-loader-outbox").start()

    def put(self, message):
        self.queue.put(message)

    def _send(self):
        try:
            while True:
                message = self.queue.get()
                if message is _Outbox:           # closed
                    return
                self.conn.send(message)
        except OSError:                          # the worker is gone; the rank finds out when it waits for it
            pass
        finally:
            self.conn.close()                    # here, not by another thread while this one may write to it

    def close(self):
        self.queue.put(_Outbox)


def _stage():
    """The pipeline step reading a loader, for its errors: the engine's functions on the stack outside this
    module, outermost first (e.g. scores.dynamics_run > stream_train.train_stream > stream_train.epoch_batches)."""
    names, frame = [], sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("ccfs_dist.") and module != __name__:
            names.append(f"{module[len('ccfs_dist.'):]}.{frame.f_code.co_name}")
        frame = frame.f_back
    return " > ".join(reversed(names[:4])) or "a pass over the shards"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _worker_main(split, w, tasks, results, slots, rank, tuned):
    """A loader worker process (_Workers). Messages from its rank: ("pass", id, _ShardStream or None) starts
    a pass (dropping the one before), ("more", id, k) asks for k more of its batches, None ends the worker.
    Replies, per pass: (id, "batch", packed batch) each, then (id, "end", None); (id, "error", message) for a
    DataError, (id, "failed", traceback) for any other exception. It ends with its rank: SIGKILL when the
    fork server ends (which ends with the rank), and an idle worker checks for its rank every LIVENESS_S."""
    die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole process group: the rank decides
    torch.set_num_threads(1)
    if tuned:
        tune_malloc()
    fast_png_decoder()                           # probed once here, not at the first PNG
    batches, current, credit = None, None, 0
    while True:
        busy = batches is not None and credit > 0
        try:
            message = tasks.recv() if tasks.poll(0 if busy else LIVENESS_S) else ()
        except (EOFError, OSError):              # the rank is gone
            return
        if message == () and not busy:
            if not _alive(rank):
                return
            continue
        if message is None:
            return
        if message:                              # every message waiting is read before the next batch
            kind, p, payload = message
            if kind == "pass":
                if batches is not None:
                    batches.close()
                slots[:] = [-1] * SLOTS
                batches, current, credit = None, p, 0
                if payload is not None:
                    payload.split, payload.slots = split, (slots, 0)
                    batches = iter(payload)
            elif p == current:
                credit += payload
            continue
        try:
            reply = (current, "batch", next(batches))
            credit -= 1
        except StopIteration:
            reply, batches = (current, "end", None), None
        except DataError as e:
            reply, batches = (current, "error", str(e)), None
        except Exception:                        # noqa: BLE001 - a bug: the rank raises it with this traceback
            reply, batches = (current, "failed", traceback.format_exc()), None
        try:
            results.send(reply)
        except OSError:                          # the rank is gone
            return


# --------------------------------------------------------------------------------- tar parsing

_ZERO_BLOCK = bytes(512)


def iter_tar(stream, where="tar"):
    """(member name, bytes) of the regular files of a tar stream, in order.

    A strict, fast reader for ustar / pax / GNU tar as written by `ccfs shards`, webdataset's TarWriter
    or GNU tar: every header's checksum is verified; a short read or a bad header is a DataError naming
    `where` and the byte offset. End of data at a member boundary ends the stream (the caller checks counts).
    Not tarfile's stream mode, which takes a bad header after the first for the end of the archive and
    reads several times slower (module docstring).
    """
    offset, long_name, pax = 0, None, {}
    while True:
        header = stream.read(512)
        if not header or header == _ZERO_BLOCK:
            return
        if len(header) < 512:
            raise DataError(f"{where} is truncated: a partial tar header at byte {offset}")
        stored = _number(header[148:156], "checksum", where, offset, octal_only=True)
        if stored != sum(header) - sum(header[148:156]) + 256:    # the checksum field counts as spaces
            raise DataError(f"{where} is corrupt: bad tar header checksum at byte {offset}")
        size = _number(header[124:136], "size", where, offset)
        if "size" in pax:
            if not PAX_NUMBER.fullmatch(pax["size"]) or int(pax["size"]) > MAX_MEMBER:
                raise DataError(f"{where} is corrupt: pax header field 'size' {pax['size'][:40]!r} before byte "
                                f"{offset} (expected decimal digits, at most {MAX_MEMBER})")
            size = int(pax["size"])
        kind = header[156:157]
        pad = (-size) % 512
        data = stream.read(size + pad)
        if len(data) < size + pad:
            raise DataError(f"{where} is truncated: the member at byte {offset} ends early")
        if pad:
            data = data[:size]
        offset += 512 + size + pad
        if kind in (b"0", b"\0", b"7"):
            name = header[0:100].split(b"\0", 1)[0]
            if header[257:262] == b"ustar" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name
            yield pax.get("path") or long_name or name.decode("utf-8", "surrogateescape"), data
            long_name, pax = None, {}
        elif kind == b"L":                                        # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind == b"x":                                        # pax header of the next member
            pax = _parse_pax(data, where, offset)
        else:                                                     # directories, links, global pax headers
            long_name, pax = None, {}


PAX_NUMBER = re.compile(r"[0-9]{1,19}")
PAX_RECORD = re.compile(rb"([0-9]{1,10}) ")
OCTAL = re.compile(rb"[0-7]+")


def _number(field, what, where, offset, octal_only=False):
    """A tar header's numeric field by the strict grammar: octal digits padded by spaces or NULs (POSIX), or
    (not for the checksum) GNU base-256, high bit set, positive and at most MAX_MEMBER. Anything else is a
    DataError naming the field and the header's offset."""
    if field[0] & 0x80 and not octal_only:
        if field[0] != 0x80:
            raise DataError(f"{where} is corrupt: negative or oversized base-256 tar field '{what}' at byte {offset}")
        value = int.from_bytes(field[1:], "big")
    else:
        text = field.strip(b" \0")
        if text and not OCTAL.fullmatch(text):
            raise DataError(f"{where} is corrupt: tar header field '{what}' {bytes(field)!r} at byte {offset} is not "
                            f"octal digits")
        value = int(text, 8) if text else (-1 if octal_only else 0)
    if what == "size" and value > MAX_MEMBER:
        raise DataError(f"{where}: tar header field 'size' at byte {offset} declares {value} bytes, over the limit "
                        f"of {MAX_MEMBER} for one member")
    return value


def _parse_pax(data, where, offset):
    """The records `<length> <key>=<value>\\n` of a pax header, by that grammar exactly: the length in ASCII
    decimal digits counts the whole record; a record that does not fit or parse is a DataError."""
    out, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        m = PAX_RECORD.match(data, pos)
        length = int(m.group(1)) if m else 0
        record = data[pos:pos + length]
        if not m or length <= len(m.group(0)) or len(record) < length or record[-1:] != b"\n" \
                or b"=" not in record[len(m.group(0)):]:
            raise DataError(f"{where} is corrupt: bad pax header record at its byte {pos}, before byte {offset} "
                            f"(expected '<length> <key>=<value>\\n')")
        key, _, value = record[len(m.group(0)):-1].partition(b"=")
        if not key:
            raise DataError(f"{where} is corrupt: a pax header record with an empty key before byte {offset}")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_samples(stream, where="tar"):
    """WebDataset samples of a tar stream: (key, {extension: bytes}), grouping consecutive members by key.

    As webdataset does: key = the member path up to the first dot of its file name, extension = the rest
    (lower-cased); members without an extension and `__meta__` files are skipped.
    """
    key, files = None, {}
    for name, data in iter_tar(stream, where):
        base = name.rsplit("/", 1)[-1]
        dot = base.find(".")
        if dot <= 0 or (base.startswith("__") and base.endswith("__")):
            continue
        k, ext = name[:len(name) - len(base) + dot], base[dot + 1:].lower()
        if k != key:
            if files:
                yield key, files
            key, files = k, {}
        if ext in files:
            raise DataError(f"{where}: sample {k} has two '.{ext}' members")
        files[ext] = data
    if files:
        yield key, files


def load_shards(data_cfg, num_workers=0):
    """RealData of a `webdataset` source: data.root = train index JSON, data.test_root = test index JSON."""
    root, test_root, image_size = data_cfg.get("root"), data_cfg.get("test_root"), data_cfg.get("image_size")
    if root is None:
        raise ConfigError("data source 'webdataset' needs 'data.root' (the train index JSON written by "
                          "`ccfs shards`, e.g. shards/train.json)")
    if test_root is None:
        raise ConfigError("data source 'webdataset' needs 'data.test_root' (the test index JSON written by "
                          "`ccfs shards`, e.g. shards/test.json)")
    trust = {"allow_urls": bool(data_cfg.get("allow_urls")), "allow_outside": bool(data_cfg.get("allow_outside")),
             "decode": data_cfg.get("decode", "cpu"), "worker_timeout": data_cfg.get("worker_timeout", WORKER_TIMEOUT_S)}
    train = ShardSplit(root, image_size=image_size, num_workers=num_workers, **trust)
    test = ShardSplit(test_root, image_size=train.shape[1], num_workers=num_workers, **trust)
    for key, split, want in (("data.root", train, "train"), ("data.test_root", test, "test")):
        if split.meta.get("split", want) != want:
            raise DataError(f"{key} {split.index_path} is the {split.meta['split']!r} split (its index says "
                            f"split: {split.meta['split']}), expected the {want} split")
    if os.path.realpath(train.index_path) == os.path.realpath(test.index_path) or (
            train.meta.get("source") and train.meta.get("source") == test.meta.get("source")):
        raise DataError(f"data.test_root {test.index_path} holds the same samples as data.root {train.index_path}; "
                        f"name the test split's index (e.g. test.json)")
    shared = {os.path.realpath(s["url"]) for s in train.shards if not _is_url(s["url"])} & \
        {os.path.realpath(s["url"]) for s in test.shards if not _is_url(s["url"])}
    if shared:
        raise DataError(f"data.test_root {test.index_path} names {len(shared)} shard file(s) of data.root "
                        f"{train.index_path}, e.g. {sorted(shared)[0]}; the test split must hold other samples")
    if test.classes != train.classes or test.shape != train.shape:
        raise DataError(f"{test.index_path} does not match {train.index_path}: {len(test.classes)} vs "
                        f"{len(train.classes)} classes, {test.shape[0]} vs {train.shape[0]} channels; "
                        f"write both splits from the same source")
    mean, std = train.meta.get("mean"), train.meta.get("std")
    if mean is None or std is None or len(mean) != train.shape[0] or len(std) != train.shape[0]:
        raise DataError(f"{train.index_path} has no per-channel mean/std; rewrite the train shards with `ccfs shards`")
    return RealData(train.meta.get("name", "webdataset"), train.classes, train, test,
                    tuple(float(v) for v in mean), tuple(float(v) for v in std))
