"""Tests for ccfs_dist.training.scores (`ccfs scores`): training dynamics, planted hard samples, 1 vs 2 processes,
score files with their sidecar and labels fingerprint, and selection with computed scores."""
import importlib.util
import inspect
import json
import os

import numpy as np
import pytest
import torch

from conftest import ROOT
from ccfs_dist import cli
from ccfs_dist.bench.stream_pools import auroc, spearman
from ccfs_dist.ccfs import curriculum
from ccfs_dist.config import load_config
from ccfs_dist.data.sources import load_real
from ccfs_dist.ccfs.difficulty import labels_fingerprint, load_score_file, to_hardness
from ccfs_dist.runtime.dist import make_accelerator
from selection_check import recheck_run
from ccfs_dist.errors import ConfigError, DataError
from ccfs_dist.training.models import build_model, state_dict_of
from ccfs_dist.training.scores import (DYNAMICS, TrainingDynamics, compute_score_files, compute_scores,
                                       gaussian_last_weights, training_dynamics)
from ccfs_dist.ccfs.selection import select

WORKER = os.path.join(ROOT, "tests", "workers", "scores_worker.py")
DIGITS = os.path.join(ROOT, "configs", "default.yaml")
_spec = importlib.util.spec_from_file_location("scores_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

# A short recipe on the digits demo config (ConvNet-D3, BatchNorm): about 3 s on one CPU core.
QUICK = ["scores.runs=2", "scores.epochs=20"]


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator()


@pytest.fixture(scope="module")
def planted():
    return worker.planted_digits()


@pytest.fixture(scope="module")
def quick_scores(accelerator, planted):
    data, _ = planted
    return training_dynamics(accelerator, load_config(DIGITS, QUICK), data)[0]


# --------------------------------------------------------------------------- pieces


def test_auroc_helper():
    assert auroc([0.1, 0.2, 0.9, 0.8], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.1, 0.2], [False, False, True, True]) == 0.0
    assert auroc([1, 1, 1, 1], [False, True, False, True]) == 0.5


@pytest.mark.parametrize("epochs", [1, 2, 5, 13, 30, 100])
def test_loss_smoothing_weights_equal_scipy(epochs):
    ndimage = pytest.importorskip("scipy.ndimage")
    w = gaussian_last_weights(epochs, 3.0)
    assert w.shape == (epochs,) and w.sum() == pytest.approx(1.0)
    curves = np.random.default_rng(epochs).random((4, epochs))
    expected = ndimage.gaussian_filter1d(curves, 3.0, axis=1)[:, -1]
    np.testing.assert_allclose(curves @ w, expected, rtol=1e-12, atol=1e-12)


class FakeAccelerator:
    def __init__(self, rank=0, world=1):
        self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")
        self.is_main_process = rank == 0


def logits_for(labels, correct):
    """Logits whose argmax is the label where `correct`, else label + 1."""
    labels = torch.as_tensor(labels)
    target = torch.where(torch.as_tensor(correct, dtype=torch.bool), labels, (labels + 1) % 3)
    return torch.nn.functional.one_hot(target, 3).float() * 5


def test_forgetting_rule_last_presentation_and_never_learned():
    """4 samples, 4 epochs; sample 3 is presented twice per epoch (wrap-around): the last one counts."""
    labels = torch.tensor([0, 1, 2, 0])
    rec = TrainingDynamics(FakeAccelerator(), labels, epochs=4, el2n_at=2, loss_weights=np.full(4, 0.25))
    # per epoch: correctness of samples 0..3 at their (last) presentation
    history = [[1, 0, 0, 1],
               [0, 0, 1, 0],
               [1, 0, 0, 1],
               [0, 0, 1, 1]]
    for epoch, row in enumerate(history):
        # step 0: samples 3, 0, 1 (sample 3's first presentation is the opposite of its last)
        first = torch.tensor([3, 0, 1])
        rec.on_batch(first, logits_for(labels[first], [not row[3], row[0], row[1]]))
        # step 1: samples 2, 3 (wrap-around: sample 3 again, the presentation that counts)
        last = torch.tensor([2, 3])
        rec.on_batch(last, logits_for(labels[last], [row[2], row[3]]))
        rec.end_epoch(epoch)
    result = rec.result()
    # sample 0: 1,0,1,0 -> 2 events; sample 1: never correct -> E = 4; sample 2: 0,1,0,1 -> 1;
    # sample 3: 1,0,1,1 -> 1 (with the first presentations counted instead it would differ)
    assert result["forgetting"].tolist() == [2, 4, 1, 1]
    assert result["forgetting"][rec.learned].max() <= 4 // 2 < 4
    assert np.all(result["loss"] > 0) and np.isfinite(result["el2n"]).all()


