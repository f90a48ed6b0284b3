"""Tests for ccfs_dist.ccfs.selection: phase budgets and the coarse-to-fine select."""
import itertools

import numpy as np
import pytest

from ccfs_dist.errors import ConfigError, DataError
from ccfs_dist.ccfs.selection import Selection, num_phases, phase_budgets, select

COMBOS = list(itertools.product(("misclassified", "correct"), ("simple", "hard", "random")))


# --------------------------------------------------------------------------- budgets


def test_budget_split_earlier_phases_take_remainder():
    assert phase_budgets(10, 0.3, 3) == [3, 2, 2]      # budget 7; also floor(10 * 0.3) must be 3
    assert phase_budgets(50, 0.2, 3) == [14, 13, 13]   # budget 40
    assert phase_budgets(12, 0.5, 3) == [2, 2, 2]
    assert phase_budgets(500, 0.1, 1) == [450]


def test_budget_float_floor_is_exact():
    # 100 * 0.29 == 28.999999999999996 in float64 (int() gives 28; the official code's figure, compat official);
    # 10 * 0.3 rounds to exactly 3.0, but the exact rule must not depend on such luck
    assert sum(phase_budgets(10, 0.3, 1)) == 7
    assert sum(phase_budgets(100, 0.29, 1)) == 71
    assert sum(phase_budgets(50, 0.1, 1)) == 45
    assert sum(phase_budgets(30, 0.7, 1)) == 9
    assert sum(phase_budgets(10, 0.35, 1)) == 7     # floor(3.5) = 3


def test_budget_alpha_zero_and_one():
    assert phase_budgets(10, 0.0, 3) == [4, 3, 3]
    assert phase_budgets(10, 0, 2) == [5, 5]
    with pytest.raises(ConfigError, match=r"ccfs\.phases.*more phases than the real budget.* = 0 real"):
        phase_budgets(10, 1.0, 1)


def test_too_many_phases():
    with pytest.raises(ConfigError) as e:
        phase_budgets(10, 0.8, 3)                   # budget 2
    msg = str(e.value)
    assert "ccfs.phases" in msg and "more phases than the real budget per class" in msg
    assert "3 phases" in msg and "= 2 real images" in msg
    assert phase_budgets(10, 0.8, 2) == [1, 1]


def test_log_schedule():
    expected = {1: 1, 4: 1, 5: 1, 9: 1, 10: 2, 19: 2, 20: 3, 39: 3, 40: 4, 50: 4, 79: 4, 80: 5,
                100: 5, 500: 7, 1300: 9}
    assert {ipc: num_phases("log", ipc) for ipc in expected} == expected
    assert phase_budgets(50, 0.2, "log") == [10, 10, 10, 10]
    assert num_phases(3, 50) == 3


@pytest.mark.parametrize("phases", [0, -1, "linear", 2.0, True])
def test_bad_phases(phases):
    with pytest.raises(ConfigError, match="ccfs.phases"):
        num_phases(phases, 50)


def test_bad_ipc_alpha():
    with pytest.raises(ConfigError, match="ccfs.ipc"):
        phase_budgets(0, 0.2, 1)
    with pytest.raises(ConfigError, match="ccfs.alpha"):
        phase_budgets(10, 1.5, 1)


# --------------------------------------------------------------------------- hand-built pool
#
#  idx label pred hardness   coarse       class-0 misclassified by hardness: 4 (.3), 0 (.5), 2 (.9)
#   0    0    1    0.50      mis          class-0 correct:                   1 (.1), 5 (.2), 3 (.7)
#   1    0    0    0.10      cor          class-1 misclassified:             6 (.15), 8 (.2), 10 (.25)
#   2    0    1    0.90      mis          class-1 correct:                   11 (.05), 7 (.6), 9 (.8)
#   3    0    0    0.70      cor
#   4    0    1    0.30      mis
#   5    0    0    0.20      cor
#   6    1    0    0.15      mis
#   7    1    1    0.60      cor
#   8    1    0    0.20      mis
#   9    1    1    0.80      cor
#  10    1    0    0.25      mis
#  11    1    1    0.05      cor

