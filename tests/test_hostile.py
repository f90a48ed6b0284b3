"""Hostile inputs of every class get one `error:` line (exit 2) before anything is allocated or opened,
and leave every given file byte for byte as it was; real formats keep working.

Classes: nesting (JSON / YAML), headers that lie about sizes (.npy / .npz, tar numeric fields, pax records,
index shapes), sample keys by the ASCII rule, non-regular files (FIFOs), inputs that would make a silent
wrong run (integer / meta / out-of-range checkpoint tensors, test split = train split, broken symlinks
and loops, duplicate distilled images, score files of another data set, non-finite statistics). Real
formats: upper-case .JPEG, CMYK and progressive JPEGs, a PNG named .JPEG, palette / RGBA / 16-bit PNGs,
class names with spaces and non-ASCII letters, tarfile's PAX shards, the PyTorch ImageNet example's
checkpoints."""
import io
import json
import os
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from ccfs_dist.cli import main
from ccfs_dist.errors import DataError
from ccfs_dist.training.models import build_model, load_checkpoint
from ccfs_dist.data.shards.tar import iter_tar
from ccfs_dist.data.sources import load_real

from test_bad_input import DIGITS, TINY, digit_shards, distilled_folder  # noqa: F401  (fixture)
from test_ownership import IMAGES, image_folder, refused


@pytest.fixture
def data(tmp_path):
    return image_folder(tmp_path / "data")


def out(tmp_path):
    return ["run", "--out", str(tmp_path / "runs" / "x")]


# ------------------------------------------------------------------------------------------ nesting

def test_json_and_yaml_nested_too_deep(tmp_path, digit_shards, capsys):  # noqa: F811
    deep = "[" * 100_000 + "]" * 100_000
    shards = tmp_path / "shards"
    shutil.copytree(digit_shards, shards)
    (shards / "train.json").write_text(deep)
    refused(out(tmp_path) + TINY + ["data.source=webdataset", f"data.root={shards}/train.json",
                                    f"data.test_root={shards}/test.json"], capsys, "nests 100000 levels", shards)
    scores = tmp_path / "s.npy"
    np.save(scores, np.zeros(len(DIGITS.train), np.float32))
    (tmp_path / "s.json").write_text('{"method": ' + deep + "}")
    refused(out(tmp_path) + TINY + ["ccfs.difficulty=file", f"ccfs.difficulty_file={scores}"], capsys,
            "nests 100001 levels", scores, tmp_path / "s.json")
    config = tmp_path / "deep.yaml"
    config.write_text("seed: " + "[" * 100_000 + "]" * 100_000 + "\n")
    refused(out(tmp_path) + ["--config", str(config)], capsys, "nests more than 64 levels", config)


# ---------------------------------------------------------------------------- headers that lie

def lying_npy(declared=(1 << 41,)):
    """A ~130-byte .npy whose header declares `declared` float32 elements (8 TiB by default)."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': %r, }" % (declared,)
    header = header + " " * (-(len(header) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 16


def test_array_headers_checked_against_the_file(tmp_path, capsys):
    npy = tmp_path / "s.npy"
    npy.write_bytes(lying_npy())
    refused(out(tmp_path) + TINY + ["ccfs.difficulty=file", f"ccfs.difficulty_file={npy}"], capsys,
            "got 2199023255552", npy)
    npy.write_bytes(lying_npy((len(DIGITS.train),)))                         # the right shape, short data
    refused(out(tmp_path) + TINY + ["ccfs.difficulty=file", f"ccfs.difficulty_file={npy}"], capsys,
            "truncated or corrupt", npy)
    npz = tmp_path / "c.npz"
    for declared, words in (((1 << 41,), "got 2199023255552"),
                            ((len(DIGITS.train),), "member scores.npy: its header declares shape (1437,)")):
        with zipfile.ZipFile(npz, "w") as z:
            z.writestr("scores.npy", lying_npy(declared))
            z.writestr("labels.npy", lying_npy(declared))
        refused(out(tmp_path) + TINY + ["ccfs.difficulty=file", f"ccfs.difficulty_file={npz}"], capsys, words, npz)
    from ccfs_dist.runtime import io as ccfs_io                      # the reader alone, without an expected length
    with zipfile.ZipFile(npz, "w") as z:                     # a member numpy would hand on as raw bytes
        z.writestr("scores", b"\0" * 64)
    refused(out(tmp_path) + TINY + ["ccfs.difficulty=file", f"ccfs.difficulty_file={npz}"], capsys,
            "member scores is not a .npy array", npz)
    big = tmp_path / "big.npy"
    big.write_bytes(lying_npy())
    with pytest.raises(DataError, match="declares shape .2199023255552,. of float32"):
        ccfs_io.read_array(big)


def tar_member(name, data, **fields):
    """One ustar member (header + padded data) with header `fields` replaced as raw bytes, checksum fixed."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    for (start, end), raw in fields.values():
        header[start:end] = raw.ljust(end - start, b"\0")
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data + b"\0" * (-len(data) % 512)


