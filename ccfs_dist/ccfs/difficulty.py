"""Difficulty scores: which way is harder, and loading score files.

Selection works on *hardness* (larger = harder). Each difficulty method says once, here, whether
its raw score grows with difficulty; `to_hardness` is the only place that flips a score.

Score file formats (indices are the stable global index of the training set):
  .npy  float array of length N. Official forgetting files (CCFS release); method "forgetting".
        A JSON file beside it with the same stem (scores.npy + scores.json) holding at least
        {"method": ...} names the method instead; files this project computes carry one (`ccfs
        scores`). When that JSON also holds "labels_sha256" (see `labels_fingerprint`) and the data's
        labels are given, they must match it: the file was computed on this data set, in this order.
  .npz  keys "scores" and "labels", length N each. Official C-score files; method "cscore".
        When the data's labels are given they must equal the file's labels (same sample order).
        A JSON beside it is honoured the same way.
An explicit `method` argument (config key ccfs.difficulty_file_method) overrides both defaults.
"""
import hashlib
from pathlib import Path

import numpy as np

from ccfs_dist.runtime import io
from ccfs_dist.errors import ConfigError, DataError

HARDER_IS_HIGHER = {
    "forgetting": True,   # forgetting events (Toneva et al.): more events = harder
    "loss": True,         # per-sample training loss (BiLP)
    "el2n": True,         # ||softmax - onehot|| early in training
    "cscore": False,      # consistency score: held-out correctness, higher = easier
    "margin": False,      # true-class logit minus best other logit, higher = easier
    "logits": False,      # filter logit of the true class, higher = easier
}

# The methods `ccfs scores` computes (scores.py); here, beside their directions, so that the plan can
# name them without importing the training code.
DYNAMICS = ("forgetting", "loss", "el2n")          # from training runs; ccfs.difficulty may name these
CHECKPOINT = ("margin", "logits")                  # one scoring pass of a given model
METHODS = DYNAMICS + CHECKPOINT

DEFAULT_METHOD = {".npy": "forgetting", ".npz": "cscore"}


def labels_fingerprint(labels):
    """sha256 (hex) of the labels as little-endian int64: identifies a data set and its sample order."""
    labels = np.ascontiguousarray(np.asarray(labels).reshape(-1), dtype="<i8")
    return hashlib.sha256(labels.tobytes()).hexdigest()


def to_hardness(scores, method):
    """Raw scores of `method` -> float64 hardness, larger = harder."""
    if method not in HARDER_IS_HIGHER:
        raise ConfigError(f"unknown difficulty method {method!r}; known: {', '.join(HARDER_IS_HIGHER)} "
                          f"(config key ccfs.difficulty_file_method)")
    scores = np.asarray(scores, dtype=np.float64)
    return scores.copy() if HARDER_IS_HIGHER[method] else -scores