IDX = np.arange(12)
LABEL = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
PRED = np.array([1, 0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1])
HARD = np.array([.5, .1, .9, .7, .3, .2, .15, .6, .2, .8, .25, .05])
MIS = {0, 2, 4, 6, 8, 10}
COR = {1, 3, 5, 7, 9, 11}


def run(k=2, **kw):
    kw.setdefault("num_classes", 2)
    return select(IDX, LABEL, PRED, HARD, k, **kw)


@pytest.mark.parametrize("coarse,fine,balance,expected", [
    ("misclassified", "simple", True, [0, 4, 6, 8]),
    ("misclassified", "hard", True, [0, 2, 8, 10]),
    ("correct", "simple", True, [1, 5, 7, 11]),
    ("correct", "hard", True, [3, 5, 7, 9]),
    ("misclassified", "simple", False, [4, 6, 8, 10]),   # global: 6, 8, 10, 4
    ("misclassified", "hard", False, [0, 2, 4, 10]),     # global: 2, 0, 4, 10
    ("correct", "simple", False, [1, 5, 7, 11]),
    ("correct", "hard", False, [3, 5, 7, 9]),
])
def test_coarse_fine_combos(coarse, fine, balance, expected):
    sel = run(coarse=coarse, fine=fine, balance=balance)
    assert isinstance(sel, Selection)
    assert sel.indices.dtype == np.int64
    assert sel.indices.tolist() == expected
    assert sel.per_class.tolist() == np.bincount(LABEL[expected], minlength=2).tolist()
    assert sel.candidates_per_class.tolist() == [3, 3]
    assert sel.filled_from_fallback.tolist() == [0, 0]
    assert sel.short.tolist() == [0, 0] and sel.total_short == 0
    assert sel.quota == 4


def test_balance_off_is_unbalanced():
    assert run(coarse="misclassified", fine="simple", balance=False).per_class.tolist() == [1, 3]
    assert run(coarse="misclassified", fine="hard", balance=False).per_class.tolist() == [3, 1]


@pytest.mark.parametrize("coarse,pool", [("misclassified", MIS), ("correct", COR)])
@pytest.mark.parametrize("balance", [True, False])
def test_random_membership(coarse, pool, balance):
    for seed in range(5):
        sel = run(coarse=coarse, fine="random", balance=balance, seed=seed)
        assert set(sel.indices.tolist()) <= pool and len(sel.indices) == 4
        if balance:
            assert sel.per_class.tolist() == [2, 2]


def test_random_determinism_and_seed_dependence():
    rng = np.random.default_rng(7)
    n = 2000
    label = rng.integers(0, 4, n)
    pred = rng.integers(0, 4, n)
    hard = rng.random(n)
    idx = rng.permutation(10 * n)[:n]
    sels = {seed: select(idx, label, pred, hard, 10, fine="random", num_classes=4, seed=seed).indices
            for seed in range(4)}
    for seed in range(4):
        again = select(idx, label, pred, hard, 10, fine="random", num_classes=4, seed=seed).indices
        np.testing.assert_array_equal(sels[seed], again)
    assert len({tuple(s.tolist()) for s in sels.values()}) == 4
    cand = set(idx[pred != label].tolist())
    assert all(set(s.tolist()) <= cand for s in sels.values())


def test_ties_broken_by_smaller_index():
    idx = np.array([40, 10, 30, 20, 50])
    label = np.zeros(5, dtype=int)
    pred = np.ones(5, dtype=int)
    hard = np.array([1.0, 1.0, 1.0, 1.0, 0.5])
    assert select(idx, label, pred, hard, 3, fine="simple", num_classes=1).indices.tolist() == [10, 20, 50]
    assert select(idx, label, pred, hard, 3, fine="hard", num_classes=1).indices.tolist() == [10, 20, 30]
    assert select(idx, label, pred, hard, 2, fine="hard", balance=False,
                  num_classes=1).indices.tolist() == [10, 20]