def pax_member(records, name="000000.cls", data=b"1"):
    body = b"".join(records)
    info = tarfile.TarInfo("././@PaxHeader")
    info.size, info.type = len(body), tarfile.XHDTYPE
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    return bytes(header) + body + b"\0" * (-len(body) % 512) + tar_member(name, data)


@pytest.mark.parametrize("stream, words", [
    (tar_member("000000.cls", b"1", size=((124, 136), b"\x80" + b"\xff" * 11)), "declares 3094850098213450687"),
    (tar_member("000000.cls", b"1", size=((124, 136), b"\xff" * 12)), "negative or oversized base-256"),
    (tar_member("000000.cls", b"1", size=((124, 136), b"1e9")), "field 'size' b'1e9"),
    (tar_member("000000.cls", b"1", size=((124, 136), b"77777777777")), "over the limit"),
    (pax_member([b"20 size=99999999999\n"]), "pax header field 'size'"),
    (pax_member([b"12 size=-12\n"]), "pax header field 'size' '-12'"),
    (pax_member([b"x9 size=1\n"]), "bad pax header record"),
    (pax_member([b"99 size=1\n"]), "bad pax header record"),
    (pax_member([b"\xd9\xa1\xd9\xa2 size=1\n"]), "bad pax header record"),          # Arabic-Indic digits
])
def test_tar_fields_by_strict_grammar(stream, words):
    with pytest.raises(DataError, match="shard x") as e:
        list(iter_tar(io.BytesIO(stream + b"\0" * 1024), "shard x"))
    assert words in str(e.value)


