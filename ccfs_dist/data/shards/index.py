"""The shard index (`<split>.json`, written by `ccfs shards`) and its trust checks.

The index holds what selection needs without reading an image: the sample count, class names, every label,
the image shape, mean/std, a fingerprint of the source, and per shard its file (relative to the JSON's
folder), first index, sample count, byte size and sha256. Shards are `<split>-NNNNNN.tar`, each holding a
contiguous run of global indices. An index may come from anywhere, so its `file` entries are a trust boundary
(docs/safety.md): a URL or `pipe:` command (which webdataset would open or run) is refused unless
data.allow_urls, and an absolute path or one climbing out of the index's folder unless data.allow_outside.
A shard is opened where its entry says (`open_shard`) and its bytes are hashed on the way (`HashingReader`):
a shard whose sha256 or size differs from its entry is a DataError. `--overwrite` replaces only files the
writer made (`refuse_foreign`).
"""
import hashlib
import json
import math
import os
import re

import numpy as np

from ccfs_dist.runtime import io as ccfs_io
from ccfs_dist.config import MAX_SIDE      # stated limit of an image side (index shape, data.image_size)
from ccfs_dist.errors import CCFSError, DataError
from ccfs_dist.data.shards.tar import READ_BUFFER

FORMAT = "ccfs-shards/1"
PROGRESS_FORMAT = "ccfs-shards-progress/1"   # <out>/<split>.progress.json of an unfinished write
SHARD_RE = re.compile(r"^(train|test)-\d{6}\.tar$")
URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")     # pipe:, http:, s3:, file:, ... (not a one-letter drive)


def shard_name(split, i):
    return f"{split}-{i:06d}.tar"


def key_width(n):
    """Digits of the zero-padded sample key: at least 8 (room for 100 M samples)."""
    return max(8, len(str(max(n - 1, 0))))


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


def read_manifest(path):
    return _read_own(path, "shard progress manifest", PROGRESS_FORMAT, "it is not replaced")



def refuse_foreign(out_dir, split, index_path):
    """--overwrite replaces only shards this writer made: an existing `<split>.json` must be a ccfs shard
    index (its format), and `<split>-NNNNNN.tar` files may exist only beside such an index or the progress
    manifest of an unfinished write (_Manifest)."""
    if os.path.lexists(index_path):
        _read_own(index_path, "shard index", FORMAT, "--overwrite does not replace it")
    elif os.path.lexists(os.path.join(out_dir, f"{split}.progress.json")):
        read_manifest(os.path.join(out_dir, f"{split}.progress.json"))     # an unfinished write of ours
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
    from ccfs_dist.runtime.io import atomic_path
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(index, f, separators=(",", ":"))
            f.write("\n")


def is_url(path):
    return bool(URL_RE.match(path))


def shard_location(index_path, file, allow_urls=False, allow_outside=False):
    """Where the index at `index_path` says a shard is: a path, or a URL / `pipe:` command when allowed.

    Refused (DataError naming the index and the entry): URLs and `pipe:` commands unless `allow_urls`
    (webdataset opens URLs through shell commands: `pipe:cmd` runs cmd), absolute paths and paths that
    climb out of the index's folder unless `allow_outside`."""
    if "\0" in file:
        raise DataError(f"shard index {index_path}: shard file {file!r} holds a NUL byte")
    if is_url(file):
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
    return [path] + [s["url"] for s in shards if not is_url(s["url"])]


def check_shard_files(index_path, shards):
    """The local files of `shards` (read_index's list for the index at `index_path`): present, regular
    files, of the byte size their entries record; a DataError naming the missing or changed ones."""
    missing, wrong = [], []
    for s in shards:
        if is_url(s["url"]):
            continue
        if not os.path.exists(s["url"]):
            missing.append(s["url"])
            continue
        ccfs_io.regular_file(s["url"], f"shard (listed in {index_path})")
        size = os.path.getsize(s["url"])
        if "bytes" in s and size != s["bytes"]:
            wrong.append(f"shard {s['url']} is truncated or was replaced: {size} bytes, "
                         f"its index says {s['bytes']}")
    if missing:
        raise DataError(f"{len(missing)} shard file(s) listed in {index_path} are missing: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if wrong:
        raise DataError(f"{'; '.join(wrong[:3])}{f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''} "
                        f"(index {index_path}; rewrite the shards with `ccfs shards`)")


def open_shard(url, where):
    """A binary stream of the shard at `url` (a path, or a URL / command shard_location let through)."""
    try:
        if is_url(url):
            from webdataset.gopen import gopen   # pipe:, http(s):, s3 via pipe: ... as webdataset opens them
            return gopen(url)
        return open(ccfs_io.regular_file(url, "shard"), "rb", buffering=READ_BUFFER)
    except Exception as e:
        raise DataError(f"cannot open {where}: {e}") from e


class HashingReader:
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