def test_shortfall_fills_from_next_tiers_and_records_short():
    #  idx label pred hard teacher  tier (coarse misclassified + teacher)
    #   0    0    1   .9    T       1
    #   1    0    1   .1    F       2
    #   2    0    1   .2    F       2
    #   3    0    0   .3    T       3
    #   4    0    0   .05   F       3
    #   5    1    0   .5    T       1
    #   6    1    1   .4    T       3
    idx = np.arange(7)
    label = np.array([0, 0, 0, 0, 0, 1, 1])
    pred = np.array([1, 1, 1, 0, 0, 0, 1])
    hard = np.array([.9, .1, .2, .3, .05, .5, .4])
    tc = np.array([True, False, False, True, False, True, True])
    sel = select(idx, label, pred, hard, 4, teacher_correct=tc, num_classes=3)
    # class 0: tier 1 [0], tier 2 [1, 2], tier 3 [4 (.05), 3 (.3)] -> 0, 1, 2, 4
    # class 1: tier 1 [5], tier 3 [6] -> pool of 2 < 4: short 2;  class 2: empty pool, short 4
    assert sel.indices.tolist() == [0, 1, 2, 4, 5, 6]
    assert sel.per_class.tolist() == [4, 2, 0]
    assert sel.candidates_per_class.tolist() == [1, 1, 0]
    assert sel.filled_from_fallback.tolist() == [3, 1, 0]
    assert sel.short.tolist() == [0, 2, 4]
    assert sel.total_short == 6 and sel.quota == 12
    # hard order inside each tier: tier 2 [2, 1], tier 3 [3, 4]
    assert select(idx, label, pred, hard, 3, fine="hard", teacher_correct=tc,
                  num_classes=2).indices.tolist() == [0, 1, 2, 5, 6]
    # without teacher, tiers 1 and 2 merge: class 0 candidates 0, 1, 2 by hardness 1 (.1), 2 (.2), 0 (.9)
    sel = select(idx, label, pred, hard, 2, num_classes=2)
    assert sel.indices.tolist() == [1, 2, 5, 6]
    assert sel.filled_from_fallback.tolist() == [0, 1]
    # global pool: quota 3 * 3 = 9 > 7 samples; everything is taken, shortfall is global
    sel = select(idx, label, pred, hard, 3, balance=False, teacher_correct=tc, num_classes=3)
    assert sel.indices.tolist() == list(range(7))
    assert sel.total_short == 2 and sel.short.tolist() == [0, 0, 0]
    assert sel.filled_from_fallback.tolist() == [4, 1, 0]
    # global fill order: tier 1 (0, 5), tier 2 (1, 2), tier 3 (4, 3, 6)
    sel = select(idx, label, pred, hard, 2, balance=False, teacher_correct=tc, num_classes=2)
    assert sel.indices.tolist() == [0, 1, 2, 5]


def test_teacher_correct_intersection():
    tc = np.array([True, True, False, True, False, True, True, True, False, True, True, True])
    # misclassified & teacher-correct: class 0 {0}, class 1 {6, 10}; class 0 fills from tier 2: 4 (.3)
    sel = run(k=2, teacher_correct=tc)
    assert sel.candidates_per_class.tolist() == [1, 2]
    assert sel.indices.tolist() == [0, 4, 6, 10]
    assert sel.filled_from_fallback.tolist() == [1, 0]
    # correct & teacher-correct: class 0 {1, 3, 5}, class 1 {7, 9, 11}
    assert run(k=2, coarse="correct", teacher_correct=tc).indices.tolist() == [1, 5, 7, 11]
    # k = 1 needs only tier 1
    assert run(k=1, teacher_correct=tc).indices.tolist() == [0, 6]


def test_k_zero_and_empty_pool():
    sel = run(k=0)
    assert sel.indices.tolist() == [] and sel.short.tolist() == [0, 0]
    empty = np.array([], dtype=np.int64)
    sel = select(empty, empty, empty, np.array([]), 3, num_classes=2)
    assert sel.indices.tolist() == [] and sel.short.tolist() == [3, 3] and sel.total_short == 6