def pax_shard(folder, keys):
    """A shard written by tarfile (PAX), samples `keys` of digit images labelled 0, and its index."""
    folder.mkdir(exist_ok=True)
    path = folder / "train-000000.tar"
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(png, "PNG")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key in keys:
            for ext, data in (("cls", b"0"), ("png", png.getvalue())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    index = {"format": "ccfs-shards/1", "split": "train", "num_samples": len(keys), "classes": ["0"],
             "shape": [1, 8, 8], "mean": [0.5], "std": [0.25], "labels": [0] * len(keys),
             "shards": [{"file": path.name, "first": 0, "count": len(keys)}]}
    (folder / "train.json").write_text(json.dumps(index))
    return folder


def test_sample_keys_by_the_ascii_rule_and_pax_shards_of_tarfile(tmp_path, capsys):
    good = pax_shard(tmp_path / "good", ["0", "1", "2"])
    assert main(["shards", "--out", str(good), "--split", "train", "--verify"]) == 0, capsys.readouterr().err
    members = list(iter_tar(open(good / "train-000000.tar", "rb"), "x"))
    assert [n for n, _ in members][:2] == ["0.cls", "0.png"]
    bad = pax_shard(tmp_path / "bad", ["0", "1²"])                # str.isdigit('1²') is True; int() fails
    refused(["shards", "--out", str(bad), "--split", "train", "--verify"], capsys, "found key '1²'", bad)


def test_index_shape_size_and_statistics_within_limits(tmp_path, digit_shards, capsys):  # noqa: F811
    base = json.loads((digit_shards / "train.json").read_text())
    for change, words in ((dict(shape=[3, 10 ** 9, 10 ** 9]), "at most 8192"),
                          (dict(shape=[10, 250_000_000_000_000_000]), "expected [C, S, S]"),
                          (dict(mean=[float("nan")]), "mean [nan]"),
                          (dict(mean=[1e30]), "mean [1e+30]"),
                          (dict(std=[1e-320]), "std [1e-320]"),
                          (dict(std=[0.0]), "std [0.0]"),
                          (dict(num_samples="1437"), "num_samples '1437'")):
        shards = tmp_path / "shards"
        shutil.rmtree(shards, ignore_errors=True)
        shutil.copytree(digit_shards, shards)
        (shards / "train.json").write_text(json.dumps(dict(base, **change)))
        refused(out(tmp_path) + TINY + ["data.source=webdataset", f"data.root={shards}/train.json",
                                        f"data.test_root={shards}/test.json"], capsys, words, shards)
    refused(out(tmp_path) + IMAGES + ["data.image_size=10000000", "data.root=x"], capsys, "must lie in [1, 8192]")


# ------------------------------------------------------------------------------ non-regular files

def test_named_pipes_are_refused_before_they_are_opened(data, tmp_path, capsys):
    os.mkfifo(data / "train" / "a" / "x.png")
    refused(out(tmp_path) + IMAGES + [f"data.root={data}"], capsys, "x.png is not a regular file", data)
    os.remove(data / "train" / "a" / "x.png")
    for key, name in (("teacher.checkpoint", "t.pt"), ("ccfs.difficulty_file", "s.npy")):
        os.mkfifo(tmp_path / name)
        extra = ["ccfs.difficulty=file"] if key == "ccfs.difficulty_file" else []
        refused(out(tmp_path) + TINY + extra + [f"{key}={tmp_path / name}"], capsys, "a named pipe")
    os.mkfifo(tmp_path / "c.yaml")
    refused(out(tmp_path) + ["--config", str(tmp_path / "c.yaml")], capsys, "not a regular file")


# ---------------------------------------------------------------------------- silent wrong runs

def test_broken_symlinks_and_loops_in_an_image_folder(data, tmp_path, capsys):
    (data / "train" / "a" / "gone.png").symlink_to(tmp_path / "nothing.png")
    refused(out(tmp_path) + IMAGES + [f"data.root={data}"], capsys, "gone.png is a broken symlink", data)
    os.remove(data / "train" / "a" / "gone.png")
    (data / "train" / "c").symlink_to(data / "train" / "c")                        # a class that is a loop
    refused(out(tmp_path) + IMAGES + [f"data.root={data}"], capsys, "is a symlink loop", data)
    os.remove(data / "train" / "c")
    (data / "train" / "b" / "up").symlink_to(data / "train" / "b")                  # a walk that never ends
    refused(out(tmp_path) + IMAGES + [f"data.root={data}"], capsys, "up is a symlink loop", data)


def test_test_split_is_the_training_split(data, tmp_path, capsys):
    shutil.rmtree(data / "val")
    (data / "val").symlink_to(data / "train")
    refused(out(tmp_path) + IMAGES + [f"data.root={data}"], capsys, "is the training folder", data)
    os.remove(data / "val")
    for c in ("a", "b"):                                    # the same files, linked one by one
        (data / "val" / c).mkdir(parents=True)
        for name in os.listdir(data / "train" / c):
            (data / "val" / c / name).symlink_to(data / "train" / c / name)
    refused(out(tmp_path) + IMAGES + [f"data.root={data}"], capsys, "holds 4 of the training files", data)


def test_a_run_artifact_without_a_key_names_the_file(tmp_path):
    from ccfs_dist.runtime.rundir import Layout
    (tmp_path / "phase_1").mkdir()
    (tmp_path / "phase_1" / "metrics.json").write_text('{"phase": 1}')
    metrics = Layout.read_json(str(tmp_path / "phase_1" / "metrics.json"))
    with pytest.raises(DataError, match=r"metrics.json has no 'filter_test_acc' entry"):
        metrics["filter_test_acc"]
    np.savez(tmp_path / "p.npz", pred=np.zeros(3))
    with pytest.raises(DataError, match=r"p.npz has no 'index' entry"):
        Layout.read_npz(str(tmp_path / "p.npz"))["index"]


def test_shards_shared_with_the_test_split_or_linked_from_outside(tmp_path, digit_shards, capsys):  # noqa: F811
    shards = tmp_path / "shards"
    shutil.copytree(digit_shards, shards)
    test = json.loads((shards / "test.json").read_text())
    train = json.loads((shards / "train.json").read_text())
    (shards / "test2.json").write_text(json.dumps(dict(test, shards=train["shards"][:1] + test["shards"][1:])))
    stream = TINY + ["data.source=webdataset", f"data.root={shards}/train.json"]
    refused(out(tmp_path) + stream + [f"data.test_root={shards}/test2.json"], capsys, "names 1 shard file(s) of "
            "data.root", shards)
    outside = tmp_path / "outside.tar"
    os.rename(shards / "test-000000.tar", outside)
    (shards / "test-000000.tar").symlink_to(outside)          # inside by its name, outside by its target
    refused(out(tmp_path) + stream + [f"data.test_root={shards}/test.json"], capsys, "through a symlink", shards)


def test_duplicate_distilled_images(tmp_path, capsys):
    folder = distilled_folder(tmp_path)
    shutil.copy(os.path.join(folder, "new004", "class004_id000.png"), os.path.join(folder, "new004", "class004_id001.png"))
    refused(out(tmp_path) + TINY + [f"data.distilled={folder}"], capsys, "are the same image", folder)


def test_score_file_of_another_data_set(tmp_path, capsys):
    scores = tmp_path / "s.npy"
    np.save(scores, np.zeros(len(DIGITS.train), np.float32))
    (tmp_path / "s.json").write_text(json.dumps({"method": "forgetting", "data": "cifar10"}))
    refused(out(tmp_path) + TINY + ["ccfs.difficulty=file", f"ccfs.difficulty_file={scores}"], capsys,
            "records data 'cifar10' but the data's is 'digits'", tmp_path)


def digits_model():
    return build_model({"name": "convnet", "width": 8}, 10, 1, 8)


@pytest.mark.parametrize("change, words", [
    (lambda sd: {k: (v * 100).to(torch.int64) if v.is_floating_point() else v for k, v in sd.items()},
     "wrong kind"),
    (lambda sd: {k: torch.empty_like(v, device="meta") for k, v in sd.items()}, "without values (meta"),
    (lambda sd: dict(sd, **{k: v.double() * 1e300 for k, v in list(sd.items())[:1]}), "NaN or infinite"),
])
def test_checkpoint_tensors_that_would_load_silently_wrong(tmp_path, change, words):
    path = tmp_path / "t.pt"
    torch.save(change(digits_model().state_dict()), path)
    with pytest.raises(DataError, match="t.pt") as e:
        load_checkpoint(digits_model(), path)
    assert words in str(e.value)


# ---------------------------------------------------------------------------------- real formats

def test_real_formats_load(tmp_path):
    """ImageNet-style names and encodings in one image folder: every file decodes, 16-bit scaled, not white."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    grey16 = (np.arange(144, dtype=np.uint16).reshape(12, 12) * 450)          # up to 64350
    for split in ("train", "val"):
        for c in ("tabby cat", "Käfer"):
            d = root / split / c
            d.mkdir(parents=True)
            Image.fromarray(rgb).save(d / "n1.JPEG", "JPEG")
            Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg", "JPEG")
            Image.fromarray(rgb).save(d / "prog.jpeg", "JPEG", progressive=True)
            Image.fromarray(rgb).save(d / "png.JPEG", "PNG")
            Image.fromarray(rgb).convert("P").save(d / "palette.png")
            Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(d / "rgba.png")
            Image.fromarray(grey16).save(d / "grey16.png")
    data = load_real({"source": "imagefolder", "root": str(root), "image_size": None})
    assert data.classes == ["Käfer", "tabby cat"] and len(data.train) == 14
    names = sorted(os.listdir(root / "train" / "Käfer"))
    grey = data.train.images[names.index("grey16.png")].float()
    want = torch.from_numpy((grey16 >> 8).astype(np.float32))
    assert torch.equal(grey[0], want) and grey.max() < 255                      # scaled, not clipped


def test_pytorch_imagenet_example_checkpoint_loads(tmp_path):
    """examples/imagenet/main.py saves {'epoch', 'arch', 'state_dict' (DataParallel: 'module.'), 'best_acc1',
    'optimizer', 'scheduler'}."""
    model = digits_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, 1, 8, 8)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30)
    torch.save({"epoch": 1, "arch": "convnet", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "best_acc1": torch.tensor(12.5), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
               tmp_path / "checkpoint.pth.tar")
    loaded = load_checkpoint(digits_model(), tmp_path / "checkpoint.pth.tar")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
