"""Each kind of bad input: a clear message naming the culprit, exit status 2, earlier outputs intact.

Every case runs `ccfs run --overwrite` into the directory of a finished run: inputs are checked before
the directory is touched, and what is found only later fails a staged run, so the earlier run must survive
byte for byte. Planted payloads (a pickle's __reduce__, a `pipe:` shard) must not run.
"""
import hashlib
import json
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ccfs_dist.cli import main
from ccfs_dist.data.distilled import write_image_folder
from ccfs_dist.data.sources import load_real
from ccfs_dist.training.models import build_model
from ccfs_dist.data.shards.writer import write_shards

from conftest import FINISHED_RUN
from test_data import Payload, make_cifar10, write_pickle

TINY = FINISHED_RUN          # the settings of the finished run the cases start from (conftest.finished)
DIGITS_CFG = {"source": "digits", "root": None, "image_size": None, "distilled": None}
DIGITS = load_real(DIGITS_CFG)


def snapshot(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards") / "digits"
    with pytest.MonkeyPatch.context() as mp:             # quiet: a case's captured stderr is its error line alone
        mp.setenv("CCFS_PROGRESS", "off")
        for split in ("train", "test"):
            write_shards(dict(DIGITS_CFG), str(folder), split, per_shard=300, workers=1, log=lambda m: None)
    return folder


@pytest.fixture
def run_dir(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def distilled_folder(tmp_path, classes=10, per_class=2, corrupt=False):
    folder = tmp_path / "distilled"
    images = DIGITS.train.images[: classes * per_class]
    labels = torch.arange(classes).repeat_interleave(per_class)
    write_image_folder(str(folder), images, labels, DIGITS.classes[:classes] if classes == 10 else DIGITS.classes)
    if classes < 10:
        for c in range(classes, 10):
            shutil.rmtree(folder / f"new{c:03d}", ignore_errors=True)
    if corrupt:
        (folder / "new003" / "class003_id000.png").write_bytes(b"not a png")
    return str(folder)


def case_missing_root(tmp_path):
    return ["data.source=cifar10", f"data.root={tmp_path}/nothing"], "data.root not found"


def case_missing_files(tmp_path):
    (tmp_path / "empty").mkdir()
    return ["data.source=cifar10", f"data.root={tmp_path}/empty"], "data_batch_1"


def case_short_scores(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros(10, np.float32))
    return ["ccfs.difficulty=file", f"ccfs.difficulty_file={tmp_path}/s.npy"], "1437"


def case_nan_scores(tmp_path):
    a = np.zeros(len(DIGITS.train), np.float32)
    a[5] = np.nan
    np.save(tmp_path / "s.npy", a)
    return ["ccfs.difficulty=file", f"ccfs.difficulty_file={tmp_path}/s.npy"], "NaN"


def case_npz_labels(tmp_path):
    labels = DIGITS.train.labels.numpy().copy()
    labels[:3] = (labels[:3] + 1) % 10
    np.savez(tmp_path / "c.npz", scores=np.zeros(len(labels), np.float32), labels=labels)
    return ["ccfs.difficulty=file", f"ccfs.difficulty_file={tmp_path}/c.npz"], "labels"


def case_pickled_scores(tmp_path):
    np.save(tmp_path / "p.npy", np.array([{"a": 1}] * len(DIGITS.train), dtype=object), allow_pickle=True)
    return ["ccfs.difficulty=file", f"ccfs.difficulty_file={tmp_path}/p.npy"], "pickle"


def case_distilled_missing_class(tmp_path):
    return [f"data.distilled={distilled_folder(tmp_path, classes=9)}"], "missing"


def case_distilled_too_few(tmp_path):
    return [f"data.distilled={distilled_folder(tmp_path, per_class=1)}"], "new000"


def case_distilled_unreadable(tmp_path):
    return [f"data.distilled={distilled_folder(tmp_path, corrupt=True)}"], "class003_id000.png"


def case_ipc_too_large(tmp_path):
    return ["ccfs.ipc=1000"], "exceeds the real images of class"


def case_alpha(tmp_path):
    return ["ccfs.alpha=1.5"], "'ccfs.alpha' must lie in [0, 1]"


def case_too_many_phases(tmp_path):
    return ["ccfs.phases=7"], "ccfs.phases"


def case_unknown_key(tmp_path):
    return ["train.epoch=3"], "unknown config key 'train.epoch'"


def case_wrong_type(tmp_path):
    return ["eval.runs=three"], "'eval.runs' must be of type int"


def case_checkpoint_garbage(tmp_path):
    (tmp_path / "t.pt").write_bytes(b"garbage")
    return [f"teacher.checkpoint={tmp_path}/t.pt"], "t.pt"


def case_checkpoint_mismatch(tmp_path):
    other = build_model({"name": "convnet", "width": 16, "depth": 2, "norm": "batchnorm"}, 10, 1, 8)
    torch.save(other.state_dict(), tmp_path / "t.pt")
    return [f"teacher.checkpoint={tmp_path}/t.pt"], "t.pt"


def case_checkpoint_pickle(tmp_path):
    with open(tmp_path / "t.pt", "wb") as f:
        pickle.dump({"model": object()}, f)
    return [f"teacher.checkpoint={tmp_path}/t.pt"], "t.pt"


def case_checkpoint_nan(tmp_path, finished):
    sd = torch.load(finished / "teacher.pt", weights_only=True)
    name = next(k for k, v in sd.items() if v.is_floating_point())
    sd[name] = torch.full_like(sd[name], float("nan"))
    torch.save(sd, tmp_path / "t.pt")
    return [f"teacher.checkpoint={tmp_path}/t.pt"], f"holds NaN or infinite values in 1 tensor(s), e.g. {name}"


def case_checkpoint_inf(tmp_path, finished):
    sd = torch.load(finished / "teacher.pt", weights_only=True)
    name = [k for k, v in sd.items() if v.is_floating_point()][-1]
    sd[name][0] = float("-inf")
    torch.save(sd, tmp_path / "t.pt")
    return [f"teacher.checkpoint={tmp_path}/t.pt"], "NaN or infinite"


def case_unknown_model(tmp_path):
    return ["model.name=nosuchnet"], "unknown model.name 'nosuchnet'"


def case_nul_in_a_path(tmp_path):
    (tmp_path / "c.yaml").write_text('data:\n  source: cifar10\n  root: "a\\0b"\n')
    return ["--config", str(tmp_path / "c.yaml")], [], "config key 'data.root' holds a NUL character"


# ----------------------------------------------------------------------------------- config files

def case_config_false(tmp_path):
    (tmp_path / "c.yaml").write_text("false\n")
    return ["--config", str(tmp_path / "c.yaml")], [], "must hold a mapping at the top level"


def case_config_zero(tmp_path):
    (tmp_path / "c.yaml").write_text("0\n")
    return ["--config", str(tmp_path / "c.yaml")], [], "c.yaml' must hold a mapping"


def case_config_directory(tmp_path):
    return ["--config", str(tmp_path)], [], f"config file '{tmp_path}' is a directory"


def case_config_not_utf8(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"seed: 1  # \xff\xfe\n")
    return ["--config", str(tmp_path / "c.yaml")], [], "c.yaml' is not UTF-8 text"


def case_config_missing(tmp_path):
    return ["--config", str(tmp_path / "none.yaml")], [], "none.yaml' does not exist"


# ------------------------------------------------------------------------------------------ CIFAR

def cifar(tmp_path, name=None, obj=None):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"        # beside the run directory, not around it
    make_cifar10(str(folder), np.random.default_rng(0))
    if name:
        write_pickle(folder / name, obj)
    return ["data.source=cifar10", f"data.root={tmp_path}/cifar", "model.width=8"]


def case_cifar_pickle_payload(tmp_path):
    marker = tmp_path / "pwned"
    args = cifar(tmp_path, "data_batch_1", {b"data": Payload(marker), b"labels": [0]})
    return args, "data_batch_1: it asks for the global 'posix.system'"


def case_cifar_meta_payload(tmp_path):
    marker = tmp_path / "pwned"
    return cifar(tmp_path, "batches.meta", {b"label_names": Payload(marker)}), "batches.meta: it asks for the global"


def case_cifar_float_pixels(tmp_path):
    data = np.random.default_rng(0).random((2, 3072)).astype(np.float32)
    return cifar(tmp_path, "data_batch_2", {b"data": data, b"labels": [0, 1]}), "b'data' is a float32 array"


def case_cifar_labels_of_wrong_type(tmp_path):
    obj = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"cat", b"dog"]}
    return cifar(tmp_path, "data_batch_3", obj), "data_batch_3: b'labels' must be a list of integer"


