"""Atomic artifact writes (write to a temporary name in the same folder, then rename), bounded readers of
JSON / YAML / .npy / .npz (limits checked before anything is allocated), and the ownership check: no output
of a command is, contains or lies inside one of its inputs."""
import json
import os
import re
import stat
import tempfile
import zipfile
from contextlib import contextmanager

import numpy as np
import torch

from ccfs_dist.config import MAX_DEPTH, MAX_YAML_BYTES      # nesting of JSON / YAML; the size of a YAML config
from ccfs_dist.errors import CCFSError, DataError

# stated limits of the readers (docs/safety.md): a file beyond them is refused before it is parsed
MAX_JSON_BYTES = 512 << 20     # an ImageNet-21k shard index is ~100 MB
MAX_ZIP_RATIO = 1100           # deflate expands at most ~1032:1; a member that claims more is a bomb


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


def resolved(path):
    """`path` with `~` expanded and every symlink resolved (also below a part that does not exist yet)."""
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def _within(inner, outer):
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_outputs(outputs, inputs):
    """The ownership rule of every command, checked before it writes its first byte: an output path (what,
    path) that is, contains or lies inside an input path (what, path), both resolved through symlinks, is a
    CCFSError naming both; so that no `--out` or `--overwrite` can replace, delete or add to the user's data.
    Inputs that are None are skipped."""
    ins = [(what, p, resolved(p)) for what, p in inputs if p is not None]
    for out_what, out in outputs:
        o = resolved(out)
        for in_what, given, i in ins:
            if o == i:
                how = "is"
            elif _within(o, i):
                how = "lies inside"
            elif _within(i, o):
                how = "contains"
            else:
                continue
            shown = f"'{out}'" + (f" (= '{o}')" if o != os.path.abspath(os.path.expanduser(os.fspath(out))) else "")
            raise CCFSError(f"{out_what} {shown} {how} {in_what} '{given}', an input of this command; outputs "
                            f"never overlap inputs: choose another {out_what.split()[0]}")


def regular_file(path, what="file"):
    """`path` if it is a regular file (symlinks followed): a FIFO, device or socket would block or never end
    when opened, so it is refused from `stat`, before `open`; a DataError naming the file and `what`."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}" + (" (a broken symlink)" if os.path.islink(path) else "")) \
            from None
    except OSError as exc:
        raise DataError(f"{what} {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
            else "not a regular file"
        raise DataError(f"{what} {path} is {kind}, not a regular file; refused")
    return path


def _read_bounded(path, limit, what):
    """The bytes of the regular file `path`, refused (DataError) past `limit` bytes before reading them."""
    regular_file(path, what)
    size = os.path.getsize(path)
    if size > limit:
        raise DataError(f"{what} {path} is {size} bytes, over the limit of {limit} for this kind of file")
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as exc:
        raise DataError(f"{what} {path} cannot be read: {exc.strerror}") from None


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(data, chunk=1 << 24):
    """The deepest nesting of brackets in JSON text `data` (bytes), strings skipped: linear, no recursion,
    in chunks (a running depth carried over) so that a large index needs little extra memory."""
    bare = np.frombuffer(_JSON_STRING.sub(b"", data), dtype=np.uint8)
    depth = deepest = 0
    for start in range(0, len(bare), chunk):
        part = bare[start:start + chunk]
        step = ((part == ord("[")) | (part == ord("{"))).astype(np.int64) - ((part == ord("]")) | (part == ord("}")))
        running = np.cumsum(step) + depth
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
    return deepest


class Record(dict):
    """A JSON object or an .npz archive read from a file: a key it lacks is a DataError naming the file (a run
    artifact or an index written by another version, or edited), not a KeyError traceback."""
    where = "a file"

    def __missing__(self, key):
        raise DataError(f"{self.where} has no {key!r} entry: it was written by another version of ccfs or "
                        f"edited; rewrite it (a run: --overwrite)")


def record(mapping, where):
    out = Record(mapping)
    out.where = where
    return out


def loads_json(data, where, limit=MAX_JSON_BYTES):
    """JSON text `data` (bytes or str) parsed after its size and depth passed the stated limits; a DataError
    naming `where` on a limit or a syntax error (also a truncated file)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if len(data) > limit:
        raise DataError(f"{where} is {len(data)} bytes, over the limit of {limit}")
    depth = json_depth(data)
    if depth > MAX_DEPTH:
        raise DataError(f"{where} nests {depth} levels deep, over the limit of {MAX_DEPTH}; refused")
    try:
        return json.loads(data, object_hook=lambda obj: record(obj, where))
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{where} is not valid JSON: {exc}") from None