def load_score_file(path, n, labels=None, method=None, data_name=None):
    """Load and validate a difficulty score file for a training set of `n` samples.

    Returns (scores, method): scores float64 of length n (raw, not yet turned into hardness) and the
    method name: the `method` argument if given, else the JSON beside the file, else the default of
    the file type (.npy forgetting, .npz cscore). Every problem is a DataError naming the file. The arrays'
    headers are checked (at most n elements, sizes the file can hold) before anything is allocated; a
    sidecar that names another data set (`data_name`), another n or other labels is refused.
    """
    path = Path(path)
    if path.exists():
        io.regular_file(path, "score file")
    if not path.is_file():
        raise DataError(f"score file {path} not found; check config key ccfs.difficulty_file "
                        f"(a .npy or .npz path)")
    suffix = path.suffix.lower()
    if suffix not in DEFAULT_METHOD:
        raise DataError(f"score file {path}: unsupported type {path.suffix!r}; expected .npy "
                        f"(forgetting or own scores) or .npz with keys 'scores' and 'labels' (C-score)")

    file_labels = None
    _check_magic(path, suffix)
    if suffix == ".npy":
        scores = io.read_array(path, "score file", max_elements=n, check_shape=lambda s: _check_dims(path, s, n))
    else:
        archive = io.read_arrays(path, "score file", max_elements=n,
                                 check_shape=lambda s, key: key in ("scores", "labels") and _check_dims(path, s, n, key))
        missing = [key for key in ("scores", "labels") if key not in archive]
        if missing:
            raise DataError(f"score file {path}: missing key(s) {missing}; an .npz score file needs "
                            f"'scores' and 'labels' (found {sorted(archive)})")
        scores, file_labels = archive["scores"], archive["labels"]

    _check_shape(path, scores, n, "scores")
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)
            or scores.dtype == np.bool_):
        raise DataError(f"score file {path}: scores must be numbers, got dtype {scores.dtype}")
    scores = scores.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise DataError(f"score file {path}: {len(bad)} scores are NaN or inf "
                        f"(first indices {bad[:10].tolist()}); recompute the scores")

    if file_labels is not None:
        _check_shape(path, file_labels, n, "labels")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
            diff = np.flatnonzero(file_labels != labels)
            if len(diff):
                raise DataError(
                    f"score file {path}: {len(diff)} of {n} labels differ from the data's labels "
                    f"(first mismatching indices {diff[:10].tolist()}); the file belongs to another data "
                    f"set or another sample order")

    meta = _read_sidecar(path)
    for key, ours in (("data", data_name), ("n", n)):
        if meta is not None and ours is not None and meta.get(key) is not None and meta[key] != ours:
            raise DataError(f"score file {path}: its JSON sidecar {path.with_suffix('.json')} records {key} "
                            f"{meta[key]!r:.60} but the data's is {ours!r}; the scores belong to another data "
                            f"set: recompute them (ccfs scores)")
    if meta is not None and labels is not None and meta.get("labels_sha256") is not None:
        got = labels_fingerprint(labels)
        if meta["labels_sha256"] != got:
            raise DataError(
                f"score file {path}: its JSON sidecar {path.with_suffix('.json')} records labels fingerprint "
                f"{str(meta['labels_sha256'])[:12]}... (data set {meta.get('data', '?')!r}, n={meta.get('n', '?')}) "
                f"but the data's labels give {got[:12]}...; the scores were computed on another data set, "
                f"another sample order or other labels: recompute them (ccfs scores)")
    if method is None:
        method = _sidecar_method(path, meta) or DEFAULT_METHOD[suffix]
    if method not in HARDER_IS_HIGHER:
        raise DataError(f"score file {path}: unknown difficulty method {method!r}; known: "
                        f"{', '.join(HARDER_IS_HIGHER)} (set ccfs.difficulty_file_method or the JSON beside the file)")
    return scores, method


def _check_magic(path, suffix):
    """Name the real format of a file whose content does not match its suffix."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        kind = ".npy"
    elif head[:4] == b"PK\x03\x04":
        kind = ".npz"
    elif head[:1] == b"\x80":
        raise DataError(f"score file {path} is a Python pickle; pickled objects are refused (they can run "
                        f"code); save a plain numeric array with np.save")
    else:
        raise DataError(f"score file {path} is neither a numpy .npy file nor an .npz archive")
    if kind != suffix:
        raise DataError(f"score file {path} has the suffix {suffix} but holds an {kind} file; rename it")


def _check_shape(path, array, n, what):
    _check_dims(path, array.shape, n, what)


def _check_dims(path, shape, n, what="scores"):
    """The 1-D, length-n rule on a shape: on the file's header, before its data is read, and on the array."""
    if len(shape) != 1:
        raise DataError(f"score file {path}: {what} must be a 1-D array of length {n}, got shape {tuple(shape)}")
    if shape[0] != n:
        raise DataError(f"score file {path}: wrong length of {what}: expected {n} (one per training "
                        f"sample), got {shape[0]}; the file belongs to another data set")


def _read_sidecar(path):
    """path's JSON sidecar (same stem + .json) as a dict, or None if there is none."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        meta = io.read_json(sidecar, "JSON sidecar")
    except DataError as e:
        raise DataError(f"score file {path}: {e}") from None
    if not isinstance(meta, dict):
        raise DataError(f"score file {path}: its JSON sidecar {sidecar} must hold an object with a "
                        f"string 'method' (one of {', '.join(HARDER_IS_HIGHER)})")
    return meta


def _sidecar_method(path, meta):
    """The method named in the sidecar `meta` of `path`, or None if there is no sidecar."""
    if meta is None:
        return None
    sidecar = path.with_suffix(".json")
    if not isinstance(meta.get("method"), str):
        raise DataError(f"score file {path}: its JSON sidecar {sidecar} must hold an object with a "
                        f"string 'method' (one of {', '.join(HARDER_IS_HIGHER)})")
    return meta["method"]
