"""train.synthetic: a set held in a shared .npy file gives the same training as a resident one; its file is
written whole or not at all (the whole-run comparisons are in test_scaleout.py and test_resume.py)."""
import os

import numpy as np
import pytest
import torch

from ccfs_dist.data import synthetic
from ccfs_dist.runtime.dist import OneRankAccelerator, make_accelerator
from ccfs_dist.training.models import build_model
from ccfs_dist.data.pool import Norm, TensorPool
from ccfs_dist.training.train import Recipe, train_model

NORM = Norm((0.5,), (0.25,))


@pytest.fixture(scope="module")
def acc():
    return OneRankAccelerator(make_accelerator())


def pool(n=90, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorPool(torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g),
                      torch.arange(n, dtype=torch.int64) % 3)


def trained(acc, images, labels, **recipe):
    torch.manual_seed(0)
    model = build_model({"name": "convnet", "width": 8, "depth": 2, "norm": "batchnorm"}, 3, 1, 8)
    # batch 16 of 40: the last batch wraps around; several batches are augmented per chunk
    rec = Recipe(epochs=3, batch_size=16, lr=0.05, **recipe)
    model, _ = train_model(acc, model, images, labels, rec, norm=NORM, seed=5)
    return model.state_dict()


@pytest.mark.parametrize("recipe", [{}, {"channels_last": True, "crop": "pad"}])
def test_training_on_a_shared_set_equals_resident(acc, tmp_path, recipe):
    data = pool()
    index = np.random.default_rng(1).permutation(len(data))[:30]
    parts = [synthetic.Resident(data.images[:10], data.labels[:10]), (data, index)]
    resident = synthetic.build(acc, "resident", None, parts, data.shape)
    shared = synthetic.build(acc, "shared", str(tmp_path / "S.npy"), parts, data.shape)
    assert isinstance(shared.images, np.memmap) and not shared.images.flags.writeable
    assert np.array_equal(shared.images, resident.images.numpy())
    assert torch.equal(shared.labels, resident.labels) and len(shared) == len(resident) == 40
    a = trained(acc, resident.images, resident.labels, **recipe)
    b = trained(acc, shared.images, shared.labels, **recipe)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_set_built_from_a_shared_one_copies_it_in_pieces(acc, tmp_path, monkeypatch):
    data = pool()
    first = synthetic.build(acc, "shared", str(tmp_path / "S_0.npy"), [(data, np.arange(20, 33))], data.shape)
    monkeypatch.setattr(synthetic, "COPY_BYTES", 3 * 64)        # 3 rows a piece
    second = synthetic.build(acc, "shared", str(tmp_path / "S_1.npy"), [first, (data, np.array([5, 2]))], data.shape)
    assert np.array_equal(second.images, data.images[list(range(20, 33)) + [5, 2]].numpy())
    synthetic.drop(acc, first)
    assert not os.path.exists(first.path) and os.path.exists(second.path)


def test_a_failed_write_leaves_no_set_file(acc, tmp_path, monkeypatch):
    data = pool()

    def failing(index, accelerator=None, batch_size=256):
        yield np.arange(2), data.images[:2]
        raise OSError("disk full")
    monkeypatch.setattr(data, "fetch_shares", failing)
    path = tmp_path / "S_1.npy"
    with pytest.raises(OSError):
        synthetic.build(acc, "shared", str(path), [(data, np.arange(5))], data.shape)
    assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".S_1.npy.shared.tmp"]   # hidden: Run.open removes it


def test_fetch_shares_needs_unique_indices(tmp_path):
    from ccfs_dist.data.shards.reader import ShardPool
    from ccfs_dist.data.shards.writer import write_shards
    write_shards({"source": "digits", "root": None, "image_size": None}, tmp_path, per_shard=500, workers=1,
                 log=lambda *_: None)
    split = ShardPool(tmp_path / "train.json")
    with pytest.raises(ValueError, match="unique"):
        list(split.fetch_shares([3, 3]))
    got = {}
    for positions, images in split.fetch_shares([700, 3, 1200]):
        got.update(zip(positions.tolist(), images))
    memory = split.fetch([700, 3, 1200])[0]
    assert sorted(got) == [0, 1, 2] and all(torch.equal(got[p], memory[p]) for p in got)