def test_observations_from_two_ranks_are_ordered_by_step_then_rank(monkeypatch):
    """Two simulated ranks: a sample seen by rank 1 at step 0 and by rank 0 at step 1 takes rank 0's."""
    labels = torch.tensor([0, 1, 2, 0])
    ranks = [TrainingDynamics(FakeAccelerator(r, 2), labels, 1, 1, np.ones(1)) for r in (0, 1)]
    ranks[0].on_batch(torch.tensor([0]), logits_for([0], [True]))
    ranks[1].on_batch(torch.tensor([1, 2]), logits_for([1, 2], [True, True]))
    ranks[0].on_batch(torch.tensor([3, 1]), logits_for([0, 1], [True, False]))   # wraps: 1 again, wrong
    ranks[1].on_batch(torch.tensor([0]), logits_for([0], [False]))               # wraps: 0 again, wrong
    parts = [{k: torch.cat([p[k] for p in r._parts]) for k in r._parts[0]} for r in ranks]
    both = {k: torch.cat([parts[0][k], parts[1][k]]) for k in parts[0]}
    monkeypatch.setattr("ccfs_dist.training.scores.gather_rows", lambda acc, local: both)
    for r in ranks:
        r.end_epoch(0)
    assert ranks[0].previous.tolist() == ranks[1].previous.tolist() == [False, False, True, True]


def test_missing_observation_is_an_error():
    rec = TrainingDynamics(FakeAccelerator(), torch.tensor([0, 1, 2]), 1, 1, np.ones(1))
    rec.on_batch(torch.tensor([0, 2]), logits_for([0, 2], [True, True]))
    with pytest.raises(RuntimeError, match=r"observed 2 of 3 samples \(first missing \[1\]\)"):
        rec.end_epoch(0)


# --------------------------------------------------------------------------- planted hard samples


@pytest.mark.parametrize("method", DYNAMICS)
def test_planted_label_noise_ranks_hardest(quick_scores, planted, method):
    """5 % of digits get a wrong label: every training-dynamics score must rank them as the hardest."""
    _, mask = planted
    scores = quick_scores[method]
    assert scores.dtype == np.float32 and scores.shape == mask.shape and np.isfinite(scores).all()
    value = auroc(to_hardness(scores, method), mask)
    print(f"{method}: AUROC of the planted samples {value:.4f}")
    assert value >= 0.9
    if method == "forgetting":                               # never learned (= epochs) only where planted
        assert scores.max() <= 20 and scores[~mask].mean() < 1 < scores[mask].mean()


