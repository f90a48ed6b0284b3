"""data.download: a CIFAR archive fetched from a server on the loopback, MD5-checked, extracted safely."""
import hashlib
import http.server
import io
import os
import tarfile
import threading

import numpy as np
import pytest

from ccfs_dist.data import download
from ccfs_dist.errors import DataError
from ccfs_dist.data.sources import load_real
from test_data import cfg, make_cifar10


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(www), **kw)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def publish(monkeypatch, www, base, archive_bytes, md5=None):
    (www / "cifar-10-python.tar.gz").write_bytes(archive_bytes)
    monkeypatch.setitem(download.ARCHIVES, "cifar10", download.Archive(
        f"{base}/cifar-10-python.tar.gz", md5 or hashlib.md5(archive_bytes).hexdigest(), "cifar-10-batches-py",
        len(archive_bytes)))


def cifar_archive(tmp_path, extra=None):
    """The release's layout: one folder cifar-10-batches-py/ with the pickles; `extra(tar)` adds members."""
    src = tmp_path / "src" / "cifar-10-batches-py"
    batches, test = make_cifar10(str(src), np.random.default_rng(0))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
        if extra:
            extra(tar)
    return buf.getvalue(), batches


def test_download_fetches_checks_and_extracts_then_loads(tmp_path, server, monkeypatch):
    www, base = server
    archive, batches = cifar_archive(tmp_path)
    publish(monkeypatch, www, base, archive)
    root = tmp_path / "data"                       # does not exist yet
    data = load_real(dict(cfg("cifar10", root), download=True))
    expected = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
    assert np.array_equal(data.train.images.numpy(), expected)
    assert sorted(os.listdir(root)) == ["cifar-10-batches-py"]        # no temporary file or folder left
    (www / "cifar-10-python.tar.gz").unlink()      # a second run finds the folder and fetches nothing
    assert load_real(dict(cfg("cifar10", root), download=True)).train.labels.tolist() == data.train.labels.tolist()


def test_wrong_md5_extracts_nothing(tmp_path, server, monkeypatch):
    www, base = server
    archive, _ = cifar_archive(tmp_path)
    publish(monkeypatch, www, base, archive, md5="0" * 32)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="MD5"):
        load_real(dict(cfg("cifar10", root), download=True))
    assert os.listdir(root) == []


def test_archive_with_a_link_or_a_path_outside_is_refused(tmp_path, server, monkeypatch):
    www, base = server

    def link(tar):
        info = tarfile.TarInfo("cifar-10-batches-py/evil")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)

    def outside(tar):
        info = tarfile.TarInfo("cifar-10-batches-py/../../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))

    for extra in (link, outside):
        archive, _ = cifar_archive(tmp_path / extra.__name__, extra)
        publish(monkeypatch, www, base, archive)
        root = tmp_path / extra.__name__ / "data"
        with pytest.raises(DataError, match="refused"):
            load_real(dict(cfg("cifar10", root), download=True))
        assert os.listdir(root) == [] and not (tmp_path / "escaped").exists()


def test_unreachable_server_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(download.ARCHIVES, "cifar10", download.Archive(
        "http://127.0.0.1:9/none.tar.gz", "0" * 32, "cifar-10-batches-py", 1))
    with pytest.raises(DataError, match="cannot fetch .* download it by hand"):
        load_real(dict(cfg("cifar10", tmp_path / "data"), download=True))


def test_download_of_a_source_without_an_archive_is_a_config_error(tmp_path):
    from ccfs_dist.errors import ConfigError
    with pytest.raises(ConfigError, match="applies to cifar10 and cifar100"):
        load_real(dict(cfg("imagefolder", tmp_path), download=True))


def test_missing_cifar_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="data.download=true"):
        load_real(cfg("cifar10", tmp_path / "absent"))


def test_root_naming_the_release_folder_downloads_beside_it_and_keeps_a_hand_unpacked_copy(tmp_path, server,
                                                                                           monkeypatch):
    """The paper configs set data.root to the release folder itself (data/cifar-10-batches-py): the archive is
    extracted into its parent, not into data/cifar-10-batches-py/cifar-10-batches-py, and a folder unpacked
    there by hand is used as it is, without a download."""
    www, base = server
    archive, batches = cifar_archive(tmp_path)
    publish(monkeypatch, www, base, archive)
    root = tmp_path / "data" / "cifar-10-batches-py"
    data = load_real(dict(cfg("cifar10", root), download=True))
    assert sorted(os.listdir(tmp_path / "data")) == ["cifar-10-batches-py"]
    assert "data_batch_1" in os.listdir(root)
    assert data.train.labels.tolist() == [l for b in batches for l in b[1]]
    by_hand = tmp_path / "by_hand" / "cifar-10-batches-py"
    make_cifar10(str(by_hand), np.random.default_rng(1))
    (www / "cifar-10-python.tar.gz").unlink()           # a fetch would now fail
    assert load_real(dict(cfg("cifar10", by_hand), download=True)).train.images.shape[0] == 10
    assert sorted(os.listdir(by_hand.parent)) == ["cifar-10-batches-py"]
