"""WebDataset shards: writer (determinism, bytes as stored, index), ShardPool (fetch, streaming scorer equal to
the in-memory one over 1/2 processes and 0/2/3 loader workers, uneven layouts), errors, and a whole CCFS run."""
import hashlib
import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccfs_dist import cli
from ccfs_dist.data.shards import writer as shard_writer
from ccfs_dist.data.sources import load_real
from ccfs_dist.errors import ConfigError, DataError
from ccfs_dist.data.shards.reader import ShardPool, load_shards
from ccfs_dist.data.shards.tar import iter_samples
from ccfs_dist.data.shards.writer import write_shards

from conftest import ROOT, worker_main_in_process
from test_bad_input import swap_images
from test_run import SCRIPT, TINY, check_artifacts

WORKER = os.path.join(ROOT, "tests", "workers", "shard_score_worker.py")
FETCH_WORKER = os.path.join(ROOT, "tests", "workers", "shard_fetch_worker.py")
DIGITS = {"source": "digits", "root": None, "image_size": None, "distilled": None}
CPU = torch.device("cpu")


def write_cifar10(folder, per_batch=30, test=40, seed=0):
    """A tiny CIFAR-10 python-pickle set: data_batch_1..5, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder)

    def batch(name, n, offset):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": [(offset + i) % 10 for i in range(n)]}, f)
    for i in range(1, 6):
        batch(f"data_batch_{i}", per_batch, i)
    batch("test_batch", test, 0)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)


def write_image_folder(root, seed=0):
    """train/ and val/ with 3 classes: 12x12 RGB PNGs, plus a 16x14 PNG, a grey PNG and a JPEG per split."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for split, per_class in (("train", 6), ("val", 2)):
        for c in ("cat", "dog", "fox"):
            d = os.path.join(root, split, c)
            os.makedirs(d)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(d, f"{i}.png"))
        wide = rng.integers(0, 256, (14, 16, 3), dtype=np.uint8)
        Image.fromarray(wide).save(os.path.join(root, split, "dog", "wide.png"))
        grey = rng.integers(0, 256, (12, 12), dtype=np.uint8)
        Image.fromarray(grey).save(os.path.join(root, split, "fox", "grey.png"))
        path = os.path.join(root, split, "cat", "photo.jpg")
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path, quality=90)
        jpegs.append(path)
    return jpegs


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    p = {"base": base}
    # digits through the CLI: 5 shards of up to 300 (train) and 2 (test)
    p["digits5"] = str(base / "digits5")
    assert cli.main(["shards", "--out", p["digits5"], "--per-shard", "300", "data.source=digits"]) == 0
    p["digits1"] = str(base / "digits1")
    write_shards(DIGITS, p["digits1"], "train", per_shard=5000, log=lambda m: None)
    write_cifar10(str(base / "cifar"))
    p["cifar_cfg"] = {"source": "cifar10", "root": str(base / "cifar"), "image_size": None, "distilled": None}
    p["cifar"] = str(base / "cifar_shards")
    for split in ("train", "test"):
        write_shards(p["cifar_cfg"], p["cifar"], split, per_shard=64, workers=1, log=lambda m: None)
    p["jpegs"] = write_image_folder(str(base / "folder"))
    p["folder_cfg"] = {"source": "imagefolder", "root": str(base / "folder"), "image_size": 12, "distilled": None}
    p["folder"] = str(base / "folder_shards")
    for split in ("train", "test"):
        write_shards(p["folder_cfg"], p["folder"], split, per_shard=7, workers=1, log=lambda m: None)
    return p


def shard_cfg(folder, **extra):
    return dict({"source": "webdataset", "root": os.path.join(folder, "train.json"),
                 "test_root": os.path.join(folder, "test.json"), "image_size": None, "distilled": None}, **extra)


# ------------------------------------------------------------------------------------------- writer

