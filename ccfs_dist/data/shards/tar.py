"""The shards' tar codec: `write_tar` writes a ustar file, `iter_tar` / `iter_samples` read one.

One tar member pair per sample: `<key>.cls` (the class label as decimal text) and `<key>.<ext>` (the image
bytes as stored: files are copied byte for byte, in-memory sources are encoded as lossless PNG), where
key = the global index, zero-padded, without dots. The same input gives byte-identical shards (fixed tar
metadata, sorted order); every file is written under a temporary name and renamed.

The tar code is our own (`write_tar`, `iter_tar`), not Python's tarfile or webdataset's (which
reads through tarfile), for three measured reasons (BENCHMARKS.md, "Tar: tarfile or our own",
`python launch/bench_tar.py`): tarfile's ustar headers differ from the shards already written (it leaves
a regular file's devmajor/devminor empty and pads the archive to a 10,240-byte record), so the same
input would no longer give the same bytes; tarfile's stream mode, the one a pipe or URL allows, ends
silently at a corrupt header after the first, where `iter_tar` names the byte; and it reads a shard
several times slower, in the loop that bounds a loader worker's samples per second.
"""
import hashlib
import os
import re

from ccfs_dist.errors import DataError

TAR_MTIME = 0                 # fixed tar metadata: the same input gives byte-identical shards
READ_BUFFER = 1 << 20
KEY_RE = re.compile(rb"[0-9]{1,18}")                     # a sample key / .cls label: ASCII digits only, never isdigit
MAX_MEMBER = 1 << 30          # stated limit of one tar member (an image, a label, a pax header): 1 GiB


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
