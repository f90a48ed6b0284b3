"""data.decode: device (JPEG batches decoded on the rank's device, here the CPU) against the CPU path
(loader workers, PIL): the same samples in the same order, pixels within the stated tolerance, the same
predictions, the same error for a corrupt JPEG; and `ccfs shards --resize` (pre-resized shards)."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ccfs_dist.config import load_config
from ccfs_dist.errors import ConfigError, DataError
from ccfs_dist.data.images import decode_jpeg_batch, resize_center_crop
from ccfs_dist.data.pool import Norm
from ccfs_dist.data.shards.reader import ShardPool
from ccfs_dist.data.shards.writer import write_shards
from ccfs_dist.training.stream_train import epoch_batches, epoch_plan

CPU = torch.device("cpu")
SIZE = 32
# the tolerance docs/shards.md states (measured on this pool, on the CPU: mean 0.144 levels, max 1)
MEAN_TOL, MAX_TOL = 0.25, 1


def photo(rng, w, h, tint):
    """A smooth JPEG-like photo: upsampled random colour blocks (class `tint` on one channel) plus fine noise."""
    base = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3)).astype(np.int16)
    base[..., tint % 3] = np.clip(base[..., tint % 3] + 90, 0, 255)
    img = np.asarray(Image.fromarray(base.astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.int16)
    return Image.fromarray(np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8))


def write_jpeg_folder(root, train_per_class=40, val_per_class=8, seed=0):
    """train/ and val/ of 3 classes: JPEGs (quality 90) of 40..96 px sides, landscape and portrait; per split one
    grey JPEG and one PNG; in val/ one truncated JPEG (its header is whole: `ccfs shards` stores it)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(3):
            d = os.path.join(root, split, f"c{c}")
            os.makedirs(d)
            for i in range(n):
                w, h = (int(v) for v in rng.integers(40, 97, 2))
                img = photo(rng, w, h, c)
                if i == 0 and c == 1:
                    img.convert("L").save(os.path.join(d, f"{i:03d}.jpg"), quality=90)
                elif i == 0 and c == 2:
                    img.save(os.path.join(d, f"{i:03d}.png"))
                else:
                    img.save(os.path.join(d, f"{i:03d}.jpg"), quality=90)
    buf = io.BytesIO()
    photo(rng, 64, 48, 0).save(buf, "JPEG", quality=90)
    with open(os.path.join(root, "val", "c0", "zzz_truncated.jpg"), "wb") as f:
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])


@pytest.fixture(scope="module")
def jpeg_pool(tmp_path_factory):
    base = tmp_path_factory.mktemp("decode")
    root = str(base / "folder")
    write_jpeg_folder(root)
    cfg = {"source": "imagefolder", "root": root, "image_size": SIZE}
    out = str(base / "shards")
    for split in ("train", "test"):
        write_shards(cfg, out, split=split, per_shard=25, workers=1, log=lambda *a: None)
    return {"root": root, "cfg": cfg, "shards": out, "base": base}


def stream_all(split, index=None, batch_size=16, world=1):
    index = np.arange(len(split)) if index is None else index
    xs, ys, ids = [], [], []
    for rank in range(world):
        for x, y, i in split.batches(index, batch_size, rank, world, CPU):
            xs.append(x)
            ys.append(y)
            ids.append(i)
    return torch.cat(xs), torch.cat(ys), torch.cat(ids)


@pytest.mark.parametrize("workers,world", [(0, 1), (2, 2)])
def test_device_decode_matches_the_cpu_path_within_tolerance(jpeg_pool, workers, world):
    index_path = os.path.join(jpeg_pool["shards"], "train.json")
    cpu = stream_all(ShardPool(index_path, num_workers=workers), world=world)
    dev = stream_all(ShardPool(index_path, num_workers=workers, decode="device"), world=world)
    assert torch.equal(cpu[1], dev[1]) and torch.equal(cpu[2], dev[2])     # same samples, same order
    assert dev[0].dtype == torch.uint8 and dev[0].shape == cpu[0].shape == (120, 3, SIZE, SIZE)
    diff = (cpu[0].int() - dev[0].int()).abs()
    assert diff.float().mean() <= MEAN_TOL and diff.max() <= MAX_TOL, (diff.float().mean(), diff.max())
    assert diff.max() > 0               # the resize really ran on the tensor path (PIL's differs in rounding)
    split = ShardPool(index_path)
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(jpeg_pool["root"], "train")) for f in fs)
    png = [i for i, f in enumerate(files) if f.endswith(".png")]
    assert len(png) == 1 and split.labels[png[0]] == 2
    pos = int(torch.nonzero(cpu[2] == png[0])[0, 0])
    assert torch.equal(cpu[0][pos], dev[0][pos])                           # a PNG member: decoded as before