def test_index_describes_the_shards(pools):
    index = json.load(open(os.path.join(pools["digits5"], "train.json")))
    assert index["num_samples"] == 1437 and index["shape"] == [1, 8, 8]
    assert index["classes"] == [str(c) for c in range(10)]
    assert [(s["file"], s["first"], s["count"]) for s in index["shards"]] == [
        (f"train-{i:06d}.tar", 300 * i, min(300, 1437 - 300 * i)) for i in range(5)]
    memory = load_real(DIGITS)
    assert index["labels"] == memory.train.labels.tolist() and tuple(index["mean"]) == memory.norm.mean
    assert index["source"]["fingerprint"].startswith("sha256:")
    names = [m.name for m in tarfile.open(os.path.join(pools["digits5"], "train-000001.tar")).getmembers()]
    assert names[:4] == ["00000300.cls", "00000300.png", "00000301.cls", "00000301.png"] and len(names) == 600
    # image folder: mean/std measured over the (resized) train images, as the in-memory loader does
    folder = json.load(open(os.path.join(pools["folder"], "train.json")))
    np.testing.assert_allclose(folder["mean"], load_real(pools["folder_cfg"]).norm.mean, rtol=1e-9)


def test_same_input_gives_byte_identical_shards(pools, tmp_path):
    write_shards(DIGITS, tmp_path / "a", "train", per_shard=300, workers=1, log=lambda m: None)
    write_shards(DIGITS, tmp_path / "b", "train", per_shard=300, workers=2, log=lambda m: None)
    for name in sorted(os.listdir(pools["digits5"])):
        if name.startswith("train"):
            ref = open(os.path.join(pools["digits5"], name), "rb").read()
            assert open(tmp_path / "a" / name, "rb").read() == ref, name
            assert open(tmp_path / "b" / name, "rb").read() == ref, name
    assert not [n for n in os.listdir(tmp_path / "a") if n.startswith(".")]      # no temporary files left
    # a changed source changes the fingerprint; --overwrite replaces and drops stale shards
    with pytest.raises(Exception, match="already exists"):
        write_shards(DIGITS, tmp_path / "a", "train", per_shard=300, log=lambda m: None)
    write_shards(DIGITS, tmp_path / "a", "train", per_shard=1000, overwrite=True, log=lambda m: None)
    tars = sorted(n for n in os.listdir(tmp_path / "a") if n.endswith(".tar"))
    assert tars == ["train-000000.tar", "train-000001.tar"]
    write_cifar10(str(tmp_path / "c2"), seed=1)
    other = write_shards(dict(pools["cifar_cfg"], root=str(tmp_path / "c2")), tmp_path / "c2s", "train",
                         per_shard=64, log=lambda m: None)
    ref = json.load(open(os.path.join(pools["cifar"], "train.json")))
    assert other["source"]["fingerprint"] != ref["source"]["fingerprint"]


def test_image_files_are_stored_byte_for_byte(pools):
    index = json.load(open(os.path.join(pools["folder"], "train.json")))
    stored = {}
    for s in index["shards"]:
        with open(os.path.join(pools["folder"], s["file"]), "rb") as f:
            stored.update(iter_samples(f))
    jpeg = pools["jpegs"][0]                                  # train/cat/photo.jpg: the last cat file
    key = f"{index['labels'].index(1) - 1:08d}"
    assert set(stored[key]) == {"cls", "jpg"} and stored[key]["jpg"] == open(jpeg, "rb").read()
    assert stored[key]["jpg"][:2] == b"\xff\xd8" and stored[key]["cls"] == b"0"
    assert sum("png" in v for v in stored.values()) == len(stored) - 1


def test_shards_interoperate_with_webdataset(pools, tmp_path):
    import webdataset as wds
    urls = [os.path.join(pools["digits5"], f"train-{i:06d}.tar") for i in range(5)]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert keys == [f"{i:08d}" for i in range(1437)]
    with wds.TarWriter(str(tmp_path / "w.tar")) as sink:               # and tars webdataset writes read here
        for i in range(3):
            sink.write({"__key__": f"{i:08d}", "cls": str(i).encode(), "png": b"x" * (100 + i)})
    with open(tmp_path / "w.tar", "rb") as f:
        got = list(iter_samples(f))
    assert [k for k, _ in got] == ["00000000", "00000001", "00000002"] and got[2][1]["png"] == b"x" * 102