def case_cifar_meta_not_a_dict(tmp_path):
    return cifar(tmp_path, "batches.meta", [b"x"] * 10), "batches.meta: expected a dict"


# ----------------------------------------------------------------------------------- distilled set

def distilled_images(tmp_path, size=8, mode="L"):
    folder = tmp_path / "distilled"
    for c in range(10):
        (folder / f"new{c:03d}").mkdir(parents=True)
        for i in range(2):
            pixels = np.random.default_rng(c * 2 + i).integers(0, 256, (size, size, 3), dtype=np.uint8)
            img = Image.fromarray(pixels)
            (img.convert("L") if mode == "L" else img).save(folder / f"new{c:03d}" / f"{i}.png")
    return [f"data.distilled={folder}"]


def case_distilled_other_size(tmp_path):
    return distilled_images(tmp_path, size=16), "0.png: image is 16x16, expected 8x8"


def case_distilled_colour(tmp_path):
    return distilled_images(tmp_path, mode="RGB"), "image mode RGB, expected grey (L)"


# ------------------------------------------------------------------------------------ shard indexes

def shards(tmp_path, digit_shards, finished, change=None, test_change=None, tamper=None):
    """The digits shards, copied, with the train index changed by `change` and a shard by `tamper`."""
    folder = tmp_path / "shards"
    shutil.copytree(digit_shards, folder)
    for name, fn in (("train.json", change), ("test.json", test_change)):
        if fn:
            index = json.loads((folder / name).read_text())
            fn(index)
            (folder / name).write_text(json.dumps(index))
    if tamper:
        tamper(folder)
    return ["data.source=webdataset", f"data.root={folder}/train.json", f"data.test_root={folder}/test.json",
            f"teacher.checkpoint={finished}/teacher.pt", "ccfs.difficulty=logits"]