def test_one_and_two_processes_agree(tmp_path, launch, accelerator):
    """Same seeds, 1 vs 2 processes (see the worker). whole: each run on one rank (the default rule), so
    the scores are bitwise equal. frozen, train: every run split over the ranks, ConvNet with per-sample
    normalisation:

    frozen (lr 0): the distributed bookkeeping alone; every rank sees the same augmented views (drawn
    for the global batch), so the scores must be equal (measured: bitwise).
    train: same function, same inputs, same initial weights; the only difference is floating-point
    order (gloo all-reduce of two half-batch gradients vs one full-batch gradient, ~1e-7 relative),
    which SGD amplifies over the epochs. Measured on this recipe: el2n (epoch 4) max |diff| 3e-4,
    loss (epoch 20) max 0.10 / mean 0.005, forgetting max 1.5 events / mean 0.035, Spearman >= 0.99.
    Asserted with ~3x margin: el2n within 1e-2, Spearman >= 0.97, forgetting mean |diff| <= 0.15
    events, and the planted samples found (AUROC >= 0.9) by both.
    """
    out = tmp_path / "two.npz"
    proc = launch([WORKER, str(out)], processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = dict(np.load(out))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # as the launched processes (OMP_NUM_THREADS=1): same threads, same numbers
    try:
        one = worker.compute_all(accelerator)
    finally:
        torch.set_num_threads(threads)
    assert int(one["world"]) == 1 and int(two["world"]) == 2
    mask = one["planted"]
    assert np.array_equal(mask, two["planted"])
    for method in DYNAMICS:                                   # runs dealt whole to ranks: the same numbers
        np.testing.assert_array_equal(one[f"whole_{method}"], two[f"whole_{method}"])
    np.testing.assert_array_equal(one["frozen_forgetting"], two["frozen_forgetting"])
    for method in ("loss", "el2n"):
        np.testing.assert_allclose(one[f"frozen_{method}"], two[f"frozen_{method}"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one["train_el2n"], two["train_el2n"], atol=1e-2)
    assert np.abs(one["train_forgetting"] - two["train_forgetting"]).mean() <= 0.15
    for method in DYNAMICS:
        a, b = one[f"train_{method}"], two[f"train_{method}"]
        rho = spearman(a, b)
        print(f"{method}: Spearman 1 vs 2 processes {rho:.4f}, AUROC {auroc(a, mask):.4f} / {auroc(b, mask):.4f}")
        assert rho >= 0.97
        assert auroc(a, mask) >= 0.9 and auroc(b, mask) >= 0.9


# --------------------------------------------------------------------------- files, CLI, selection


TINY = ["scores.runs=1", "scores.epochs=3", "model.width=8", "model.depth=2"]


def test_cli_writes_npy_and_sidecar(tmp_path, capsys):
    out = str(tmp_path / "d_{method}.npy")
    assert cli.main(["scores", "--config", DIGITS, "--method", "forgetting,loss,el2n", "--out", out] + TINY) == 0
    data_labels = np.asarray(load_real({"source": "digits"}).train.labels)
    for method in DYNAMICS:
        path = tmp_path / f"d_{method}.npy"
        raw = np.load(path, allow_pickle=False)
        assert raw.dtype == np.float32 and raw.shape == (1437,)
        meta = json.loads((tmp_path / f"d_{method}.json").read_text())
        assert meta["method"] == method and meta["data"] == "digits" and meta["n"] == 1437
        assert meta["runs"] == 1 and meta["epochs"] == 3 and meta["seeds"] == [100] and meta["model"] == "convnet"
        assert meta["labels_sha256"] == labels_fingerprint(data_labels)
        scores, got = load_score_file(path, 1437, labels=data_labels)
        assert got == method and np.array_equal(scores, raw.astype(np.float64))
    assert json.loads((tmp_path / "d_forgetting.json").read_text())["never_learned_value"] == 3
    assert "forgetting: " in capsys.readouterr().out
    # an existing output is not overwritten by accident
    assert cli.main(["scores", "--config", DIGITS, "--method", "el2n", "--out", out] + TINY) == 2
    assert "already exist" in capsys.readouterr().err
    # several methods need {method} in --out; bad method names are named
    assert cli.main(["scores", "--config", DIGITS, "--method", "loss,el2n", "--out", str(tmp_path / "x.npy")]) == 2
    assert "{method}" in capsys.readouterr().err
    assert cli.main(["scores", "--config", DIGITS, "--method", "entropy"]) == 2
    assert "--method must name" in capsys.readouterr().err


def test_margin_and_logits_from_a_checkpoint(tmp_path, accelerator, capsys):
    data = load_real({"source": "digits"})
    cfg = load_config(DIGITS, ["model.width=8", "model.depth=2"])
    with pytest.raises(ConfigError, match="scores.checkpoint"):
        compute_scores(accelerator, cfg, data, "margin", tmp_path / "m.npy")
    torch.manual_seed(0)
    model = build_model(cfg["model"], 10, 1, 8)
    torch.save(state_dict_of(model), tmp_path / "model.pt")
    cfg["scores"]["checkpoint"] = str(tmp_path / "model.pt")
    got = compute_score_files(accelerator, cfg, data, {"margin": str(tmp_path / "m.npy"),
                                                       "logits": str(tmp_path / "l.npy")})
    assert set(got) == {"margin", "logits"} and got["margin"].dtype == np.float64
    x = (data.train.images[:5].float() / 255 - torch.tensor(data.norm.mean).view(1, -1, 1, 1)) \
        / torch.tensor(data.norm.std).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = model.eval()(x).numpy()
    y = data.train.labels[:5].numpy()
    true = logits[np.arange(5), y]
    others = np.where(np.eye(10, dtype=bool)[y], -np.inf, logits).max(1)
    np.testing.assert_allclose(got["logits"][:5], true, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["margin"][:5], true - others, rtol=1e-4, atol=1e-4)
    assert load_score_file(tmp_path / "m.npy", 1437, labels=data.train.labels.numpy())[1] == "margin"
    assert json.loads((tmp_path / "l.json").read_text())["settings"]["checkpoint"] == str(tmp_path / "model.pt")


@pytest.mark.parametrize("method", DYNAMICS)
def test_computed_scores_drive_selection(tmp_path, accelerator, method):
    """compute_scores -> (reuse) -> difficulty -> selection: the k simplest candidates per class."""
    data = load_real({"source": "digits"})
    cfg = load_config(DIGITS, TINY)
    path = tmp_path / "run" / f"scores_{method}.npy"
    scores, got = compute_scores(accelerator, cfg, data, method, path)
    assert got == method and scores.dtype == np.float64 and path.exists()
    mtime = path.stat().st_mtime_ns
    again, _ = compute_scores(accelerator, cfg, data, method, path)                 # reused, not recomputed
    assert np.array_equal(again, scores) and path.stat().st_mtime_ns == mtime
    loaded, got = load_score_file(path, len(data.train), labels=data.train.labels.numpy())
    assert got == method and np.array_equal(loaded, scores)

    labels = data.train.labels.numpy()
    hardness = to_hardness(scores, method)
    index = np.arange(len(labels))
    pred = np.where(index % 2 == 0, (labels + 1) % 10, labels)                     # even indices misclassified
    sel = select(index, labels, pred, hardness, 3, coarse="misclassified", fine="simple", num_classes=10, seed=0)
    assert len(sel.indices) == 30
    for c in range(10):
        cand = index[(labels == c) & (index % 2 == 0)]
        expected = cand[np.lexsort((cand, hardness[cand]))][:3]                     # simplest, ties by index
        assert sorted(sel.indices[labels[sel.indices] == c].tolist()) == sorted(expected.tolist())

    changed = load_config(DIGITS, TINY + ["scores.epochs=4"])
    with pytest.raises(DataError, match=r"other settings \(epochs: file 3, config 4"):
        compute_scores(accelerator, changed, data, method, path)


def test_reused_file_is_validated(tmp_path, accelerator):
    data = load_real({"source": "digits"})
    cfg = load_config(DIGITS, TINY)
    path = tmp_path / "scores_loss.npy"
    np.save(path, np.zeros(100, dtype=np.float32))
    with pytest.raises(DataError, match=r"expected 1437.*got 100"):
        compute_scores(accelerator, cfg, data, "loss", path)
    bad = np.zeros(1437, dtype=np.float32)
    bad[5] = np.nan
    np.save(path, bad)
    with pytest.raises(DataError, match="NaN or inf"):
        compute_scores(accelerator, cfg, data, "loss", path)


def test_labels_fingerprint_checked(tmp_path):
    labels = np.array([0, 1, 2, 1, 0])
    path = tmp_path / "s.npy"
    np.save(path, np.arange(5, dtype=np.float32))
    meta = {"method": "forgetting", "data": "toy", "n": 5, "labels_sha256": labels_fingerprint(labels)}
    (tmp_path / "s.json").write_text(json.dumps(meta))
    assert load_score_file(path, 5, labels=labels)[1] == "forgetting"
    assert load_score_file(path, 5, labels=torch.tensor(labels))[1] == "forgetting"
    assert load_score_file(path, 5)[1] == "forgetting"                              # nothing to compare with
    assert labels_fingerprint(labels.astype(np.int32)) == labels_fingerprint(labels)
    swapped = labels[[1, 0, 2, 3, 4]]
    with pytest.raises(DataError, match=r"s\.npy: .*labels fingerprint .*data set 'toy'.*another sample order"):
        load_score_file(path, 5, labels=swapped)
    with pytest.raises(DataError, match="labels fingerprint"):                     # also with an explicit method
        load_score_file(path, 5, labels=swapped, method="loss")


def test_scores_config_section():
    cfg = load_config(None)
    assert cfg["scores"]["method"] == "forgetting" and cfg["scores"]["el2n_epoch"] is None
    assert load_config(None, ["scores.el2n_epoch=5", "scores.checkpoint=t.pt"])["scores"]["el2n_epoch"] == 5
    for override, words in [("scores.method=cscore", "'scores.method' must be one of"),
                            ("scores.el2n_epoch=31", "'scores.el2n_epoch' must lie in 1..scores.epochs (30)"),
                            ("scores.runs=0", "'scores.runs' must be at least 1"),
                            ("scores.lr=0", "'scores.lr' must be positive")]:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            load_config(None, [override])


@pytest.mark.skipif("compute_score" not in inspect.getsource(curriculum),
                    reason="curriculum.get_hardness_source does not call scores.compute_scores yet")
def test_ccfs_run_with_computed_forgetting(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["run", "--config", DIGITS, "--out", out, "teacher.epochs=3", "distill.iterations=20", "ccfs.ipc=6",
            "ccfs.alpha=0.34", "ccfs.phases=2", "train.epochs=3", "eval.runs=1", "eval.baselines=false",
            "model.width=16", "ccfs.difficulty=forgetting", "scores.runs=1", "scores.epochs=3"]
    assert cli.main(args) == 0
    assert os.path.exists(os.path.join(out, "scores_forgetting.npy"))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["difficulty"] == "forgetting" and summary["phases"][0]["difficulty"] == "forgetting"
    recheck_run(out, 10, 1437)               # each phase took the fewest-forgetting candidates (selection_check.py)
    os.remove(os.path.join(out, "summary.json"))
    assert cli.main(args + ["--resume"]) == 0
    assert "reusing forgetting scores" in capsys.readouterr().out


def test_a_killed_score_run_resumes_to_the_same_scores(tmp_path, accelerator, planted, monkeypatch):
    """A score run keeps its training state and running scores (train.checkpoint_every): interrupted after
    two epochs and started again, it continues from the checkpoint to exactly the uninterrupted scores."""
    from ccfs_dist.runtime.dist import OneRankAccelerator
    from ccfs_dist.training.scores import dynamics_run
    data, _ = planted
    cfg = load_config(DIGITS, ["scores.epochs=5", "train.checkpoint_every=1"])
    whole, _ = dynamics_run(OneRankAccelerator(accelerator), cfg, data, 0)
    state = str(tmp_path / "run0_state.pt")
    real = TrainingDynamics.end_epoch

    def interrupted(self, epoch):
        if epoch == 2:                                  # the checkpoint after epoch 1 exists
            raise KeyboardInterrupt
        real(self, epoch)
    monkeypatch.setattr(TrainingDynamics, "end_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dynamics_run(OneRankAccelerator(accelerator), cfg, data, 0, checkpoint=state)
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == 1 and int(saved["extra"]["epochs_seen"]) == 2
    monkeypatch.setattr(TrainingDynamics, "end_epoch", real)
    resumed, _ = dynamics_run(OneRankAccelerator(accelerator), cfg, data, 0, checkpoint=state)
    for m in DYNAMICS:
        assert np.array_equal(whole[m], resumed[m], equal_nan=True), m
    assert not os.path.exists(state)