@pytest.mark.parametrize("coarse,fine", COMBOS)
@pytest.mark.parametrize("balance", [True, False])
def test_permutation_invariance(coarse, fine, balance):
    rng = np.random.default_rng(3)
    n = 3000
    idx = rng.permutation(5 * n)[:n]
    label = rng.integers(0, 7, n)
    pred = np.where(rng.random(n) < .4, rng.integers(0, 7, n), label)
    hard = rng.integers(0, 10, n).astype(float)
    tc = rng.random(n) < .7
    base = select(idx, label, pred, hard, 20, coarse=coarse, fine=fine, balance=balance,
                  teacher_correct=tc, num_classes=7, seed=5)
    for _ in range(3):
        p = rng.permutation(n)
        other = select(idx[p], label[p], pred[p], hard[p], 20, coarse=coarse, fine=fine, balance=balance,
                       teacher_correct=tc[p], num_classes=7, seed=5)
        for field in ("indices", "per_class", "candidates_per_class", "filled_from_fallback", "short"):
            np.testing.assert_array_equal(getattr(base, field), getattr(other, field))


# --------------------------------------------------------------------------- reference cross-check


def reference_select(index, label, pred, hardness, k, coarse, fine, balance, teacher_correct, num_classes,
                     seed):
    """The rule written the plain way: per-class Python lists sorted with a key."""
    index, label, pred, hardness = (list(map(int, index)), list(map(int, label)), list(map(int, pred)),
                                    list(map(float, hardness)))
    n = len(index)
    if fine == "random":  # the documented random key: splitmix64(index + salt), in Python integers
        salt = int(np.random.default_rng(seed).integers(2 ** 64, dtype=np.uint64))
        mask = 2 ** 64 - 1
        rank = {}
        for i in index:
            z = (i + salt) & mask
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
            rank[i] = z ^ (z >> 31)

    def tier(i):
        ok = pred[i] != label[i] if coarse == "misclassified" else pred[i] == label[i]
        if not ok:
            return 2
        return 0 if teacher_correct is None or teacher_correct[i] else 1

    def key(i):
        if fine == "simple":
            return (tier(i), hardness[i], index[i])
        if fine == "hard":
            return (tier(i), -hardness[i], index[i])
        return (tier(i), rank[index[i]], index[i])

    if balance:
        chosen = []
        for c in range(num_classes):
            members = sorted((i for i in range(n) if label[i] == c), key=key)
            chosen += members[:k]
    else:
        chosen = sorted(range(n), key=key)[:k * num_classes]
    per_class = [0] * num_classes
    fallback = [0] * num_classes
    for i in chosen:
        per_class[label[i]] += 1
        fallback[label[i]] += tier(i) > 0
    return sorted(index[i] for i in chosen), per_class, fallback


@pytest.mark.parametrize("coarse,fine", COMBOS)
@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize("with_teacher", [True, False])
def test_matches_reference(coarse, fine, balance, with_teacher):
    rng = np.random.default_rng([COMBOS.index((coarse, fine)), balance, with_teacher])
    for trial in range(4):
        n = int(rng.integers(1, 400))
        c = int(rng.integers(1, 9))
        k = int(rng.integers(0, 60))
        idx = rng.choice(10 * n, n, replace=False)
        label = rng.integers(0, c, n)
        pred = np.where(rng.random(n) < rng.random(), rng.integers(0, c, n), label)
        hard = rng.integers(-3, 4, n).astype(float) / 2     # many ties
        tc = (rng.random(n) < .6) if with_teacher else None
        seed = int(rng.integers(0, 100))
        sel = select(idx, label, pred, hard, k, coarse=coarse, fine=fine, balance=balance,
                     teacher_correct=tc, num_classes=c, seed=seed)
        ref, per_class, fallback = reference_select(idx, label, pred, hard, k, coarse, fine, balance, tc, c,
                                                    seed)
        assert sel.indices.tolist() == ref
        assert sel.per_class.tolist() == per_class
        assert sel.filled_from_fallback.tolist() == fallback
        assert sel.total_short == k * c - len(ref)


# --------------------------------------------------------------------------- input errors


