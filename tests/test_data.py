"""Data sources and distilled image folders, on tiny hand-made layouts (never downloads)."""
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ccfs_dist.data.distilled import load_distilled, write_image_folder
from ccfs_dist.data.images import channel_stats
from ccfs_dist.data.sources import load_real
from ccfs_dist.errors import ConfigError, DataError


def cfg(source, root=None, image_size=None):
    return {"source": source, "root": None if root is None else str(root), "image_size": image_size,
            "distilled": None}


def save_image(path, size, color, mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path)


# ----------------------------------------------------------------------------------------- digits

def test_digits_split_shapes_values_and_determinism():
    from sklearn.datasets import load_digits
    raw = load_digits()
    data = load_real(cfg("digits"))
    assert data.train.images.shape == (1437, 1, 8, 8) and data.test.images.shape == (360, 1, 8, 8)
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64
    assert data.train.images.is_contiguous() and len(data.train) == 1437 and len(data.test) == 360
    assert (data.num_classes, data.channels, data.image_size) == (10, 1, 8)
    assert data.classes == [str(c) for c in range(10)]
    train_idx = [i for i in range(1797) if i % 5 != 0]
    test_idx = list(range(0, 1797, 5))
    assert data.train.labels.tolist() == raw.target[train_idx].tolist()
    assert data.test.labels.tolist() == raw.target[test_idx].tolist()
    expected = np.floor(raw.images[train_idx] * 255 / 16 + 0.5).astype(np.uint8)
    assert np.array_equal(data.train.images[:, 0].numpy(), expected)
    assert data.train.images.max() == 255
    x = data.train.images.double() / 255
    assert data.norm.mean == pytest.approx((x.mean().item(),))
    assert data.norm.std == pytest.approx((x.std(unbiased=False).item(),))
    again = load_real(cfg("digits"))
    assert torch.equal(again.train.images, data.train.images) and torch.equal(again.test.labels, data.test.labels)
    assert again.norm == data.norm


def test_image_size_rejected_for_fixed_size_sources():
    with pytest.raises(ConfigError, match="image_size"):
        load_real(cfg("digits", image_size=16))


# ------------------------------------------------------------------------------------------ CIFAR

def write_pickle(path, obj, protocol=2):
    """As the CIFAR release was written: pickle.dump of a dict with byte keys, protocol 2."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar10(folder, rng):
    os.makedirs(folder)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        labels = [(2 * i) % 10, (2 * i + 1) % 10]
        write_pickle(os.path.join(folder, f"data_batch_{i}"), {b"data": data, b"labels": labels})
        batches.append((data, labels))
    test = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    write_pickle(os.path.join(folder, "test_batch"), {b"data": test, b"labels": [9, 0, 4]})
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer",
                                   "dog", "frog", "horse", "ship", "truck")]
    write_pickle(os.path.join(folder, "batches.meta"), {b"label_names": names})
    return batches, test


@pytest.mark.parametrize("use_parent", [True, False])
def test_cifar10_order_labels_classes(tmp_path, use_parent):
    folder = tmp_path / "cifar-10-batches-py"
    batches, test = make_cifar10(str(folder), np.random.default_rng(0))
    data = load_real(cfg("cifar10", tmp_path if use_parent else folder))
    expected = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
    assert data.train.images.shape == (10, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert np.array_equal(data.train.images.numpy(), expected)  # batch 1..5 order, CHW rows
    assert data.train.labels.tolist() == [l for b in batches for l in b[1]]
    assert np.array_equal(data.test.images.numpy(), test.reshape(-1, 3, 32, 32))
    assert data.test.labels.tolist() == [9, 0, 4]
    assert data.classes[0] == "airplane" and data.classes[9] == "truck" and data.num_classes == 10
    # the official CCFS / SRe2L constants (issue 14), not the set's own std (0.2470, 0.2435, 0.2616)
    assert data.norm == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_release_layout_loads_through_the_restricted_unpickler(tmp_path, protocol):
    """Every entry of a real data_batch (batch_label, labels, data, filenames), protocols 2 and the newest."""
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(str(folder), np.random.default_rng(0))
    data = np.random.default_rng(3).integers(0, 256, (4, 3072), dtype=np.uint8)
    write_pickle(folder / "data_batch_2", {b"batch_label": b"training batch 2 of 5", b"labels": [3, 1, 4, 1],
                                           b"data": data, b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"]},
                 protocol)
    write_pickle(folder / "batches.meta", {b"num_cases_per_batch": 10000, b"label_names": [b"x%d" % i for i in range(10)],
                                           b"num_vis": 3072}, protocol)
    loaded = load_real(cfg("cifar10", tmp_path))
    assert np.array_equal(loaded.train.images[2:6].numpy(), data.reshape(-1, 3, 32, 32))
    assert loaded.train.labels[2:6].tolist() == [3, 1, 4, 1] and loaded.classes[9] == "x9"


class Payload:
    """A pickle that runs a shell command when loaded (as an attacker would plant one)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["data_batch_1", "batches.meta"])
