"""Tests for ccfs_dist.ccfs.difficulty: score direction and score-file loading/validation."""
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from ccfs_dist.ccfs.difficulty import HARDER_IS_HIGHER, load_score_file, to_hardness
from ccfs_dist.errors import ConfigError, DataError

OFFICIAL = Path(os.environ.get("CCFS_OFFICIAL_SCORES",
                              Path(__file__).resolve().parents[2] / "shared" / "reference" / "ccfs-official-scores"))
needs_official = pytest.mark.skipif(not OFFICIAL.is_dir(), reason=f"official score files not found at {OFFICIAL}")


# --------------------------------------------------------------------------- direction


def test_direction_table():
    assert HARDER_IS_HIGHER == {"forgetting": True, "loss": True, "el2n": True,
                                "cscore": False, "margin": False, "logits": False}


@pytest.mark.parametrize("method", sorted(HARDER_IS_HIGHER))
def test_to_hardness(method):
    scores = np.array([0.0, 2.5, 1.0], dtype=np.float32)
    h = to_hardness(scores, method)
    assert h.dtype == np.float64
    expected = [0.0, 2.5, 1.0] if HARDER_IS_HIGHER[method] else [-0.0, -2.5, -1.0]
    assert h.tolist() == expected
    # the easiest sample ("simple" first) is the one with the smallest hardness
    easiest = int(np.argmin(h))
    assert easiest == (0 if method in ("forgetting", "loss", "el2n") else 1)
    h[0] = 99
    assert scores[0] == 0.0  # no aliasing of the input


def test_to_hardness_unknown():
    with pytest.raises(ConfigError, match="unknown difficulty method 'bogus'"):
        to_hardness(np.zeros(3), "bogus")


# --------------------------------------------------------------------------- official files


@needs_official
@pytest.mark.parametrize("name,n", [("forgetting_CIFAR10.npy", 50000), ("forgetting_CIFAR100.npy", 50000),
                                    ("forgetting_Tiny.npy", 100000)])
def test_official_forgetting(name, n):
    scores, method = load_score_file(OFFICIAL / name, n)
    assert method == "forgetting" and scores.dtype == np.float64 and scores.shape == (n,)
    assert scores.min() >= 0 and 50 < scores.max() < 62
    with pytest.raises(DataError, match=f"expected {n + 1}.*got {n}"):
        load_score_file(OFFICIAL / name, n + 1)


@needs_official
@pytest.mark.parametrize("name,classes", [("cscores_CIFAR10.npz", 10), ("cscores_CIFAR100.npz", 100)])
def test_official_cscore(name, classes):
    with np.load(OFFICIAL / name) as z:
        labels = z["labels"]
    assert labels.max() == classes - 1
    scores, method = load_score_file(OFFICIAL / name, 50000, labels=labels)
    assert method == "cscore" and scores.shape == (50000,) and 0 <= scores.min() <= scores.max() <= 1
    wrong = labels.copy()
    wrong[[7, 123]] = (wrong[[7, 123]] + 1) % classes
    with pytest.raises(DataError, match=r"2 of 50000 labels differ.*first mismatching indices \[7, 123\]"):
        load_score_file(OFFICIAL / name, 50000, labels=wrong)
    # method argument overrides the default
    assert load_score_file(OFFICIAL / name, 50000, method="forgetting")[1] == "forgetting"


# --------------------------------------------------------------------------- own files and errors


def test_npy_default_and_sidecar(tmp_path):
    path = tmp_path / "scores.npy"
    np.save(path, np.arange(5, dtype=np.float32))
    scores, method = load_score_file(path, 5)
    assert method == "forgetting" and scores.tolist() == [0, 1, 2, 3, 4] and scores.dtype == np.float64
    (tmp_path / "scores.json").write_text(json.dumps({"method": "el2n", "runs": 3}))
    assert load_score_file(path, 5)[1] == "el2n"                   # sidecar wins over the default
    assert load_score_file(path, 5, method="loss")[1] == "loss"    # argument wins over the sidecar