def case_shard_pipe_command(tmp_path, digit_shards, finished):
    marker = tmp_path / "pwned"
    cmd = f"pipe:touch {marker}; cat {digit_shards}/train-000000.tar"
    return shards(tmp_path, digit_shards, finished, lambda ix: ix["shards"][0].update(file=cmd)), \
        "is a URL or command, refused"


def case_shard_url(tmp_path, digit_shards, finished):
    return shards(tmp_path, digit_shards, finished, lambda ix: ix["shards"][2].update(file="https://x.invalid/a")), \
        "pass data.allow_urls=true if you trust"


def case_shard_climbs_out(tmp_path, digit_shards, finished):
    return shards(tmp_path, digit_shards, finished, lambda ix: ix["shards"][1].update(file="../../etc/passwd")), \
        "'../../etc/passwd' lies outside the index's folder"


def case_shard_absolute(tmp_path, digit_shards, finished):
    path = f"{digit_shards}/train-000001.tar"
    return shards(tmp_path, digit_shards, finished, lambda ix: ix["shards"][1].update(file=path)), \
        "pass data.allow_outside=true"


def case_test_index_is_train_split(tmp_path, digit_shards, finished):
    return shards(tmp_path, digit_shards, finished, test_change=lambda ix: ix.update(split="train")), \
        "test.json is the 'train' split (its index says split: train), expected the test split"


def case_index_duplicate_key(tmp_path, digit_shards, finished):
    def dup(ix):
        ix["shards"][1]["first"] = ix["shards"][0]["first"]           # two shards claim the same keys
    return shards(tmp_path, digit_shards, finished, dup), "starts at index 0, expected 300"


def swap_images(path):
    """Two images of equal size swapped inside the shard at `path`: keys, labels and sizes agree with the index."""
    raw = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        pngs = [(m.size, m.offset_data) for m in tar.getmembers() if m.name.endswith(".png")]
    size, a, b = next((s1, o1, o2) for i, (s1, o1) in enumerate(pngs) for s2, o2 in pngs[i + 1:]
                      if s1 == s2 and raw[o1:o1 + s1] != raw[o2:o2 + s2])
    raw[a:a + size], raw[b:b + size] = raw[b:b + size], raw[a:a + size]
    path.write_bytes(bytes(raw))


def relabel(folder):
    """One .cls member of train-000001.tar says another class (same length, so the tar stays valid)."""
    path = folder / "train-000001.tar"
    raw = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith(".cls"))
    raw[m.offset_data] = ord(str((int(chr(raw[m.offset_data])) + 1) % 10))
    path.write_bytes(bytes(raw))


def case_shard_content_differs_from_sha256(tmp_path, digit_shards, finished):
    """Found only while the pool streams, after the run started: the staged run fails, the old one stays."""
    return shards(tmp_path, digit_shards, finished, tamper=lambda f: swap_images(f / "train-000003.tar")), \
        "train-000003.tar: content differs from its index"


def case_shard_label_differs_from_index(tmp_path, digit_shards, finished):
    return shards(tmp_path, digit_shards, finished, tamper=relabel), "differs from the index's"


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]
FIXTURES = {"tmp_path", "digit_shards", "finished"}