def test_cifar_pickle_payload_does_not_run(tmp_path, name):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(str(folder), np.random.default_rng(0))
    marker = tmp_path / "pwned"
    obj = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": Payload(marker)}
    if name == "batches.meta":
        obj = {b"label_names": [Payload(marker)] * 10}
    write_pickle(folder / name, obj)
    with pytest.raises(DataError) as e:
        load_real(cfg("cifar10", tmp_path))
    assert not marker.exists()
    assert str(folder / name) in str(e.value) and "'posix.system'" in str(e.value), str(e.value)


@pytest.mark.parametrize("entry, words", [
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "is a float32 array, expected a uint8"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["cat", "dog"]}, "must be a list of integer"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": 7}, "must be a list of integer"),
    ({b"data": [[0] * 3072] * 2, b"labels": [0, 1]}, "b'data' is list"),
    ([1, 2], "expected a dict")])
def test_cifar_batch_of_wrong_types(tmp_path, entry, words):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(str(folder), np.random.default_rng(0))
    write_pickle(folder / "data_batch_4", entry)
    with pytest.raises(DataError, match=re.escape(words)) as e:
        load_real(cfg("cifar10", tmp_path))
    assert "data_batch_4" in str(e.value)


@pytest.mark.parametrize("meta", [[b"a"] * 10, 5, {b"label_names": b"abc"}])
def test_cifar_meta_that_is_not_a_dict_of_names(tmp_path, meta):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(str(folder), np.random.default_rng(0))
    write_pickle(folder / "batches.meta", meta)
    with pytest.raises(DataError, match="batches.meta"):
        load_real(cfg("cifar10", tmp_path))


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    write_pickle(folder / "train", {b"data": train, b"fine_labels": [99, 5, 0, 42], b"coarse_labels": [1, 2, 3, 4]})
    write_pickle(folder / "test", {b"data": train[:2], b"fine_labels": [7, 8], b"coarse_labels": [0, 0]})
    write_pickle(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                   b"coarse_label_names": [b"x"] * 20})
    data = load_real(cfg("cifar100", tmp_path))
    assert np.array_equal(data.train.images.numpy(), train.reshape(-1, 3, 32, 32))
    assert data.train.labels.tolist() == [99, 5, 0, 42] and data.test.labels.tolist() == [7, 8]
    assert data.classes == [f"c{i}" for i in range(100)]
    # CIFAR-100 is normalised with the CIFAR-10 constants, as ccfs_cifar100.py and SRe2L's squeeze do (issue 14)
    assert data.norm == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    own = load_real(dict(cfg("cifar100", tmp_path), mean=[0.5071, 0.4865, 0.4409], std=[0.2673, 0.2564, 0.2762]))
    assert own.norm == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    with pytest.raises(ConfigError, match="'data.mean' has 1 value"):
        load_real(dict(cfg("cifar100", tmp_path), mean=[0.5]))


