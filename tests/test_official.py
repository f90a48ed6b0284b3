"""ccfs.compat: official against a re-implementation written line by line from the official code
(CYDaaa30/CCFS ccfs_cifar10.py `main` + `selection_score` / `selection_logits`), on a generated
CIFAR-sized pool with the official score files and on the artifacts of a digits run."""
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from ccfs_dist.ccfs.difficulty import to_hardness
from ccfs_dist.ccfs.selection import phase_budgets, select, select_official

# ../shared/reference/ccfs-official-scores beside the repository (as tests/test_difficulty.py), or $CCFS_OFFICIAL_SCORES
REFERENCE = os.environ.get("CCFS_OFFICIAL_SCORES", str(Path(__file__).resolve().parents[2] / "shared" / "reference"
                                                       / "ccfs-official-scores"))


# ----------------------------------------------------------------- the official code, transcribed

def official_arrangement(ipc, alpha, curriculum_num):
    """main(): cpc = int(ipc * alpha), spc = ipc - cpc; curriculum_arrangement(spc, curriculum_num)."""
    cpc = int(ipc * alpha)
    spc = ipc - cpc
    remainder = spc % curriculum_num
    arrangement = [spc // curriculum_num] * curriculum_num
    for i in range(remainder):
        arrangement[i] += 1
    return arrangement


def official_phase(selected_idx, teacher_correct_idx, true_labels, predicted_labels, score, reverse, curpc,
                   num_classes, select_misclassified=True, select_method="simple", balance=True):
    """selection_score (score files) / selection_logits (score = the true-class logit, reverse=False),
    after coarse_filtering: the same statements on the same kinds of objects."""
    if select_misclassified:
        target_indices = np.where(true_labels != predicted_labels)[0].tolist()
    else:
        target_indices = np.where(true_labels == predicted_labels)[0].tolist()
    if teacher_correct_idx is not None:
        target_indices = list(set(teacher_correct_idx) & set(target_indices) - set(selected_idx))
    else:
        target_indices = list(set(target_indices) - set(selected_idx))
    selection = []
    if balance:
        target_idx_per_class = [[] for c in range(num_classes)]
        for idx in target_indices:
            target_idx_per_class[true_labels[idx]].append(idx)
        for c in range(num_classes):
            if select_method == "hard":
                selection += sorted(target_idx_per_class[c], key=lambda i: score[i], reverse=reverse)[:curpc]
            elif select_method == "simple":
                selection += sorted(target_idx_per_class[c], key=lambda i: score[i], reverse=not reverse)[:curpc]
    else:
        if select_method == "hard":
            selection = sorted(target_indices, key=lambda i: score[i], reverse=reverse)[:curpc * num_classes]
        elif select_method == "simple":
            selection = sorted(target_indices, key=lambda i: score[i], reverse=not reverse)[:curpc * num_classes]
    return selection


def official_run(labels, teacher_pred, phase_preds, score, reverse, ipc, alpha, phases, **rule):
    """idx_selected of main()'s curriculum loop, given each phase's filter predictions."""
    teacher_correct_idx = np.where(labels == teacher_pred)[0].tolist()
    idx_selected = []
    for curpc, pred in zip(official_arrangement(ipc, alpha, phases), phase_preds):
        idx_selected += official_phase(idx_selected, teacher_correct_idx, labels, pred, score, reverse, curpc,
                                       int(labels.max()) + 1, **rule)
    return idx_selected


# ----------------------------------------------------------------- the engine's mode

def engine_run(labels, teacher_pred, phase_preds, hardness, ipc, alpha, phases, coarse="misclassified",
               fine="simple", balance=True, teacher_correct=True, shuffle=None):
    """The picks of ccfs.compat: official over the phases, arrays handed over in `shuffle` order."""
    n = len(labels)
    index = np.arange(n) if shuffle is None else shuffle
    selected = np.empty(0, dtype=np.int64)
    for k, pred in zip(phase_budgets(ipc, alpha, phases, official=True), phase_preds):
        sel = select_official(index, labels[index], pred[index], hardness[index], k, selected=selected,
                              coarse=coarse, fine=fine, balance=balance, num_classes=int(labels.max()) + 1,
                              teacher_correct=(teacher_pred == labels)[index] if teacher_correct else None)
        selected = np.concatenate([selected, sel.indices])
    return selected.tolist()


def fake_predictions(labels, wrong, rng):
    """Predictions that are wrong on a `wrong` share of the samples."""
    num_classes = int(labels.max()) + 1
    pred = labels.copy()
    flip = rng.random(len(labels)) < wrong
    pred[flip] = (labels[flip] + rng.integers(1, num_classes, flip.sum())) % num_classes
    return pred


@pytest.fixture(scope="module")
def cifar_pool():
    """50,000 samples: labels from the official CIFAR-10 C-score file, its forgetting and C-scores,
    a teacher right on 95 %, three phase filters wrong on 40 / 25 / 15 %."""
    path = os.path.join(REFERENCE, "cscores_CIFAR10.npz")
    if not os.path.exists(path):
        pytest.skip(f"official score files not found in {REFERENCE}")
    with np.load(path, allow_pickle=False) as f:
        labels, cscores = f["labels"].astype(np.int64), f["scores"].astype(np.float64)
    forgetting = np.load(os.path.join(REFERENCE, "forgetting_CIFAR10.npy"), allow_pickle=False)
    rng = np.random.default_rng(0)
    teacher = fake_predictions(labels, 0.05, rng)
    phase_preds = [fake_predictions(labels, w, rng) for w in (0.40, 0.25, 0.15)]
    return labels, forgetting, cscores, teacher, phase_preds


@pytest.mark.parametrize("method, fine, balance", [
    ("forgetting", "simple", True), ("forgetting", "hard", True), ("forgetting", "simple", False),
    ("cscore", "simple", True), ("cscore", "hard", False), ("logits", "simple", True), ("logits", "hard", False),
])
def test_official_mode_matches_the_official_code_on_a_cifar_sized_pool(cifar_pool, method, fine, balance):
    labels, forgetting, cscores, teacher, phase_preds = cifar_pool
    # as main() sets them; selection_logits sorts by the filter's true-class logit with reverse=False
    # (here one logit per sample, rounded to create ties, standing in for the last phase's filter)
    logits = np.round(np.random.default_rng(2).normal(size=len(labels)), 1)
    raw, reverse = {"forgetting": (forgetting, True), "cscore": (cscores, False), "logits": (logits, False)}[method]
    expected = official_run(labels, teacher, phase_preds, raw, reverse, 500, 0.1, 3, select_method=fine,
                            balance=balance)
    shuffle = np.random.default_rng(1).permutation(len(labels))          # a gathered, unordered result
    got = engine_run(labels, teacher, phase_preds, to_hardness(raw, method), 500, 0.1, 3, fine=fine,
                     balance=balance, shuffle=shuffle)
    assert got == expected                                               # same picks, same order
    assert len(got) == 450 * 10
    if method == "cscore":
        return          # C-scores are continuous (few ties): there the default rule picks the same samples
    # the forgetting file (and the rounded logits) are full of ties: the default rule (ties by index) differs
    selected = np.empty(0, dtype=np.int64)
    for k, pred in zip(phase_budgets(500, 0.1, 3), phase_preds):
        pool = np.setdiff1d(np.arange(len(labels)), selected)
        sel = select(pool, labels[pool], pred[pool], to_hardness(raw, method)[pool], k, fine=fine, balance=balance,
                     teacher_correct=(teacher == labels)[pool], num_classes=10)
        selected = np.concatenate([selected, sel.indices])
    assert set(selected.tolist()) != set(got)


def test_official_mode_short_classes_alpha_rounding_no_teacher_and_correct_coarse(cifar_pool):
    labels, forgetting, _, teacher, phase_preds = cifar_pool
    # class 3 nearly always right: fewer misclassified candidates than k, so the official code takes fewer
    preds = [p.copy() for p in phase_preds]
    for p in preds:
        right = np.flatnonzero(labels == 3)[40:]
        p[right] = 3
    assert official_arrangement(100, 0.29, 3) == phase_budgets(100, 0.29, 3, official=True) == [24, 24, 24]
    assert phase_budgets(100, 0.29, 3) == [24, 24, 23]                   # exact floor(29.0): one fewer real image
    expected = official_run(labels, teacher, preds, forgetting, True, 100, 0.29, 3)
    got = engine_run(labels, teacher, preds, forgetting, 100, 0.29, 3)
    assert got == expected and (labels[got] == 3).sum() < 72
    # coarse = correct, no teacher-correct intersection
    ref = []
    for curpc, pred in zip(official_arrangement(100, 0.29, 3), preds):
        ref += official_phase(ref, None, labels, pred, forgetting, True, curpc, 10, select_misclassified=False)
    got = engine_run(labels, teacher, preds, forgetting, 100, 0.29, 3, coarse="correct", teacher_correct=False)
    assert got == ref


def test_official_mode_random_is_seeded_and_takes_fewer_when_short():
    labels = np.repeat(np.arange(3), 10)
    pred = (labels + 1) % 3
    pred[labels == 2] = 2                              # class 2: no misclassified candidate
    h = np.zeros(30)
    a = select_official(np.arange(30), labels, pred, h, 4, selected=[], fine="random", num_classes=3, seed=5)
    b = select_official(np.arange(30), labels, pred, h, 4, selected=[], fine="random", num_classes=3, seed=5)
    assert a.indices.tolist() == b.indices.tolist() and a.per_class.tolist() == [4, 4, 0]
    assert a.short.tolist() == [0, 0, 4] and a.filled_from_fallback.sum() == 0
    rng = random.Random(5)
    cands = list(set(np.flatnonzero(pred != labels).tolist()))
    expect = rng.sample([i for i in cands if labels[i] == 0], 4) + rng.sample([i for i in cands if labels[i] == 1], 4)
    assert a.indices.tolist() == expect


def test_official_mode_needs_the_whole_training_set():
    from ccfs_dist.errors import DataError
    with pytest.raises(DataError, match="whole training set"):
        select_official(np.array([0, 2]), np.array([0, 1]), np.array([1, 0]), np.zeros(2), 1, selected=[],
                        num_classes=2)


def test_set_order_is_what_the_issue_describes():
    """The tie order the mode reproduces is CPython's set order (hash-slot order), not index order."""
    assert list(set(range(0, 50000, 2)) & set(range(0, 50000, 3)))[:4] == [0, 32772, 6, 32778]


def check_official_run(out):
    """A finished ccfs.compat=official run: its selected_indices.json is what the official code selects
    from the run's own artifacts (teacher_predictions.npz, phase_<j>/predictions.npz, the score file)."""
    cfg_c = {"ipc": 6, "alpha": 0.34, "phases": 2}
    tp = np.load(os.path.join(out, "teacher_predictions.npz"), allow_pickle=False)
    assert set(tp.files) == {"index", "label", "pred"} and np.array_equal(tp["index"], np.arange(1437))
    labels, teacher = tp["label"].astype(np.int64), tp["pred"].astype(np.int64)
    phase_preds = []
    for j in (1, 2):
        p = np.load(os.path.join(out, f"phase_{j}", "predictions.npz"), allow_pickle=False)
        assert np.array_equal(p["index"], np.arange(1437))            # the official code scores every sample
        phase_preds.append(p["pred"].astype(np.int64))
    forgetting = np.load(os.path.join(out, "scores_forgetting.npy"), allow_pickle=False)
    expected = official_run(labels, teacher, phase_preds, forgetting, True, **cfg_c)
    assert json.load(open(os.path.join(out, "selected_indices.json")))["idx_selected"] == expected
    return expected


@pytest.mark.parametrize("fine, sign", [("simple", 1), ("hard", -1)])
def test_official_mode_fine_order_without_the_score_files(fine, sign):
    """Recomputed here (the score-file tests skip where the files are absent): per class, in class order, the k
    candidates (misclassified, teacher-correct, not selected before) of least hardness for "simple", of most
    for "hard"; distinct hardness values, so no tie order is involved."""
    rng = np.random.default_rng(3)
    n, classes, k = 90, 3, 4
    labels = np.arange(n) % classes
    pred = np.where(rng.random(n) < 0.6, (labels + 1) % classes, labels)
    h = rng.permutation(n).astype(np.float64)
    teacher_ok = rng.random(n) < 0.9
    before = [int(np.flatnonzero((pred != labels) & teacher_ok)[0])]
    got = select_official(np.arange(n), labels, pred, h, k, selected=before, fine=fine, num_classes=classes,
                          teacher_correct=teacher_ok)
    want = []
    for c in range(classes):
        cands = [i for i in range(n) if labels[i] == c and pred[i] != labels[i] and teacher_ok[i] and i not in before]
        want += sorted(cands, key=lambda i: sign * h[i])[:k]
    assert got.indices.tolist() == want and got.per_class.tolist() == [k] * classes