def test_grey_mode_and_geometry_of_the_batch_decoder():
    """decode_jpeg_batch against PIL + resize_center_crop image by image: landscape, portrait, square (no
    resize), smaller than the size (upscaled), and mode L (PIL's luma of the decoded RGB)."""
    rng = np.random.default_rng(1)
    payloads, refs = [], {"RGB": [], "L": []}
    for w, h in ((90, 50), (41, 77), (SIZE, SIZE), (20, 25)):
        buf = io.BytesIO()
        photo(rng, w, h, 0).save(buf, "JPEG", quality=85)
        payloads.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
        for mode in refs:
            img = np.asarray(resize_center_crop(Image.open(io.BytesIO(buf.getvalue())).convert(mode), SIZE))
            refs[mode].append(torch.from_numpy(img.copy()).reshape(SIZE, SIZE, -1).permute(2, 0, 1))
    for mode, channels in (("RGB", 3), ("L", 1)):
        got = decode_jpeg_batch(payloads, mode, SIZE, CPU)
        assert [tuple(g.shape) for g in got] == [(channels, SIZE, SIZE)] * 4
        diffs = [(g.int() - r.int()).abs() for g, r in zip(got, refs[mode])]
        assert all(d.max() <= MAX_TOL for d in diffs) and all(d.float().mean() <= MEAN_TOL for d in diffs)
        assert torch.equal(got[2], refs[mode][2])                        # no resize: the decoder's own pixels


def test_predictions_agree_between_the_two_paths(jpeg_pool):
    from ccfs_dist.runtime.dist import make_accelerator
    from ccfs_dist.training.models import build_model
    from ccfs_dist.training.predict import predict
    from ccfs_dist.training.train import Recipe, train_model
    acc = make_accelerator()
    index_path = os.path.join(jpeg_pool["shards"], "train.json")
    cpu, dev = ShardPool(index_path), ShardPool(index_path, decode="device")
    images, labels = cpu.fetch(np.arange(len(cpu)))
    norm = Norm(tuple(cpu.meta["mean"]), tuple(cpu.meta["std"]))
    torch.manual_seed(0)
    model = build_model({"name": "convnet", "width": 16, "depth": 2, "norm": "batchnorm"}, 3, 3, SIZE)
    model, _ = train_model(acc, model, images, labels, Recipe(epochs=15, batch_size=32, lr=0.05, weight_decay=5e-4),
                           norm=norm, seed=0)
    index = np.arange(len(cpu))
    a, _ = predict(acc, model, cpu, index, norm=norm, batch_size=32)
    b, _ = predict(acc, model, dev, index, norm=norm, batch_size=32)
    assert np.array_equal(a["index"], b["index"]) and np.array_equal(a["label"], b["label"])
    assert (a["pred"] == a["label"]).mean() >= 0.6                      # a model that learned something
    assert (a["pred"] == b["pred"]).mean() >= 0.99
    assert np.abs(a["margin"] - b["margin"]).max() < 0.1 * np.abs(a["margin"]).max()


