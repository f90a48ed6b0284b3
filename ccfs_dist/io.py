"""Atomic artifact writes: write to a temporary name in the same folder, then rename."""
import json
import os
import tempfile
from contextlib import contextmanager

import numpy as np
import torch

from .errors import CCFSError


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; artifacts are shared like ordinary files
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")


def write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def write_npy(path, array):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def write_npz(path, **arrays):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def save_torch(path, obj):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def wait_for(path, seconds=120.0, poll=0.25):
    """Return `path` once it exists. An artifact another node renamed into place just before a barrier can
    show up late on a shared file system (NFS caches directory lookups for up to a minute); a file still
    missing after `seconds` is a RuntimeError naming it."""
    import time
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {seconds:.0f} s after the rank that writes it "
                               f"finished; is the run directory on storage every node sees?")
        time.sleep(poll)
    return path


def check_writable_folder(path, what, file=False):
    """Raise CCFSError (naming `what`, e.g. '--out', and the path) unless `path` is, or can be created as,
    a folder this process can write in (`file`: unless a file can be written at `path`): checked before any
    work, so that a bad location costs nothing. Returns the absolute path."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    probe = os.path.dirname(path) if file else path
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "is a file, not a folder" if probe == path else f"lies below the file '{probe}'"
        raise CCFSError(f"{what} '{path}' {where}; choose a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "is on a read-only file system" if read_only else "is not writable by this user"
        raise CCFSError(f"{what} '{path}': '{probe}' {why}; choose another location")
    return path