def test_npz_own(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, scores=np.linspace(0, 1, 4), labels=np.array([0, 1, 0, 1]))
    scores, method = load_score_file(path, 4, labels=[0, 1, 0, 1])
    assert method == "cscore" and scores.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.npy not found.*ccfs\.difficulty"):
        load_score_file(tmp_path / "nope.npy", 5)


def test_pickled_object_array_refused(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([1.0, "x", None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy.*pickled.*refused"):
        load_score_file(path, 3)
    pz = tmp_path / "obj.npz"
    np.savez(pz, scores=np.array([1.0, None], dtype=object), labels=np.array([0, 1]))
    with pytest.raises(DataError, match="obj.npz.*pickled.*refused"):
        load_score_file(pz, 2)
    raw = tmp_path / "raw.npy"
    raw.write_bytes(pickle.dumps([1.0, 2.0]))
    with pytest.raises(DataError, match="raw.npy.*pickled objects are refused"):
        load_score_file(raw, 2)


def test_wrong_length(tmp_path):
    path = tmp_path / "s.npy"
    np.save(path, np.zeros(7))
    with pytest.raises(DataError, match=r"s\.npy.*expected 10.*got 7"):
        load_score_file(path, 10)


def test_not_1d(tmp_path):
    path = tmp_path / "s.npy"
    np.save(path, np.zeros((5, 2)))
    with pytest.raises(DataError, match=r"s\.npy.*1-D.*\(5, 2\)"):
        load_score_file(path, 5)


def test_nan_inf(tmp_path):
    path = tmp_path / "s.npy"
    a = np.zeros(20)
    a[[3, 11]] = np.nan
    a[15] = -np.inf
    np.save(path, a)
    with pytest.raises(DataError, match=r"s\.npy: 3 scores are NaN or inf \(first indices \[3, 11, 15\]\)"):
        load_score_file(path, 20)


def test_unknown_method(tmp_path):
    path = tmp_path / "s.npy"
    np.save(path, np.zeros(4))
    with pytest.raises(DataError, match=r"s\.npy: unknown difficulty method 'entropy'"):
        load_score_file(path, 4, method="entropy")
    (tmp_path / "s.json").write_text(json.dumps({"method": "entropy"}))
    with pytest.raises(DataError, match=r"s\.npy: unknown difficulty method 'entropy'"):
        load_score_file(path, 4)
    (tmp_path / "s.json").write_text(json.dumps({"runs": 3}))
    with pytest.raises(DataError, match="sidecar.*'method'"):
        load_score_file(path, 4)


def test_npz_missing_key_and_bad_labels(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, scores=np.zeros(4))
    with pytest.raises(DataError, match=r"c\.npz: missing key\(s\) \['labels'\]"):
        load_score_file(path, 4)
    np.savez(path, scores=np.zeros(4), labels=np.zeros(3, dtype=int))
    with pytest.raises(DataError, match=r"c\.npz.*labels.*expected 4.*got 3"):
        load_score_file(path, 4)


def test_wrong_format(tmp_path):
    txt = tmp_path / "s.txt"
    txt.write_text("1 2 3")
    with pytest.raises(DataError, match="unsupported type"):
        load_score_file(txt, 3)
    fake = tmp_path / "s.npy"
    fake.write_text("1 2 3")
    with pytest.raises(DataError, match="neither a numpy .npy file nor an .npz"):
        load_score_file(fake, 3)
    swapped = tmp_path / "t.npy"
    with open(swapped, "wb") as f:
        np.savez(f, scores=np.zeros(3), labels=np.zeros(3))
    with pytest.raises(DataError, match="holds an .npz file; rename it"):
        load_score_file(swapped, 3)
    strings = tmp_path / "u.npy"
    np.save(strings, np.array(["a", "b"]))
    with pytest.raises(DataError, match="must be numbers"):
        load_score_file(strings, 2)
