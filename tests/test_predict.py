import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ccfs_dist.training.predict import check_exactly_once, per_sample

from conftest import ROOT

WORKER = os.path.join(ROOT, "tests", "workers", "score_worker.py")


def test_per_sample_fields():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 2])
    r = per_sample(logits, labels)
    assert r["pred"].tolist() == [0, 1]
    assert r["true_logit"].tolist() == [2.0, 1.0]
    assert r["margin"].tolist() == [1.0, -2.0]
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(r["loss"], expected)


def test_exactly_once_reports_missing_and_duplicates():
    check_exactly_once([3, 1, 2], [1, 2, 3])
    with pytest.raises(RuntimeError) as err:
        check_exactly_once([0, 1, 2, 3], [0, 1, 1, 7])
    msg = str(err.value)
    assert "2 missing (first [2, 3])" in msg and "1 duplicated (first [1])" in msg and "1 unexpected (first [7])" in msg


def test_scores_equal_with_one_and_two_processes(tmp_path, launch):
    """The whole pool and an uneven, shuffled part of it (one worker start per process count)."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, WORKER, str(one)], check=True, env=env, timeout=300)
    proc = launch([WORKER, str(two)], processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, n in (("full", 1437), ("subset", 1001)):
        a, b = np.load(one / f"{name}.npz"), np.load(two / f"{name}.npz")
        assert int(a["world"]) == 1 and int(b["world"]) == 2
        assert len(a["index"]) == n and np.array_equal(a["index"], np.sort(a["index"]))
        for key in ("index", "label", "pred"):
            assert np.array_equal(a[key], b[key]), (name, key)
        for key in ("true_logit", "margin", "loss"):   # same weights, same inputs: only float reduction order differs
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)