def read_json(path, what="JSON file", limit=MAX_JSON_BYTES):
    """The JSON document in the regular file `path` within the size and depth limits, else a DataError."""
    return loads_json(_read_bounded(path, limit, what), f"{what} {path}", limit)


def read_yaml_bounded(path, what="YAML file", limit=MAX_YAML_BYTES):
    """The YAML document (safe tags only) in the regular file `path`, within size and depth limits; DataError
    naming the file otherwise. Not UTF-8, a syntax error or nesting deeper than MAX_DEPTH: refused."""
    from ccfs_dist.config import load_yaml
    data = _read_bounded(path, limit, what)
    try:
        return load_yaml(data.decode("utf-8"), f"{what} {path}")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None


def _array_header(f, where):
    """(shape, dtype, header end offset) of the .npy stream `f`, read without its data."""
    from numpy.lib import format as npformat
    try:
        version = npformat.read_magic(f)
        shape, fortran, dtype = (npformat.read_array_header_1_0(f) if version == (1, 0)
                                 else npformat.read_array_header_2_0(f) if version == (2, 0)
                                 else npformat._read_array_header(f, version))
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, SyntaxError, EOFError, ...
        raise DataError(f"{where} is not a valid .npy array: {exc}") from None
    if dtype.hasobject:
        raise DataError(f"{where} holds an object array of pickled Python objects (they can run code); refused")
    return shape, dtype, f.tell()


def _declared_bytes(shape, dtype, where, max_elements):
    count = 1
    for d in shape:
        count *= int(d)
    if max_elements is not None and count > max_elements:
        raise DataError(f"{where}: its header declares shape {tuple(shape)} ({count} elements), more than the "
                        f"{max_elements} expected; refused")
    return count * dtype.itemsize


def read_array(path, what="array file", max_elements=None, check_shape=None):
    """The .npy array at `path` after its header was checked against the file's real size (and the element
    count against `max_elements`, the shape by `check_shape(shape)`): a short or lying file is a DataError
    naming it, never an allocation."""
    path = os.fspath(path)
    regular_file(path, what)
    where = f"{what} {path}"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        shape, dtype, offset = _array_header(f, where)
    if check_shape is not None:
        check_shape(shape)
    need = _declared_bytes(shape, dtype, where, max_elements)
    if offset + need != size:
        raise DataError(f"{where}: its header declares shape {tuple(shape)} of {dtype} ({need} bytes) but the "
                        f"file holds {size - offset} bytes of data; truncated or corrupt")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read {where}: {exc}") from None


def read_arrays(path, what="array archive", max_elements=None, check_shape=None):
    """{name: array} of the .npz archive at `path`, every member's header checked against the member's
    size first (and a compressed member's size against its compressed size; its shape by
    `check_shape(shape, name)`), so nothing is allocated that the file cannot hold; a DataError naming the
    file and the member otherwise."""
    path = os.fspath(path)
    regular_file(path, what)
    where = f"{what} {path}"
    out = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                member = f"{where}, member {info.filename}"
                if not info.filename.endswith(".npy") or info.is_dir():
                    raise DataError(f"{member} is not a .npy array (numpy would hand its raw bytes on); refused")
                ratio = info.file_size / max(info.compress_size, 1)
                if (info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size) or \
                        (ratio > MAX_ZIP_RATIO and info.file_size > (1 << 20)):
                    raise DataError(f"{member}: declares {info.file_size} bytes from {info.compress_size} "
                                    f"stored; corrupt or a decompression bomb, refused")
                with archive.open(info) as f:
                    shape, dtype, offset = _array_header(f, member)
                    if check_shape is not None:
                        check_shape(shape, info.filename[:-len(".npy")])
                    need = _declared_bytes(shape, dtype, member, max_elements)
                    if offset + need != info.file_size:
                        raise DataError(f"{member}: its header declares shape {tuple(shape)} of {dtype} "
                                        f"({need} bytes) but the member holds {info.file_size - offset}")
            with np.load(path, allow_pickle=False) as f:
                for key in f.files:
                    out[key] = f[key]
            out = record(out, where)
    except CCFSError:
        raise
    except Exception as exc:  # noqa: BLE001 - BadZipFile, ValueError, OSError, ...
        raise DataError(f"cannot read {where}: {exc}") from None
    return out


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