def test_own_tar_writer_is_ustar_with_fixed_metadata(tmp_path):
    """write_tar (kept instead of tarfile: BENCHMARKS.md) writes what tarfile reads as plain ustar members
    with one mode, owner and mtime, ending after the two zero blocks."""
    from ccfs_dist.data.shards.tar import TAR_MTIME, write_tar
    samples = [("00000007", {"png": b"\x89PNG" + bytes(700), "cls": b"3"}), ("00000008", {"cls": b"0", "jpg": b""})]
    size, sha = write_tar(tmp_path / "t.tar", samples)
    raw = (tmp_path / "t.tar").read_bytes()
    assert size == len(raw) == 512 * (4 + 1 + 2 + 1) + 1024 and raw[-1024:] == bytes(1024)   # headers, data, end
    assert sha == hashlib.sha256(raw).hexdigest()
    with tarfile.open(tmp_path / "t.tar", format=tarfile.USTAR_FORMAT) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["00000007.cls", "00000007.png", "00000008.cls", "00000008.jpg"]
        assert {(m.type, m.mode, m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {
            (tarfile.REGTYPE, 0o444, 0, 0, "", "", TAR_MTIME)}
        assert tar.extractfile(members[1]).read() == samples[0][1]["png"] and members[3].size == 0
    with open(tmp_path / "t.tar", "rb") as f:
        assert list(iter_samples(f)) == [(k, dict(sorted(v.items()))) for k, v in samples]


# ------------------------------------------------------------------------------------------- reading

@pytest.mark.parametrize("name", ["digits5", "cifar", "folder", "folder@10px"])
def test_fetch_returns_the_in_memory_images(pools, name):
    if name == "folder@10px":      # data.image_size re-reads the stored originals at another size
        memory = load_real(dict(pools["folder_cfg"], image_size=10))
        data = load_shards(shard_cfg(pools["folder"], image_size=10))
    else:
        memory = load_real({"digits5": DIGITS, "cifar": pools["cifar_cfg"], "folder": pools["folder_cfg"]}[name])
        data = load_shards(shard_cfg(pools[name]), num_workers=2 if name == "digits5" else 0)
    assert data.classes == memory.classes and data.train.shape == memory.train.shape
    assert torch.equal(data.train.labels, memory.train.labels) and len(data.test) == len(memory.test)
    rng = np.random.default_rng(0)
    index = np.concatenate([rng.permutation(len(memory.train))[:50], [3, 3, 0]])   # any order, repeats
    x, y = data.train.fetch(index)
    ref_x, ref_y = memory.train.fetch(index)
    assert x.dtype == torch.uint8 and torch.equal(x, ref_x) and torch.equal(y, ref_y)
    assert torch.equal(data.test.fetch(np.arange(len(memory.test)))[0], memory.test.images)


def test_batches_split_over_ranks_and_workers_exactly_once(pools):
    split = ShardPool(os.path.join(pools["digits5"], "train.json"))
    memory = load_real(DIGITS).train
    index = np.random.default_rng(2).permutation(1437)[:400]
    index = index[(index < 300) | (index >= 600)]            # shard 1 holds nothing wanted: it is not read
    for workers, world in ((0, 1), (3, 2), (2, 3), (0, 7)):
        split.num_workers = workers
        got = []
        for rank in range(world):
            for x, y, ids in split.batches(index, 64, rank, world, CPU):
                assert len(ids) <= 64 and torch.equal(x, memory.images[ids]) and torch.equal(y, memory.labels[ids])
                got.append(ids)
        assert np.array_equal(np.sort(torch.cat(got).numpy()), np.sort(index)), (workers, world)
    assert split.shards_with(np.isin(np.arange(1437), index)) == [0, 2, 3, 4]


def test_streaming_scores_equal_in_memory_with_1_and_2_processes(pools, tmp_path, launch):
    cases = [
        {"name": "digits_w0", "memory": DIGITS, "train": "digits5", "workers": 0, "subset": False},
        {"name": "digits_w2_subset", "memory": DIGITS, "train": "digits5", "workers": 2, "subset": True},
        {"name": "one_shard", "memory": DIGITS, "train": "digits1", "workers": 0, "subset": False},
        {"name": "five_shards_w3", "memory": DIGITS, "train": "digits5", "workers": 3, "subset": False},
        {"name": "cifar_w0", "memory": pools["cifar_cfg"], "train": "cifar", "workers": 0, "subset": True},
        {"name": "folder_w2", "memory": pools["folder_cfg"], "train": "folder", "workers": 2, "subset": False},
    ]
    for c in cases:
        c["train"] = os.path.join(pools[c["train"]], "train.json")
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    worker_main_in_process(WORKER, str(spec), str(one), memory=True)
    proc = launch([WORKER, str(spec), str(two)], processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for c in cases:
        ref = np.load(one / f"{c['name']}.memory.npz")
        for got in (np.load(one / f"{c['name']}.stream.npz"), np.load(two / f"{c['name']}.stream.npz")):
            for key in ("index", "label", "pred"):
                assert np.array_equal(ref[key], got[key]), (c["name"], key)
            for key in ("true_logit", "margin", "loss"):
                np.testing.assert_allclose(ref[key], got[key], rtol=1e-5, atol=1e-5, err_msg=c["name"])
        assert int(np.load(two / f"{c['name']}.stream.npz")["world"]) == 2


def test_fetch_shared_by_two_ranks(pools, tmp_path, launch):
    """Two ranks fetch a shuffled third of the digits pool (5 shards): each opens only its share of the shards,
    none twice, and both return exactly the in-memory images; gather_rows_in_pieces gathers uneven, partly
    empty shares piece by piece; the ranks write those samples into a shared set file (synthetic.build),
    again each reading its own shards."""
    out = tmp_path / "fetch.npz"
    proc = launch([FETCH_WORKER, os.path.join(pools["digits5"], "train.json"), str(out)], processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    memory = load_real(DIGITS).train
    ref_x, ref_y = memory.fetch(got["index"])
    assert int(got["world"]) == 2
    assert np.array_equal(got["images"], ref_x.numpy()) and np.array_equal(got["labels"], ref_y.numpy())
    assert got["opened"].tolist() == [3, 2]                   # shards 0, 2, 4 and 1, 3: 5 in all, none twice
    assert sorted(got["a"].tolist()) == [100, 101, 102] and got["b"].shape == (3, 2) and int(got["pieces"]) == 3
    assert np.array_equal(np.sort(got["b"][:, 0]), [100.0, 101.0, 102.0])
    # a shared synthetic set of 4 of those rows + the fetched samples, each rank writing its shards' rows
    assert np.array_equal(np.load(str(out) + ".S.npy", allow_pickle=False),
                          np.concatenate([ref_x.numpy()[:4], ref_x.numpy()]))
    assert got["shared_opened"].tolist() == [3, 2]


WRITE_ONE = shard_writer._write_one


def _killed_after(monkeypatch, k):
    """Make the writer's per-shard function fail after k shards (a killed write), and count the shards written."""
    real, calls = WRITE_ONE, []

    def write_one(job):
        if len(calls) == k:
            raise RuntimeError("killed")
        calls.append(os.path.basename(job[0]))
        return real(job)
    monkeypatch.setattr(shard_writer, "_write_one", write_one)
    return calls


def _same_files(folder, ref, split="train"):
    names = sorted(n for n in os.listdir(ref) if n.startswith(split))
    assert sorted(n for n in os.listdir(folder) if n.startswith(split) or n.startswith(".")) == names
    for name in names:
        assert open(os.path.join(folder, name), "rb").read() == open(os.path.join(ref, name), "rb").read(), name


def test_killed_write_resumes_with_only_the_missing_shards(pools, tmp_path, monkeypatch, capsys):
    # an image folder: the index's mean/std come from pixel sums, which the manifest carries over
    out, total = tmp_path / "f", len(json.load(open(os.path.join(pools["folder"], "train.json")))["shards"])
    assert total >= 3
    _killed_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="killed"):
        write_shards(pools["folder_cfg"], out, "train", per_shard=7, workers=1, log=lambda m: None)
    assert not os.path.exists(out / "train.json") and os.path.exists(out / "train.progress.json")
    monkeypatch.setenv("CCFS_PROGRESS", "lines")
    capsys.readouterr()
    written = _killed_after(monkeypatch, total)
    write_shards(pools["folder_cfg"], out, "train", per_shard=7, workers=1, log=print)
    assert written == [f"train-{s:06d}.tar" for s in range(2, total)]      # the first two were kept
    _same_files(out, pools["folder"])                                       # index and shards; no manifest left
    err = capsys.readouterr()
    assert f"shards train: {total}/{total} shard" in err.err and "2 kept from an earlier attempt" in err.out


def test_killed_write_resumes_through_the_cli_and_distrusts_altered_shards(pools, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "d")
    args = ["shards", "--out", out, "--split", "train", "--per-shard", "300", "--workers", "1", "data.source=digits"]
    monkeypatch.setenv("CCFS_PROGRESS", "auto")                             # set_mode's change is undone
    _killed_after(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="killed"):
        cli.main(args)
    listed = json.load(open(os.path.join(out, "train.progress.json")))["shards"]
    assert sorted(listed) == ["0", "1", "2"]
    data = bytearray(open(os.path.join(out, "train-000000.tar"), "rb").read())
    data[700] ^= 1                                                          # same size, other bytes
    open(os.path.join(out, "train-000000.tar"), "wb").write(bytes(data))
    open(os.path.join(out, "train-000001.tar"), "r+b").truncate(1024)
    # another job (other --per-shard) does not take over the unfinished one without --overwrite
    assert cli.main(args[:6] + ["100"] + args[7:]) == 2
    assert "unfinished write" in capsys.readouterr().err
    written = _killed_after(monkeypatch, 100)
    assert cli.main(args[:-1] + ["--progress", "lines", args[-1]]) == 0
    assert written == ["train-000000.tar", "train-000001.tar", "train-000003.tar", "train-000004.tar"]
    # only shard 2 was kept
    _same_files(out, pools["digits5"])
    assert "shards train: 5/5 shard" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- errors

@pytest.fixture
def digits_copy(pools, tmp_path):
    shutil.copytree(pools["digits5"], tmp_path / "d")
    return str(tmp_path / "d")


def _stream_all(folder, workers=0):
    split = ShardPool(os.path.join(folder, "train.json"), num_workers=workers, check_files=False)
    for _ in split.batches(np.arange(len(split)), 100, 0, 1, CPU):
        pass


def test_truncated_shard_is_named(digits_copy):
    shard = os.path.join(digits_copy, "train-000002.tar")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2 + 100)
    with pytest.raises(DataError, match="train-000002.tar.*truncated"):
        load_shards(shard_cfg(digits_copy))                          # caught up front by the recorded size
    with pytest.raises(DataError, match=r"shard .*train-000002.tar is truncated"):
        _stream_all(digits_copy, workers=2)                          # and while streaming, via a worker
    with open(shard, "r+b") as f:
        f.truncate(2048 * 10)                                       # cut at a member boundary: 10 samples
    with pytest.raises(DataError, match=r"train-000002.tar holds 10 samples \(the last is 00000609\).*says 300"):
        _stream_all(digits_copy)


def test_corrupt_shard_names_shard_and_key(digits_copy):
    shard = os.path.join(digits_copy, "train-000003.tar")
    raw = bytearray(open(shard, "rb").read())
    member = 2048 * 5 + 1024 + 512                                  # the PNG of the 6th sample (key 905)
    raw[member + 40:member + 60] = b"\x00" * 20
    open(shard, "wb").write(bytes(raw))
    with pytest.raises(DataError, match=r"train-000003.tar, sample 00000905"):
        _stream_all(digits_copy)
    raw[2048 * 7 + 100] ^= 0xFF                                      # a tar header of the 8th sample
    open(shard, "wb").write(bytes(raw))
    split = ShardPool(os.path.join(digits_copy, "train.json"))
    with pytest.raises(DataError, match=r"train-000003.tar is corrupt: bad tar header checksum at byte 14336"):
        split.fetch([1000])


def test_missing_shard_malformed_index_and_count_mismatch(digits_copy):
    index_path = os.path.join(digits_copy, "train.json")
    index = json.load(open(index_path))
    os.remove(os.path.join(digits_copy, "train-000004.tar"))
    with pytest.raises(DataError, match="missing: .*train-000004.tar"):
        ShardPool(index_path)
    with open(index_path, "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match="train.json is not valid JSON"):
        ShardPool(index_path)
    broken = dict(index, shards=index["shards"][:4])
    json.dump(broken, open(index_path, "w"))
    with pytest.raises(DataError, match="shards hold 1200 samples, num_samples is 1437"):
        ShardPool(index_path)
    index["shards"][0]["count"] -= 1                                 # the index disagrees with shard 0 and 1
    index["shards"][1]["count"] += 1
    index["shards"][1]["first"] -= 1
    json.dump(index, open(index_path, "w"))
    with pytest.raises(DataError, match=r"shard .*train-000000.tar: more samples than the 299 its index"):
        _stream_all(digits_copy)
    with pytest.raises(DataError, match=r"train-000001.tar: found key '00000300' as its first sample, expected "
                                        r"index 299"):
        ShardPool(index_path, check_files=False).fetch([299])


def _rewrite_index(folder, change, name="train.json"):
    path = os.path.join(folder, name)
    index = json.load(open(path))
    change(index)
    json.dump(index, open(path, "w"))
    return path


def test_pipe_and_url_entries_are_refused_and_do_not_run(digits_copy, tmp_path):
    marker = tmp_path / "pwned"
    for entry in (f"pipe:touch {marker}; cat {digits_copy}/train-000000.tar", "http://example.invalid/a.tar",
                  "file:///etc/passwd", "s3://bucket/a.tar", "PIPE:touch x"):
        path = _rewrite_index(digits_copy, lambda ix: ix["shards"][0].update(file=entry))
        with pytest.raises(DataError) as e:
            ShardPool(path).fetch([0, 1])
        assert "is a URL or command, refused" in str(e.value) and "data.allow_urls=true" in str(e.value)
        assert path in str(e.value) and entry in str(e.value)
        assert not marker.exists()


def test_url_opt_in_streams_through_webdataset(digits_copy, tmp_path):
    """With data.allow_urls the user trusts the index: a pipe: command is run (here: cat of the shard)."""
    shard = os.path.join(digits_copy, "train-000000.tar")
    path = _rewrite_index(digits_copy, lambda ix: ix["shards"][0].update(file=f"pipe:cat {shard}"))
    images, labels = ShardPool(path, allow_urls=True).fetch([0, 5])
    assert torch.equal(images, load_real(DIGITS).train.images[[0, 5]])


def test_paths_outside_the_index_folder_are_refused_unless_allowed(digits_copy, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(os.path.join(digits_copy, "train-000001.tar"), outside / "train-000001.tar")
    for entry in ("../elsewhere/train-000001.tar", str(outside / "train-000001.tar"),
                  "sub/../../elsewhere/train-000001.tar", "../../../../../../etc/passwd"):
        path = _rewrite_index(digits_copy, lambda ix: ix["shards"][1].update(file=entry))
        with pytest.raises(DataError) as e:
            ShardPool(path)
        assert "lies outside the index's folder" in str(e.value) and "data.allow_outside=true" in str(e.value)
    for entry in ("../elsewhere/train-000001.tar", str(outside / "train-000001.tar")):
        path = _rewrite_index(digits_copy, lambda ix: ix["shards"][1].update(file=entry))
        images, _ = ShardPool(path, allow_outside=True).fetch([300, 301])
        assert torch.equal(images, load_real(DIGITS).train.images[[300, 301]])
    data = load_shards(shard_cfg(digits_copy, allow_outside=True))          # the config keys reach ShardPool
    assert len(data.train) == 1437


def test_content_that_disagrees_with_the_index_sha256(digits_copy, capsys):
    swap_images(Path(digits_copy) / "train-000002.tar")
    assert cli.main(["shards", "--out", digits_copy, "--verify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "train-000002.tar: content differs from its index" in err and "sha256" in err
    with pytest.raises(DataError, match="train-000002.tar: content differs"):
        _stream_all(digits_copy)                                      # while streaming too
    with pytest.raises(DataError, match="train-000002.tar: content differs"):
        ShardPool(os.path.join(digits_copy, "train.json")).fetch([600])


def test_verify_passes_on_intact_shards(pools, capsys):
    assert cli.main(["shards", "--out", pools["digits5"], "--verify"]) == 0
    out = capsys.readouterr().out
    assert "train: 5 shard(s) agree" in out and "test: 2 shard(s) agree" in out


def test_test_index_that_is_the_train_split_is_refused(digits_copy):
    with pytest.raises(DataError, match="train.json is the 'train' split"):
        load_shards(shard_cfg(digits_copy, test_root=os.path.join(digits_copy, "train.json")))
    shutil.copy(os.path.join(digits_copy, "train.json"), os.path.join(digits_copy, "copy.json"))
    with pytest.raises(DataError, match=r"data.test_root .*copy.json is the 'train' split \(its index says split: "
                                        r"train\), expected the test split"):
        load_shards(shard_cfg(digits_copy, test_root=os.path.join(digits_copy, "copy.json")))
    _rewrite_index(digits_copy, lambda ix: ix.update(split="test"), "copy.json")   # relabelled: same samples
    with pytest.raises(DataError, match="holds the same samples"):
        load_shards(shard_cfg(digits_copy, test_root=os.path.join(digits_copy, "copy.json")))


@pytest.mark.parametrize("labels", [[1.5], ["3"], [True], [[1]]])
def test_index_labels_that_are_not_integers(digits_copy, labels):
    path = _rewrite_index(digits_copy, lambda ix: ix["labels"].__setitem__(slice(0, 1), labels))
    with pytest.raises(DataError, match="labels must be integers"):
        ShardPool(path)


def test_leftover_temporaries_of_a_killed_writer_are_removed(digits_copy):
    for name in (".train-000003.tar.4242.tmp", ".train.json.abc123.tmp", ".test-000000.tar.7.tmp"):
        open(os.path.join(digits_copy, name), "wb").write(b"partial")
    write_shards(DIGITS, digits_copy, "train", per_shard=300, overwrite=True, log=lambda m: None)
    left = sorted(n for n in os.listdir(digits_copy) if n.startswith("."))
    assert left == [".test-000000.tar.7.tmp"]                             # only the split written is cleaned


def test_config_errors():
    with pytest.raises(ConfigError, match="data.test_root"):
        load_real({"source": "webdataset", "root": "/x/train.json", "test_root": None})
    with pytest.raises(DataError, match="shard index not found: /no/such/train.json"):
        load_real({"source": "webdataset", "root": "/no/such/train.json", "test_root": "/no/such/test.json"})
    with pytest.raises(ConfigError, match="already 'webdataset'"):
        write_shards({"source": "webdataset"}, "/tmp/never", "train")


# ------------------------------------------------------------------------------------ a whole run

def quick_teacher(path):
    """A ConvNet-D3 width 16 (TINY's model) trained for a few epochs on digits, plain PyTorch."""
    from ccfs_dist.training.models import build_model
    data = load_real(DIGITS)
    torch.manual_seed(0)
    model = build_model({"name": "convnet", "width": 16, "depth": 3, "norm": "batchnorm"}, 10, 1, 8)
    x = (data.train.images.float() / 255 - data.norm.mean[0]) / data.norm.std[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(4):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), data.train.labels[idx]).backward()
            opt.step()
    torch.save(model.state_dict(), path)


def test_whole_ccfs_run_on_a_shard_pool(pools, tmp_path):
    teacher = str(tmp_path / "teacher.pt")
    quick_teacher(teacher)
    common = TINY + [f"teacher.checkpoint={teacher}", "ccfs.difficulty=logits", "ccfs.teacher_correct=true"]
    shards = ["data.source=webdataset", f"data.root={pools['digits5']}/train.json",
              f"data.test_root={pools['digits5']}/test.json"]
    for name, source in (("shards", shards), ("memory", [])):     # in this process (the script: test_run.py)
        assert cli.main(["run", "--out", str(tmp_path / name)] + common + source) == 0
    sel = json.load(open(tmp_path / "shards" / "selected_indices.json"))
    assert len(sel["idx_selected"]) == 40 and sel == json.load(open(tmp_path / "memory" / "selected_indices.json"))
    a = json.load(open(tmp_path / "shards" / "summary.json"))
    b = json.load(open(tmp_path / "memory" / "summary.json"))
    assert a["teacher_test_acc"] == b["teacher_test_acc"] and a["data"] == "digits"
    for pa, pb in zip(a["phases"], b["phases"]):
        assert pa["pool_size"] == pb["pool_size"] and pa["selected_per_class"] == pb["selected_per_class"]
    assert set(a["evaluation"]) == {"ccfs", "distilled+random", "random"}


def test_ccfs_run_on_a_shard_pool_with_two_processes(pools, tmp_path, launch):
    """Two ranks on a shard pool: streamed scoring and the shared fetch of every phase's images and of the
    evaluation baselines, through accelerate launch; every artifact as with an in-memory pool."""
    out, teacher = str(tmp_path / "run2"), str(tmp_path / "teacher.pt")
    quick_teacher(teacher)
    shards = ["data.source=webdataset", f"data.root={pools['digits5']}/train.json",
              f"data.test_root={pools['digits5']}/test.json", "ccfs.difficulty=logits", f"teacher.checkpoint={teacher}"]
    proc = launch([SCRIPT, "--out", out] + TINY + shards, processes=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_artifacts(out, processes=2, teacher_trained=False)