def test_bad_inputs():
    with pytest.raises(ConfigError, match="ccfs.coarse"):
        run(coarse="wrong")
    with pytest.raises(ConfigError, match="ccfs.fine"):
        run(fine="easy")
    with pytest.raises(ConfigError, match="k must be"):
        run(k=-1)
    with pytest.raises(DataError, match="equal length"):
        select(IDX, LABEL[:-1], PRED, HARD, 1, num_classes=2)
    with pytest.raises(DataError, match="unique"):
        select(np.zeros(12, dtype=int), LABEL, PRED, HARD, 1, num_classes=2)
    with pytest.raises(DataError, match="outside"):
        select(IDX, LABEL, PRED, HARD, 1, num_classes=1)
    with pytest.raises(DataError, match="NaN"):
        select(IDX, LABEL, PRED, np.where(IDX == 3, np.nan, HARD), 1, num_classes=2)
    with pytest.raises(DataError, match="bool"):
        select(IDX, LABEL, PRED, HARD, 1, teacher_correct=np.ones(12), num_classes=2)


def test_negative_zero_ties_with_zero():
    # C-score 0 becomes hardness -0.0; it must tie with 0.0 and fall back to the index
    idx = np.array([5, 3, 9, 1])
    hard = np.array([-0.0, 0.0, -0.0, 0.5])
    sel = select(idx, np.zeros(4, int), np.ones(4, int), hard, 2, num_classes=1)
    assert sel.indices.tolist() == [3, 5]
    sel = select(idx, np.zeros(4, int), np.ones(4, int), hard, 3, fine="hard", num_classes=1)
    assert sel.indices.tolist() == [1, 3, 5]


@pytest.mark.parametrize("fine", ["simple", "hard"])
@pytest.mark.parametrize("balance", [True, False])
def test_indices_beyond_32_bits(fine, balance):
    rng = np.random.default_rng(11)
    n = 500
    idx = rng.choice(10 * n, n, replace=False)
    label = rng.integers(0, 5, n)
    pred = rng.integers(0, 5, n)
    hard = rng.integers(0, 4, n).astype(float)
    tc = rng.random(n) < .5
    small = select(idx, label, pred, hard, 30, fine=fine, balance=balance, teacher_correct=tc, num_classes=5)
    big = select(idx + 2 ** 40, label, pred, hard, 30, fine=fine, balance=balance, teacher_correct=tc,
                 num_classes=5)
    np.testing.assert_array_equal(small.indices + 2 ** 40, big.indices)
    np.testing.assert_array_equal(small.filled_from_fallback, big.filled_from_fallback)


def test_random_key_depends_only_on_seed_and_index():
    # a sample's random rank does not depend on the other pool samples: selecting from a sub-pool that
    # still holds the winners gives the same winners
    rng = np.random.default_rng(5)
    n = 1000
    idx = np.arange(n) * 3
    label = rng.integers(0, 2, n)
    pred = 1 - label
    hard = np.zeros(n)
    full = select(idx, label, pred, hard, 10, fine="random", num_classes=2, seed=4).indices
    keep = np.isin(idx, full) | (rng.random(n) < .5)
    sub = select(idx[keep], label[keep], pred[keep], hard[keep], 10, fine="random", num_classes=2, seed=4)
    np.testing.assert_array_equal(full, sub.indices)


def test_negative_index_refused():
    with pytest.raises(DataError, match="negative global indices"):
        select(IDX - 1, LABEL, PRED, HARD, 1, num_classes=2)


def test_duplicate_index_far_range():
    idx = np.array([0, 2 ** 40, 2 ** 40])
    with pytest.raises(DataError, match=r"1 repeated \(first: \[1099511627776\]\)"):
        select(idx, np.zeros(3, int), np.ones(3, int), np.zeros(3), 1, num_classes=1)


def test_random_per_class_samples_each_class_deterministically():
    from ccfs_dist.ccfs.selection import random_per_class
    labels = np.repeat(np.arange(4), 10)
    got = random_per_class(labels, 3, seed=5, exclude=[0, 1, 2])
    assert np.array_equal(got, np.sort(got))
    assert np.bincount(labels[got], minlength=4).tolist() == [3, 3, 3, 3]
    assert not set(got.tolist()) & {0, 1, 2}
    assert np.array_equal(got, random_per_class(labels, 3, seed=5, exclude=[0, 1, 2]))
    assert not np.array_equal(random_per_class(labels, 3, seed=5), random_per_class(labels, 3, seed=6))
