"""Writing (`ccfs shards`): any source as WebDataset shards plus their index.

    write_shards(data_cfg, out_dir, split="train", per_shard=2000)   -> index dict, written to out_dir/<split>.json

The shards are written by a pool of processes (each reads the source and writes whole shards, shard_tar);
a killed write resumes from its progress manifest (`<split>.progress.json`, _Manifest), and the result is
byte-identical to an uninterrupted write. The index format and its checks: shard_index.
"""
import hashlib
import io
import json
import multiprocessing
import os
import signal

import numpy as np
from PIL import Image

from ccfs_dist.runtime import progress
from ccfs_dist.runtime.dist import die_with_parent
from ccfs_dist.errors import CCFSError, ConfigError, DataError
from ccfs_dist.data.folders import image_files
from ccfs_dist.data.images import decode_image, encode_png, is_jpeg, resize_shorter, square_side
from ccfs_dist.data.memory import TINY_MEAN, TINY_STD, load_source, set_normalisation, source_root
from ccfs_dist.data.shards.index import (FORMAT, PROGRESS_FORMAT, SHARD_RE, key_width, read_manifest, refuse_foreign,
                                         remove_leftovers, shard_name, write_index)
from ccfs_dist.data.shards.loader import start_context
from ccfs_dist.data.shards.tar import READ_BUFFER, write_tar

RESIZE_JPEG_QUALITY = 95      # `ccfs shards --resize`: default JPEG quality of the re-encoded JPEGs (4:4:4 chroma)


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
    return _Source(real.name, split, list(real.classes), part.labels.numpy(), part.shape, *real.norm,
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
    refuse_foreign(out_dir, split, index_path)
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
            prior = read_manifest(self.path)
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