def test_device_decode_scores_do_not_depend_on_the_process_count(jpeg_pool, tmp_path, launch):
    """tests/workers/shard_score_worker.py over the JPEG shards, decode cpu and device, 1 process and 2 through
    accelerate launch (2 loader workers, a shuffled subset): per decode the same records with 1 and 2
    processes, and the same predictions across the two decodes."""
    from conftest import ROOT, worker_main_in_process
    worker = os.path.join(ROOT, "tests", "workers", "shard_score_worker.py")
    cases = [{"name": decode, "memory": jpeg_pool["cfg"], "train": os.path.join(jpeg_pool["shards"], "train.json"),
              "workers": 2, "subset": True, "decode": decode} for decode in ("cpu", "device")]
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    worker_main_in_process(worker, str(spec), str(one), memory=False)
    proc = launch([worker, str(spec), str(two)], processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {(d, n): np.load(folder / f"{d}.stream.npz") for d in ("cpu", "device") for n, folder in ((1, one), (2, two))}
    for decode in ("cpu", "device"):
        a, b = got[decode, 1], got[decode, 2]
        assert int(b["world"]) == 2 and len(a["index"]) == 80
        for key in ("index", "label", "pred"):
            assert np.array_equal(a[key], b[key]), (decode, key)
        for key in ("true_logit", "margin", "loss"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=decode)
    assert np.array_equal(got["cpu", 1]["index"], got["device", 1]["index"])
    assert (got["cpu", 1]["pred"] == got["device", 1]["pred"]).mean() >= 0.99


def test_a_corrupt_jpeg_gives_the_cpu_paths_error(jpeg_pool):
    """The truncated JPEG of val/: the same one-line DataError, naming its shard and key, under both decodes."""
    index_path = os.path.join(jpeg_pool["shards"], "test.json")
    errors = []
    for decode in ("cpu", "device"):
        with pytest.raises(DataError) as e:
            stream_all(ShardPool(index_path, num_workers=2, decode=decode))
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "\n" not in errors[1], errors
    assert "sample 00000008:" in errors[1]                   # c0's 8 JPEGs come first, then the truncated one and "test-000000.tar" in errors[1] and "truncated" in errors[1]


def test_sha256_is_checked_while_streaming_under_device_decode(jpeg_pool, tmp_path):
    """Shards whose bytes differ from the index's sha256 (a byte changed inside a JPEG's data, which decodes
    anyway): the stream stops with the sha256 error naming the shard, as under decode=cpu."""
    import shutil
    from ccfs_dist.data.shards.index import read_index
    folder = tmp_path / "shards"
    shutil.copytree(jpeg_pool["shards"], folder)
    _, shards = read_index(folder / "train.json")
    path = shards[1]["url"]                                 # the copy: resolved next to its index
    raw = bytearray(open(path, "rb").read())
    at = raw.index(b"\xff\xda") + 200                      # inside the first JPEG's entropy-coded data
    raw[at] ^= 0x01
    open(path, "wb").write(bytes(raw))
    for decode in ("cpu", "device"):
        with pytest.raises(DataError, match="train-000001.tar: content differs from its index"):
            stream_all(ShardPool(folder / "train.json", num_workers=1, decode=decode))


def test_stream_train_batches_under_device_decode(jpeg_pool):
    """epoch_batches with decode=device: the same samples per step as decode=cpu, images within tolerance."""
    index_path = os.path.join(jpeg_pool["shards"], "train.json")
    plan = epoch_plan(120, 32, 2)
    for rank in (0, 1):
        got = [list(epoch_batches(ShardPool(index_path, num_workers=1, decode=d), plan, 0, 0, rank,
                                  shuffle_buffer=40, interleave=2, device=CPU)) for d in ("cpu", "device")]
        assert len(got[0]) == len(got[1]) == len(plan)
        for (x, y, ids), (dx, dy, dids) in zip(*got):
            assert torch.equal(ids, dids) and torch.equal(y, dy)
            assert (x.int() - dx.int()).abs().max() <= MAX_TOL


def test_decode_config(jpeg_pool):
    cfg = load_config(None, ["data.source=webdataset", "data.root=a.json", "data.decode=device"])
    assert cfg["data"]["decode"] == "device" and load_config(None, [])["data"]["decode"] == "cpu"
    from ccfs_dist.data.sources import load_real
    shards = {"source": "webdataset", "root": os.path.join(jpeg_pool["shards"], "train.json"),
              "test_root": os.path.join(jpeg_pool["shards"], "test.json")}
    data = load_real(dict(cfg["data"], **shards))
    assert data.train.decode == data.test.decode == "device"
    assert load_real(dict(shards, decode="cpu")).train.decode == "cpu"
    with pytest.raises(ConfigError, match="data.decode"):
        load_config(None, ["data.decode=gpu"])
    with pytest.raises(ConfigError, match="webdataset only"):
        load_config(None, ["data.decode=device"])
    with pytest.raises(ConfigError, match="data.decode"):
        ShardPool("unused.json", decode="cuda")


# ------------------------------------------------------------------------------------ pre-resized shards

# the tolerance docs/shards.md states for JPEGs re-encoded at the read size, per --jpeg-quality (measured on
# these noisy generated photos: mean 2.1 / max 14 levels at 95, mean 0.48 / max 4 at 100; + 1 for decode=device)
RESIZED_TOL = {95: (2.5, 24), 100: (0.75, 6)}


@pytest.mark.parametrize("quality", [95, 100])
def test_pre_resized_shards_read_as_resizing_on_read(jpeg_pool, quality):
    """`ccfs shards --resize 32` (the read size): the index records it, stored members have
    the shorter side 32; read back, PNG members give the very pixels of resizing on read, re-encoded JPEGs
    lie within the stated tolerance, and decode=device (nothing left to resize) equals decode=cpu."""
    from ccfs_dist.cli import main
    from ccfs_dist.data.shards.index import read_index
    from ccfs_dist.data.shards.tar import iter_samples
    out = str(jpeg_pool["base"] / f"resized{quality}")
    cfg_file = jpeg_pool["base"] / "folder.yaml"
    cfg_file.write_text(f"data:\n  source: imagefolder\n  root: {jpeg_pool['root']}\n  image_size: {SIZE}\n")
    assert main(["shards", "--config", str(cfg_file), "--out", out, "--split", "train", "--per-shard", "25",
                 "--workers", "1", "--resize", str(SIZE), "--jpeg-quality", str(quality)]) == 0
    meta, shards = read_index(os.path.join(out, "train.json"))
    full_meta, full_shards = read_index(os.path.join(jpeg_pool["shards"], "train.json"))
    assert meta["source"]["resize"] == SIZE and meta["source"]["jpeg_quality"] == quality
    assert "resize" not in full_meta["source"]
    assert meta["source"]["fingerprint"] != full_meta["source"]["fingerprint"]
    with open(shards[0]["url"], "rb") as f:
        for _, files in iter_samples(f):
            (ext,) = set(files) - {"cls"}
            assert min(Image.open(io.BytesIO(files[ext])).size) == SIZE
    full = stream_all(ShardPool(os.path.join(jpeg_pool["shards"], "train.json")))
    png = int(torch.nonzero(full[1] == 2)[0, 0])                          # c2's first file is the PNG
    read = {}
    for decode in ("cpu", "device"):
        read[decode] = got = stream_all(ShardPool(os.path.join(out, "train.json"), decode=decode))
        assert torch.equal(got[2], full[2])
        diff = (got[0].int() - full[0].int()).abs()
        mean_tol, max_tol = RESIZED_TOL[quality]
        assert diff.float().mean() <= mean_tol and diff.max() <= max_tol, (decode, diff.float().mean(), diff.max())
        assert torch.equal(got[0][png], full[0][png])
    assert torch.equal(read["cpu"][0], read["device"][0])     # stored at the read size: crop only, no resize
    assert main(["shards", "--config", str(cfg_file), "--out", out + "2", "--resize", "16"]) == 2
    assert main(["shards", "--config", str(cfg_file), "--out", out + "2", "--resize", "32", "--jpeg-quality", "0"]) == 2
    with pytest.raises(ConfigError, match="--resize applies to image-file sources"):
        write_shards({"source": "digits"}, out + "3", resize=8)


# ------------------------------------------------------------------------------------------ a whole run

def test_whole_run_with_device_decode_equals_cpu_decode_on_png_shards(tmp_path):
    """A whole run on digits shards (PNG members: decoded in the workers under both settings) with the teacher
    trained on the stream: data.decode=device moves every streamed pass (teacher training, scoring, test
    accuracy) onto the encoded-batch path, and the run's selections and figures stay byte-identical."""
    from ccfs_dist import cli
    from test_run import TINY
    folder = str(tmp_path / "digits")
    for split in ("train", "test"):
        write_shards({"source": "digits"}, folder, split=split, per_shard=300, workers=1, log=lambda *a: None)
    base = TINY + ["ccfs.difficulty=logits", "data.source=webdataset", f"data.root={folder}/train.json",
                   f"data.test_root={folder}/test.json", "data.num_workers=1"]
    runs = {}
    for decode in ("cpu", "device"):
        out = tmp_path / decode
        assert cli.main(["run", "--out", str(out)] + base + [f"data.decode={decode}"]) == 0    # in this process
        runs[decode] = [open(out / name).read() for name in ("selected_indices.json", "summary.json")]
    assert runs["cpu"][0] == runs["device"][0]
    summaries = [untimed(json.loads(runs[d][1])) for d in ("cpu", "device")]
    assert summaries[0] == summaries[1] and summaries[0]["teacher"]["source"] == "trained"


def untimed(tree):
    """A summary without its timings (keys naming seconds or a rate per second)."""
    if isinstance(tree, dict):
        return {k: untimed(v) for k, v in tree.items() if "seconds" not in k and "per_s" not in k}
    return [untimed(v) for v in tree] if isinstance(tree, list) else tree
