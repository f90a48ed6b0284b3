"""`data.download: true`: fetch the CIFAR-10/100 python archive into data.root, checked and extracted safely.

    ensure(source, root) -> root        (a no-op where the extracted folder is already there)

`root` is data.root: the folder that holds (or will hold) the release folder, or the release folder itself
(`data/cifar-10-batches-py`, as the paper configs name it), which is then filled through its parent.

The archive is streamed to a temporary file beside its final place while its MD5 (the digest the CIFAR
page and torchvision publish) is computed; a wrong digest or a short read deletes it and fails with one
`error:` line. Extraction accepts only regular files under the archive's one folder (no links, devices,
absolute names or `..`), writes into a temporary folder and renames that into place, so a killed download
leaves no half folder that a later run would take for the data set. Several ranks may call it at once
(one per node: the other ranks of a node wait, at most PEER_WAIT_S, for the folder to appear); on a shared
file system every node's first rank works in its own temporary names and the first rename wins.
"""
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from typing import NamedTuple

from ccfs_dist.errors import ConfigError, DataError


class Archive(NamedTuple):
    url: str
    md5: str
    folder: str        # the folder the archive holds
    size: int          # bytes, for the message before the download


ARCHIVES = {
    "cifar10": Archive("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                       "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py", 170_498_071),
    "cifar100": Archive("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                        "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python", 169_001_437),
}
READ_TIMEOUT_S = 60        # a connection that delivers nothing for this long fails the download
PEER_WAIT_S = 3600         # the other ranks of a node wait this long for its first rank's download
CHUNK = 1 << 20


def ensure(source, root):
    """Download and extract `source`'s archive into `root` unless `root/<folder>` exists; returns `root`."""
    if source not in ARCHIVES:
        raise ConfigError(f"data.download applies to cifar10 and cifar100, not data.source={source!r} "
                          f"(see docs/data.md for where to get it)")
    archive = ARCHIVES[source]
    if os.path.basename(os.path.normpath(root)) == archive.folder:
        # data.root names the release folder itself (as the paper configs do): the archive holds that folder,
        # so it is extracted into the parent, and a folder already there (unpacked by hand) is used as it is
        ensure(source, os.path.dirname(os.path.normpath(root)) or ".")
        return root
    if os.path.isdir(os.path.join(root, archive.folder)):
        return root
    if os.environ.get("LOCAL_RANK", "0") not in ("", "0"):
        from ccfs_dist.runtime.io import wait_for
        wait_for(os.path.join(root, archive.folder), seconds=PEER_WAIT_S)
        return root
    os.makedirs(root, exist_ok=True)
    print(f"data.download: fetching {archive.url} ({archive.size / 1e6:.0f} MB) into {root}", flush=True)
    fd, tmp = tempfile.mkstemp(prefix=".ccfs-download-", dir=root)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _fetch(archive.url, out)
        if digest != archive.md5:
            raise DataError(f"data.download: {archive.url} has MD5 {digest}, expected {archive.md5} "
                            f"(a changed or damaged archive; nothing was extracted)")
        _extract(tmp, root, archive.folder)
    finally:
        os.unlink(tmp)
    return root


def _fetch(url, out):
    """Copy `url` into the open file `out`; return the MD5 hex digest of what was read."""
    md5 = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=READ_TIMEOUT_S) as response:
            expected = response.headers.get("Content-Length")
            read = 0
            while chunk := response.read(CHUNK):
                md5.update(chunk)
                out.write(chunk)
                read += len(chunk)
    except (OSError, ValueError) as e:     # URLError, timeouts and resets are OSErrors
        raise DataError(f"data.download: cannot fetch {url}: {e}; download it by hand and set data.root "
                        f"to the folder you extract it in") from None
    if expected is not None and expected.isascii() and expected.isdigit() and int(expected) != read:
        raise DataError(f"data.download: {url} ended after {read} of {expected} bytes; try again")
    return md5.hexdigest()


def _extract(path, root, folder):
    """Extract the archive at `path` (its members all under `folder/`) into `root/folder`, atomically."""
    staging = tempfile.mkdtemp(prefix=".ccfs-extract-", dir=root)
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                parts = m.name.split("/")
                if (m.name.startswith("/") or ".." in parts or parts[0] != folder
                        or not (m.isfile() or m.isdir())):
                    raise DataError(f"data.download: the archive holds {m.name!r}, not a file or folder under "
                                    f"{folder}/ (refused; nothing was extracted)")
            # the checks above already refuse what the "data" filter would; it is a second guard where it exists
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(staging, members=members, **kw)
        try:
            os.rename(os.path.join(staging, folder), os.path.join(root, folder))
        except OSError:
            if not os.path.isdir(os.path.join(root, folder)):   # another rank's rename won: theirs stays
                raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"data.download: cannot extract {path}: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