def refused(run_dir, capsys, options, overrides, words):
    """`ccfs run --overwrite` into the finished run's copy: status 2, one `error:` line with `words`, and the
    earlier run byte for byte as it was, nothing left beside it. Returns what the run printed."""
    before = snapshot(run_dir)
    code = main(["run", "--out", str(run_dir), "--overwrite"] + options + TINY + overrides)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert snapshot(run_dir) == before
    assert not [n for n in os.listdir(run_dir.parent) if n.startswith(".run.ccfs-")]   # no lock, no staged run
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input(case, run_dir, tmp_path, capsys, request):
    names = case.__code__.co_varnames[:case.__code__.co_argcount]
    got = case(*[tmp_path if n == "tmp_path" else request.getfixturevalue(n) for n in names])
    options, overrides, words = got if len(got) == 3 else ([], *got)
    out = refused(run_dir, capsys, options, overrides, words)
    assert not (tmp_path / "pwned").exists()                       # a planted payload did not run
    if case.__name__ in FOUND_LATE:                                # failed inside the staged new run, which
        assert "data digits: 1437 train" in out                    # had started (this line follows its open)


@pytest.mark.parametrize("override, words", [
    ("train.momentum=-0.9", "config key 'train.momentum' must lie in [0, 1), got -0.9"),
    ("train.weight_decay=-0.1", "config key 'train.weight_decay' must be at least 0"),
    ("train.batch_size=-4", "config key 'train.batch_size' must lie in [1, 65536]"),
    ("seed=-3", "config key 'seed' must be at least 0"),
    ("aug.scale_min=1.2", "config key 'aug.scale_min' must lie in (0, 1]"),
    ("teacher.epochs=0", "config key 'teacher.epochs' must be at least 1"),
    ("train.epochs=-2", "config key 'train.epochs' must be at least 1"),
    ("distill.iterations=-5", "config key 'distill.iterations' must be at least 1"),
    ("data.image_size=0", "config key 'data.image_size' must lie in [1, 8192]"),
    ("data.image_size=10000000", "config key 'data.image_size' must lie in [1, 8192]"),
    ("model.width=0", "config key 'model.width' must lie in [1, 16384]"),
])
def test_numbers_outside_their_meaning(override, words, run_dir, capsys):
    refused(run_dir, capsys, [], [override], words)


FOUND_LATE = {"case_shard_content_differs_from_sha256", "case_shard_label_differs_from_index"}


# ------------------------------------------------------------------------------------- --out locations

def test_out_that_is_a_file_or_below_one(tmp_path, capsys):
    (tmp_path / "f").write_text("keep")
    for out, words in ((tmp_path / "f", "is a file, not a folder"),
                       (tmp_path / "f" / "run", f"lies below the file '{tmp_path / 'f'}'")):
        assert main(["run", "--out", str(out)] + TINY) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out ") and words in err and err.count("\n") == 1, err
        assert (tmp_path / "f").read_text() == "keep"


@pytest.mark.skipif(os.access("/proc/sys", os.W_OK), reason="needs a folder this user cannot write")
def test_out_that_cannot_be_written(capsys):
    assert main(["run", "--out", "/proc/sys/ccfs-run"] + TINY) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out '/proc/sys/ccfs-run': '/proc/sys' ") and err.count("\n") == 1, err


def test_overwrite_of_a_run_on_a_read_only_file_system(run_dir, capsys, monkeypatch):
    """A read-only mount as os.access and statvfs report it (tests cannot mount one, and root may write anywhere)."""
    before = snapshot(run_dir)
    real_access, real_statvfs = os.access, os.statvfs

    def access(path, mode, **kw):
        inside = os.path.abspath(path).startswith(str(run_dir.parent))
        return False if inside and mode & os.W_OK else real_access(path, mode, **kw)

    class ReadOnly:
        def __init__(self, st):
            self.f_flag = st.f_flag | os.ST_RDONLY
    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly(real_statvfs(p)))
    assert main(["run", "--out", str(run_dir), "--overwrite"] + TINY) == 2
    err = capsys.readouterr().err
    assert f"error: --out '{run_dir}': '{run_dir}' is on a read-only file system" in err and err.count("\n") == 1
    assert snapshot(run_dir) == before


def test_scores_and_shards_out_locations(tmp_path, capsys):
    (tmp_path / "f").write_text("keep")
    assert main(["scores", "--out", str(tmp_path / "f" / "s.npy")]) == 2
    assert "lies below the file" in capsys.readouterr().err
    (tmp_path / "d.npy").mkdir()
    assert main(["scores", "--out", str(tmp_path / "d.npy")]) == 2
    assert f"--out '{tmp_path / 'd.npy'}' is a folder" in capsys.readouterr().err
    assert main(["shards", "--out", str(tmp_path / "f")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "keep"


def test_resume_with_another_config_is_refused(run_dir, capsys):
    before = snapshot(run_dir)
    assert main(["run", "--out", str(run_dir), "--resume"] + TINY + ["train.lr=0.05"]) == 2
    err = capsys.readouterr().err
    assert "config differs" in err and "train.lr: 0.1 -> 0.05" in err
    assert snapshot(run_dir) == before