def test_cifar_missing_file_names_file_and_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(str(folder), np.random.default_rng(0))
    os.remove(folder / "data_batch_3")
    with pytest.raises(DataError) as e:
        load_real(cfg("cifar10", tmp_path))
    assert f"{folder}: data_batch_3 (" in str(e.value)  # names the folder and only the missing file


def test_missing_root_folder(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_real(cfg("cifar10", tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------- Tiny-ImageNet

def test_tiny_imagenet_order_and_val_labels(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n03", "n01", "n02"]  # written unsorted: classes must be sorted
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    colors = {}
    for k, wnid in enumerate(wnids):
        for i in (1, 0):  # written in reverse order: files must be sorted
            color = (40 * k + 20 * i, 10, 200 - 50 * k)
            mode = "L" if (wnid, i) == ("n02", 0) else "RGB"
            save_image(str(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG"), (64, 64),
                       color[0] if mode == "L" else color, mode)
            colors[(wnid, i)] = (color[0],) * 3 if mode == "L" else color
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
    val = [("val_1.JPEG", "n02"), ("val_0.JPEG", "n03"), ("val_2.JPEG", "n01")]
    for name, wnid in val:
        save_image(str(root / "val" / "images" / name), (64, 64), (0, 0, 0))
    (root / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t63\t63\n" for n, w in val))

    data = load_real(cfg("tiny-imagenet", tmp_path))  # parent of tiny-imagenet-200
    assert data.classes == ["n01", "n02", "n03"]
    assert data.train.images.shape == (6, 3, 64, 64)
    assert data.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    order = [(w, i) for w in data.classes for i in (0, 1)]
    got = data.train.images.float().mean(dim=(2, 3))
    want = torch.tensor([colors[o] for o in order], dtype=torch.float32)
    assert torch.allclose(got, want, atol=3)  # JPEG of a flat colour is near exact
    assert data.test.labels.tolist() == [2, 1, 0]  # val_0, val_1, val_2
    assert data.norm.mean == (0.4802, 0.4481, 0.3975)


def test_tiny_imagenet_wnids_mismatch(tmp_path):
    save_image(str(tmp_path / "train" / "n01" / "images" / "a.JPEG"), (64, 64), (1, 2, 3))
    (tmp_path / "wnids.txt").write_text("n01\nn09\n")
    with pytest.raises(DataError, match="n09"):
        load_real(cfg("tiny-imagenet", tmp_path))


# ------------------------------------------------------------------------------------ imagefolder

def make_imagefolder(root, sizes, texture=False):
    """train/{dog,cat}/..., val/{cat,dog}/...; files created out of name order; flat colours unless texture."""
    specs = [("train/dog/b.png", (255, 0, 0)), ("train/dog/a.PNG", (0, 255, 0)),
             ("train/cat/z.jpg", (0, 0, 255)), ("train/cat/sub/c.png", (9, 9, 9)),
             ("train/cat/m.bmp", (100, 50, 25)), ("val/cat/v.png", (1, 2, 3)), ("val/dog/w.png", (3, 2, 1))]
    rng = np.random.default_rng(0)
    for (rel, color), size in zip(specs, sizes):
        save_image(str(root / rel), size, color)
        if texture:
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / rel)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def test_imagefolder_order_matches_torchvision_and_resizes(tmp_path):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import CenterCrop, Compose, Resize
    sizes = [(40, 30), (32, 32), (20, 50), (24, 24), (33, 17), (16, 16), (50, 20)]
    make_imagefolder(tmp_path, sizes, texture=True)
    data = load_real(cfg("imagefolder", tmp_path, image_size=16))
    ref = ImageFolder(str(tmp_path / "train"), transform=Compose([Resize(16), CenterCrop(16)]))
    assert data.classes == ref.classes == ["cat", "dog"]
    assert data.train.labels.tolist() == [t for _, t in ref.samples]
    expected = torch.stack([torch.from_numpy(np.array(ref[i][0])).permute(2, 0, 1) for i in range(len(ref))])
    assert data.train.images.shape == (5, 3, 16, 16) and torch.equal(data.train.images, expected)
    assert data.test.images.shape == (2, 3, 16, 16) and data.test.labels.tolist() == [0, 1]
    mean, std = channel_stats(data.train.images)
    x = data.train.images.double().div(255).transpose(0, 1).reshape(3, -1)
    assert data.norm.mean == mean == pytest.approx(tuple(x.mean(1).tolist()))
    assert data.norm.std == std == pytest.approx(tuple(x.std(1, unbiased=False).tolist()))


def test_imagefolder_native_size_and_test_folder(tmp_path):
    make_imagefolder(tmp_path, [(12, 12)] * 7)
    os.rename(tmp_path / "val", tmp_path / "test")
    data = load_real(cfg("imagefolder", tmp_path))
    assert data.image_size == 12 and len(data.train) == 5 and len(data.test) == 2
    # torchvision walk order: cat/m.bmp, cat/z.jpg, cat/sub/c.png, dog/a.PNG, dog/b.png
    assert data.train.images[0, :, 0, 0].tolist() == [100, 50, 25]
    assert data.train.images[2, :, 0, 0].tolist() == [9, 9, 9]
    assert data.train.images[3, :, 0, 0].tolist() == [0, 255, 0]


def test_imagefolder_mixed_sizes_need_image_size(tmp_path):
    make_imagefolder(tmp_path, [(12, 12)] * 2 + [(14, 14)] + [(12, 12)] * 4)
    with pytest.raises(DataError) as e:
        load_real(cfg("imagefolder", tmp_path))
    assert "data.image_size" in str(e.value) and "z.jpg" in str(e.value)
    make_imagefolder(tmp_path, [(12, 12)] * 4 + [(12, 13)] + [(12, 12)] * 2)  # first file not square
    with pytest.raises(DataError, match="m.bmp.*not square"):
        load_real(cfg("imagefolder", tmp_path))


def test_shards_of_an_image_folder_check_its_root_and_size_as_loading_does(tmp_path):
    """`ccfs shards` from an image folder refuses what loading it refuses (memory.source_root, images.square_side)."""
    from ccfs_dist.data.shards.writer import write_shards
    folder = cfg("imagefolder", tmp_path / "data")
    with pytest.raises(ConfigError, match="needs 'data.root'"):
        write_shards(dict(folder, root=None), str(tmp_path / "out"))
    with pytest.raises(DataError, match="data.root folder not found"):
        write_shards(folder, str(tmp_path / "out"))
    (tmp_path / "data").mkdir()
    make_imagefolder(tmp_path / "data", [(12, 12)] * 4 + [(12, 13)] + [(12, 12)] * 2)  # first file not square
    with pytest.raises(DataError, match="m.bmp.*not square"):
        write_shards(folder, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_imagefolder_test_size_must_match_train(tmp_path):
    make_imagefolder(tmp_path, [(12, 12)] * 5 + [(14, 14)] * 2)
    with pytest.raises(DataError, match="data.image_size"):
        load_real(cfg("imagefolder", tmp_path))


def test_imagefolder_class_mismatch(tmp_path):
    make_imagefolder(tmp_path, [(8, 8)] * 7)
    os.rename(tmp_path / "val" / "dog", tmp_path / "val" / "wolf")
    with pytest.raises(DataError) as e:
        load_real(cfg("imagefolder", tmp_path))
    assert "dog" in str(e.value) and "wolf" in str(e.value)


def test_corrupt_image_named(tmp_path):
    make_imagefolder(tmp_path, [(8, 8)] * 7)
    (tmp_path / "train" / "dog" / "c.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError) as e:
        load_real(cfg("imagefolder", tmp_path))
    assert str(tmp_path / "train" / "dog" / "c.png") in str(e.value)


# --------------------------------------------------------------------------------- distilled set

CLASSES = ["cat", "dog", "eel"]


def random_set(channels, per_class=(2, 3, 1), size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([c for c, n in enumerate(per_class) for _ in range(n)])
    labels = labels[torch.randperm(len(labels), generator=g)]  # interleaved on input
    images = torch.randint(0, 256, (len(labels), channels, size, size), dtype=torch.uint8, generator=g)
    return images, labels


@pytest.mark.parametrize("channels", [1, 3])
def test_write_then_load_distilled_roundtrip(tmp_path, channels):
    images, labels = random_set(channels, per_class=(2, 2, 2))
    out = tmp_path / "distilled"
    write_image_folder(out, images, labels, CLASSES)
    assert sorted(os.listdir(out)) == ["new000", "new001", "new002"]
    assert sorted(os.listdir(out / "new001")) == ["class001_id000.png", "class001_id001.png"]
    assert Image.open(out / "new000" / "class000_id000.png").mode == ("L" if channels == 1 else "RGB")
    split = load_distilled(out, CLASSES, 2, channels, 8)
    order = torch.argsort(labels, stable=True)  # class, then write order
    assert split.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert split.images.dtype == torch.uint8 and torch.equal(split.images, images[order])
    first = load_distilled(out, CLASSES, 1, channels, 8)
    assert torch.equal(first.images, images[order][::2])
    empty = load_distilled(tmp_path / "absent", CLASSES, 0, channels, 8)
    assert empty.images.shape == (0, channels, 8, 8) and len(empty) == 0


def test_write_image_folder_replaces_atomically(tmp_path, monkeypatch):
    out = tmp_path / "distilled"
    images, labels = random_set(3, per_class=(1, 1, 1))
    write_image_folder(out, images, labels, CLASSES)
    (out / "stray.txt").write_text("old")
    write_image_folder(out, images, labels, CLASSES)
    assert not (out / "stray.txt").exists() and os.listdir(tmp_path) == ["distilled"]

    (out / "stray.txt").write_text("old")
    real_save, calls = Image.Image.save, []

    def failing_save(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(self, *a, **k)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_image_folder(out, images, labels, CLASSES)
    assert (out / "stray.txt").read_text() == "old"  # old folder intact
    assert os.listdir(tmp_path) == ["distilled"]  # no temp folder left behind


def write_named(folder, names, per_class=2, size=8):
    for c, name in enumerate(names):
        for i in range(per_class):
            save_image(str(folder / name / f"{i:02d}.png"), (size, size), (10 * c, 20 * i, 99))


@pytest.mark.parametrize("names", [["cat", "dog", "eel"], ["0", "1", "2"], ["000", "001", "002"],
                                   ["new000", "new001", "new002"], ["new002", "cat", "1"]])
def test_distilled_folder_naming_variants(tmp_path, names):
    write_named(tmp_path, names)
    split = load_distilled(tmp_path, CLASSES, 2, 3, 4, resize=True)  # stored at 8x8: resized to 4x4 (opt-in)
    assert split.images.shape == (6, 3, 4, 4) and split.labels.tolist() == [0, 0, 1, 1, 2, 2]
    label_of = {"cat": 0, "dog": 1, "eel": 2, "new002": 2, "1": 1}
    for name in names:
        c = label_of[name] if name in label_of else int(name.removeprefix("new"))
        color = 10 * names.index(name)
        assert split.images[2 * c + 1, :, 0, 0].tolist() == [color, 20, 99]


@pytest.mark.parametrize("size, mode, color, words", [(16, "RGB", (1, 2, 3), "is 16x16, expected 8x8"),
                                                       (8, "L", 7, "image mode L, expected colour (RGB)"),
                                                       (8, "RGBA", (1, 2, 3, 4), "image mode RGBA, expected colour")])
def test_distilled_of_another_size_or_mode_needs_the_opt_in(tmp_path, size, mode, color, words):
    write_named(tmp_path, ["cat", "dog", "eel"], size=8)
    save_image(str(tmp_path / "dog" / "01.png"), (size, size), color, mode=mode)
    with pytest.raises(DataError, match=re.escape(words)) as e:
        load_distilled(tmp_path, CLASSES, 2, 3, 8)
    assert str(tmp_path / "dog" / "01.png") in str(e.value) and "data.distilled_resize=true" in str(e.value)
    split = load_distilled(tmp_path, CLASSES, 2, 3, 8, resize=True)
    assert split.images.shape == (6, 3, 8, 8)


def test_distilled_missing_and_extra_classes(tmp_path):
    write_named(tmp_path, ["new000", "new002", "zebra"])
    with pytest.raises(DataError) as e:
        load_distilled(tmp_path, CLASSES, 2, 3, 8)
    msg = str(e.value)
    assert "1 (dog)" in msg and "zebra" in msg and str(tmp_path) in msg


def test_distilled_duplicate_class_folder(tmp_path):
    write_named(tmp_path, ["cat", "dog", "eel", "new001"])
    with pytest.raises(DataError, match="new001"):
        load_distilled(tmp_path, CLASSES, 2, 3, 8)


def test_distilled_too_few_images(tmp_path):
    write_named(tmp_path, ["cat", "dog", "eel"], per_class=2)
    os.remove(tmp_path / "dog" / "01.png")
    (tmp_path / "dog" / "readme.txt").write_text("not an image")
    with pytest.raises(DataError) as e:
        load_distilled(tmp_path, CLASSES, 2, 3, 8)
    msg = str(e.value)
    assert str(tmp_path / "dog") in msg and "holds 1 images" in msg and "need 2" in msg


def test_digits_read_without_sklearn_equal_load_digits(monkeypatch):
    """The digits CSV read directly gives scikit-learn's arrays, and so does the load_digits fallback."""
    import ccfs_dist.data.memory as memory
    from sklearn.datasets import load_digits
    bunch = load_digits()
    images, labels = memory.digits_arrays()
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)
    monkeypatch.setattr(memory.os.path, "isfile", lambda path: False)      # the file moved: the fallback
    images, labels = memory.digits_arrays()
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)


def flat_imagenet(tmp_path, labels_file=None):
    """An ImageNet-shaped folder: train/<wnid>/ and a flat val/ of ILSVRC2012_val_*.JPEG."""
    wnids = ["n01440764", "n01443537"]
    for c, wnid in enumerate(wnids):
        os.makedirs(tmp_path / "train" / wnid)
        save_image(str(tmp_path / "train" / wnid / f"{wnid}_1.JPEG"), (8, 8), (100 * c, 0, 0))
    os.makedirs(tmp_path / "val")
    truth = ["n01443537", "n01440764", "n01443537"]
    for i, wnid in enumerate(truth, 1):
        save_image(str(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG"), (8, 8), (0, 50 * i, 0))
    if labels_file == "LOC_val_solution.csv":
        rows = [f"ILSVRC2012_val_{i:08d},{w} 10 20 30 40 {w} 1 2 3 4" for i, w in enumerate(truth, 1)]
        (tmp_path / labels_file).write_text("ImageId,PredictionString\n" + "\n".join(reversed(rows)) + "\n")
    elif labels_file:
        (tmp_path / "val" / labels_file).write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG {w}\n"
                                                           for i, w in enumerate(truth, 1)))
    return truth


@pytest.mark.parametrize("labels_file", ["LOC_val_solution.csv", "val_labels.txt"])
def test_imagenet_flat_validation_folder_with_its_ground_truth(tmp_path, labels_file):
    from ccfs_dist.data.folders import image_files
    flat_imagenet(tmp_path, labels_file)
    files, labels, classes = image_files("imagefolder", str(tmp_path), "test")
    assert classes == ["n01440764", "n01443537"]
    assert [os.path.basename(f) for f in files] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (1, 2, 3)]
    assert labels == [1, 0, 1]


def test_imagenet_flat_validation_folder_without_ground_truth_says_what_to_add(tmp_path):
    from ccfs_dist.data.folders import image_files
    flat_imagenet(tmp_path)
    with pytest.raises(DataError, match="holds 3 images and no class sub-folders .* LOC_val_solution.csv"):
        image_files("imagefolder", str(tmp_path), "test")
    (tmp_path / "val_labels.txt").write_text("ILSVRC2012_val_00000001 n01443537\nILSVRC2012_val_00000002 n09999999\n")
    with pytest.raises(DataError, match="labelled 'n09999999', which is not a class"):
        image_files("imagefolder", str(tmp_path), "test")
    (tmp_path / "val_labels.txt").write_text("ILSVRC2012_val_00000001 n01443537\n")
    with pytest.raises(DataError, match="ILSVRC2012_val_00000002.JPEG has no line in"):
        image_files("imagefolder", str(tmp_path), "test")


# ------------------------------------------------------------------------------------- data.validation

def test_validation_split_is_carved_from_train_stratified_disjoint_and_fixed():
    full = load_real(cfg("digits"))
    data = load_real(dict(cfg("digits"), validation=True))
    pool, val = data.train, data.test
    # every image of the carve comes from the training split, none from the test split: each training row
    # lands in exactly one of pool / validation, in source order (rows identified by image and label)
    def rows(split):
        return [(bytes(i.numpy().tobytes()), int(l)) for i, l in zip(split.images, split.labels)]
    train_rows, pool_rows, val_rows = rows(full.train), rows(pool), rows(val)
    assert len(pool_rows) + len(val_rows) == len(train_rows) == 1437
    in_val = set(val_rows)
    assert [r for r in train_rows if r not in in_val] == pool_rows       # the pool: the rest, in order
    assert sorted(val_rows) == sorted(r for r in train_rows if r in in_val)
    assert not in_val & set(pool_rows)
    assert not in_val & set(rows(full.test))
    # stratified: round(20 %) of every class
    counts = torch.bincount(full.train.labels, minlength=10)
    assert torch.bincount(val.labels, minlength=10).tolist() == [int(round(0.2 * int(n))) for n in counts]
    # fixed: the same carve on every load (seeded, not the run's seed), and not simply the first rows
    again = load_real(dict(cfg("digits"), validation=True))
    assert torch.equal(again.test.images, val.images) and torch.equal(again.train.labels, pool.labels)
    first = torch.cat([torch.nonzero(full.train.labels == c).flatten()[:int(round(0.2 * int(n)))]
                       for c, n in enumerate(counts)])
    assert not torch.equal(torch.sort(first).values, torch.arange(len(first)))
    assert sorted(val_rows) != sorted(train_rows[i] for i in first.tolist())
    assert data.norm == full.norm


def test_validation_never_reads_the_test_split(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(str(folder), np.random.default_rng(0))      # 1 image per class: nothing to carve
    with pytest.raises(DataError, match="too few to carve"):
        load_real(dict(cfg("cifar10", folder), validation=True))
    rng = np.random.default_rng(1)
    for i in range(1, 6):                                    # 10 images a batch: 5 per class
        write_pickle(folder / f"data_batch_{i}", {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                                                  b"labels": list(range(10))})
    with open(folder / "test_batch", "wb") as f:
        f.write(b"not a pickle")                             # reading it would fail
    data = load_real(dict(cfg("cifar10", folder), validation=True))
    assert len(data.train) == 40 and sorted(data.test.labels.tolist()) == list(range(10))
    with pytest.raises(DataError):
        load_real(cfg("cifar10", folder))


def test_validation_refuses_score_files_and_streamed_pools():
    from ccfs_dist.config import load_config
    with pytest.raises(ConfigError, match="data.validation.*difficulty"):
        load_config(None, ["data.validation=true", "ccfs.difficulty=file", "ccfs.difficulty_file=s.npy"])
    with pytest.raises(ConfigError, match="data.validation.*in-memory"):
        load_config(None, ["data.validation=true", "data.source=webdataset", "data.root=x.json"])
    assert load_config(None, ["data.validation=true"])["data"]["validation"] is True
