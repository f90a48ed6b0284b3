"""Coarse-to-fine selection of real pool samples for one curriculum phase (CCFS, CVPR 2025).

Pure numpy. A run's budgets come from `run_budgets` (plan and curriculum alike), `select` runs once per phase:

    for j, k in enumerate(run_budgets(cfg["ccfs"])):
        ...train the filter on S_{j-1}, score the pool (samples not yet selected)...
        sel = select(index, label, pred, hardness, k, coarse=..., fine=..., teacher_correct=...)
        S_j = S_{j-1} ∪ sel.indices

`select` orders the pool by (class, tier, fine key, global index) and takes the first k of each
class. Tier 1 holds the coarse candidates; the later tiers only fill a class whose candidates run
out (see `select`). `select_official` (ccfs.compat: official) instead reproduces the official code's
picks exactly: its tie order, its short classes, its output order (see there and docs/official.md). Everything is array sorts and per-group ranks: no Python loop over samples or
classes, 0.025-0.06 s for ImageNet-1K (1.28 M samples, 1000 classes) on one CPU core.
"""
import math
import random
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ccfs_dist.errors import ConfigError, DataError

COARSE = ("misclassified", "correct")
FINE = ("simple", "hard", "random")


# --------------------------------------------------------------------------- random samples of the pool

def random_per_class(labels, per_class, seed, exclude=None):
    """`per_class` random global indices of each class (sorted), never from `exclude`; deterministic in seed.
    The random baselines and the distiller's real initialisation sample the pool with it."""
    labels = np.asarray(labels)
    allowed = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        allowed[np.asarray(exclude, dtype=np.int64)] = False
    keys = np.random.default_rng(seed).random(len(labels))
    order = np.lexsort((keys, labels))                       # by class, then random key
    order = order[allowed[order]]
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank_in_class = np.arange(len(order)) - starts
    return np.sort(order[rank_in_class < per_class])


# --------------------------------------------------------------------------- budgets


def num_phases(phases, ipc):
    """Number of curriculum phases J.

    An int is returned as is (it must be >= 1). "log" is CUDD's logarithmic schedule
    J = max(0, floor(log2(ipc / 5))) + 1, computed in integers (floor(log2(x)) == floor(log2(floor(x)))
    for x >= 1): ipc 5 -> 1, 10 -> 2, 20 -> 3, 50 -> 4, 100 -> 5, 500 -> 7.
    """
    if isinstance(phases, str):
        if phases != "log":
            raise ConfigError(f"config key 'ccfs.phases' must be a positive integer or 'log', got {phases!r}")
        ipc = _positive_int(ipc, "ccfs.ipc")
        return (ipc // 5).bit_length() if ipc >= 5 else 1
    if isinstance(phases, bool) or not isinstance(phases, (int, np.integer)) or phases < 1:
        raise ConfigError(f"config key 'ccfs.phases' must be a positive integer or 'log', got {phases!r}")
    return int(phases)


def phase_budgets(ipc, alpha, phases, official=False):
    """Real images per class to select in each phase, k_1..k_J.

    The real budget per class is ipc - floor(ipc * alpha) (the distilled set holds floor(ipc * alpha));
    it is split over J = num_phases(phases, ipc) phases as evenly as possible, earlier phases taking
    the remainder: budget 7 over 3 phases -> [3, 2, 2].

    floor(ipc * alpha) is computed exactly on the decimal the user wrote (Fraction(repr(alpha))), so
    ipc 100, alpha 0.29 gives 29 distilled images although 100 * 0.29 == 28.999999999999996 in float64.
    The official scripts compute int(ipc * alpha), which gives 28 there (72 real images instead of 71);
    `official=True` (ccfs.compat: official) does the same. (For the alphas of the official scripts both
    agree: int(500 * 0.1) == 50.)
    """
    ipc = _positive_int(ipc, "ccfs.ipc")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"config key 'ccfs.alpha' must be a number in [0, 1], got {alpha!r}")
    n_distilled = int(ipc * float(alpha)) if official else math.floor(ipc * Fraction(repr(float(alpha))))
    budget = ipc - n_distilled
    j = num_phases(phases, ipc)
    if j > budget:
        how = (f"lower ccfs.phases to at most {budget} or lower ccfs.alpha" if budget > 0 else
               f"ccfs.alpha = {float(alpha)} leaves no real images; lower ccfs.alpha below 1")
        raise ConfigError(
            f"config key 'ccfs.phases' gives {j} phases, more phases than the real budget per class: "
            f"ipc - floor(ipc * alpha) = {ipc} - floor({ipc} * {float(alpha)}) = {budget} real images "
            f"per class, so some phase would select nothing; {how}")
    base, extra = divmod(budget, j)
    return [base + 1] * extra + [base] * (j - extra)


def run_budgets(ccfs):
    """The phase budgets of a run, from its config section `ccfs` (ipc, alpha, phases, compat): the one rule
    the plan (which sizes each phase's filter training) and the curriculum (which selects) both use, so
    that ccfs.compat: official's int(ipc * alpha) reaches both (ipc 100, alpha 0.29: [24, 24, 24])."""
    return phase_budgets(ccfs["ipc"], ccfs["alpha"], ccfs["phases"], official=ccfs["compat"] == "official")


def _positive_int(value, key):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"config key '{key}' must be a positive integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Selection:
    """Result of one phase's selection. All per-class arrays are int64 of length num_classes.

    indices               selected global indices (int64): sorted ascending from `select`, in selection
                          order from `select_official`
    per_class             images selected per class
    candidates_per_class  tier-1 candidates per class (coarse rule, and teacher-correct if given)
    filled_from_fallback  selected images per class that came from tiers 2-3 (not tier-1 candidates)
    short                 images per class missing because the class pool ran out (balance=True;
                          select_official: because the class had fewer than k candidates);
                          always zeros for balance=False, whose shortfall is global: see total_short
    quota                 images asked for in total: k * num_classes
    """
    indices: np.ndarray
    per_class: np.ndarray
    candidates_per_class: np.ndarray
    filled_from_fallback: np.ndarray
    short: np.ndarray
    quota: int

    @property
    def total_short(self):
        """Images missing in total because the pool ran out (either balance mode)."""
        return int(self.quota - len(self.indices))


def select(index, label, pred, hardness, k, *, coarse="misclassified", fine="simple", balance=True,
           teacher_correct=None, num_classes, seed=0):
    """Select k real images per class from the pool: coarse filter, then fine order.

    Arguments are arrays aligned over the pool samples scored in this phase (samples not yet
    selected), in any order:
      index            int global indices (unique, non-negative)
      label            true class in [0, num_classes)
      pred             the filter's prediction
      hardness         float, LARGER = HARDER (difficulty.to_hardness turns raw scores into this)
      teacher_correct  optional bool: the teacher classifies the sample correctly
    k is the images per class for this phase.

    Coarse: "misclassified" keeps pred != label, "correct" keeps pred == label; if teacher_correct
    is given the candidates must also have teacher_correct True.
    Fine order: "simple" = ascending hardness (easiest first), "hard" = descending hardness,
    "random" = ascending random key, where each sample's key is splitmix64(global index + salt) and
    the salt is drawn from np.random.default_rng(seed). The key depends only on the seed and the
    global index, so the order does not depend on the order of the arrays (nor on which other
    samples are in the pool), and splitmix64 is a bijection, so random keys never tie. Ties of
    hardness are broken by the smaller global index.
    balance=True takes the first k per class in fine order; balance=False takes the first
    k * num_classes over the whole pool in the same order.

    Shortfall rule: the pool is split into tiers, and each class (balance=True) or the whole pool
    (balance=False) is filled tier by tier, each tier in the same fine order:
      tier 1  coarse candidates (and teacher-correct, when teacher_correct is given)
      tier 2  samples meeting the coarse rule but not teacher-correct (only when teacher_correct
              is given)
      tier 3  all remaining pool samples (those failing the coarse rule)
    So when a class has fewer tier-1 candidates than k, all of them are taken and the rest comes
    from tier 2, then tier 3 (counted in `filled_from_fallback`). If the class pool itself is
    smaller than k, the whole class pool is taken and the missing count is recorded in `short`
    (globally in `total_short` for balance=False); nothing is raised, the caller decides.

    The result is deterministic and identical for any permutation of the input arrays.
    """
    index, label, pred, hardness, teacher_correct = _check_inputs(
        index, label, pred, hardness, teacher_correct, k, coarse, fine, num_classes)

    # coarse: tier 1 = candidates, 2 = coarse but not teacher-correct, 3 = the rest of the pool
    coarse_ok = (pred != label) if coarse == "misclassified" else (pred == label)
    tier1 = coarse_ok if teacher_correct is None else coarse_ok & teacher_correct

    # fine: the sort key of the samples at positions p; equal keys are ordered by global index
    if fine == "simple":
        key_of = lambda p: hardness[p]                      # noqa: E731
    elif fine == "hard":
        key_of = lambda p: -hardness[p]                     # noqa: E731
    else:
        key_of = lambda p: _random_keys(index[p], seed)     # noqa: E731  (only for the samples sorted)

    # balance: k per class, or k * num_classes from the pool as one group
    if balance:
        group, quota = label, np.full(num_classes, k, dtype=np.int64)
    else:
        group, quota = np.zeros(len(index), dtype=np.int64), np.array([k * num_classes], dtype=np.int64)

    # tier 1 fills each group first; only groups it leaves short look at tiers 2 and 3
    candidates = np.flatnonzero(tier1)
    taken = _first_per_group(candidates, group, None, key_of, index, quota)
    left = quota - np.bincount(group[taken], minlength=len(quota))
    filled = np.empty(0, dtype=np.int64)
    if left.any():
        tier = np.where(coarse_ok, 2, 3).astype(np.uint8)      # (tier 1 samples are not in the fallback)
        fallback = np.flatnonzero(~tier1 & (left[group] > 0))
        filled = _first_per_group(fallback, group, tier, key_of, index, left)
    chosen = np.concatenate([taken, filled])

    per_class = np.bincount(label[chosen], minlength=num_classes)
    return Selection(
        indices=np.sort(index[chosen]),
        per_class=per_class,
        candidates_per_class=np.bincount(label[candidates], minlength=num_classes),
        filled_from_fallback=np.bincount(label[filled], minlength=num_classes),
        short=(k - per_class) if balance else np.zeros(num_classes, dtype=np.int64),
        quota=int(k) * int(num_classes),
    )


def select_official(index, label, pred, hardness, k, *, selected, coarse="misclassified", fine="simple",
                    balance=True, teacher_correct=None, num_classes, seed=0):
    """The official code's selection (`selection_score` / `selection_logits` in ccfs_{cifar10,cifar100,
    tiny}.py), reproduced exactly from the same predictions: ccfs.compat: official.

    Unlike `select`, the arrays cover the WHOLE training set (global indices 0..N-1, in any order),
    already selected samples included, because the official filter scores every training sample and
    the layout of its candidate set depends on them. `selected` holds the indices chosen in earlier
    phases in selection order; `teacher_correct` (bool over the training set) or None.

    The official rule, step by step:
      candidates = list(set(teacher_correct_idx) & set(coarse_idx) - set(selected_idx))
    with coarse_idx / teacher_correct_idx ascending lists (torch.where), so ties are broken in the
    iteration order of that Python set (hash-slot order, not index order; built here with the same
    expression); balance: per class, in class order, the candidates bucketed in that order and sorted
    stably by the fine key (simple: ascending hardness, hard: descending), the first k; a class with
    fewer than k candidates gives fewer (no fallback tiers); balance False: the first k * num_classes
    over all candidates. fine "random": random.sample of min(k, available) per class, from
    random.Random(seed) (the official code draws from the unseeded global `random`, so its random picks
    cannot be reproduced; the procedure is the same). `indices` are in selection order (class by
    class, each in fine order), as the official `idx_selected` is written; they are not sorted.
    """
    index, label, pred, hardness, teacher_correct = _check_inputs(
        index, label, pred, hardness, teacher_correct, k, coarse, fine, num_classes)
    n = len(index)
    if n and (index.max() != n - 1 or not _unique(index)):
        raise DataError(f"selection (ccfs.compat: official): the predictions must cover the whole training set "
                        f"(global indices 0..{n - 1} once each), got {n} samples up to index {index.max()}")
    at = np.empty(n, dtype=np.int64)
    at[index] = np.arange(n)                              # position of each global index
    label, pred, hardness = label[at], pred[at], hardness[at]
    coarse_idx = np.flatnonzero(pred != label) if coarse == "misclassified" else np.flatnonzero(pred == label)
    previous = set(np.asarray(selected, dtype=np.int64).tolist())
    if teacher_correct is not None:
        teacher_idx = np.flatnonzero(teacher_correct[at])
        candidates = list(set(teacher_idx.tolist()) & set(coarse_idx.tolist()) - previous)
    else:
        candidates = list(set(coarse_idx.tolist()) - previous)
    candidates = np.array(candidates, dtype=np.int64)     # in the official tie order
    cand_label = label[candidates]
    group = cand_label if balance else np.zeros(len(candidates), dtype=np.int64)
    quota = np.full(num_classes, k) if balance else np.array([k * num_classes])
    if fine == "random":
        rng = random.Random(seed)
        chosen = []
        for g in range(len(quota)):
            mine = candidates[group == g].tolist()
            chosen += rng.sample(mine, min(int(quota[g]), len(mine)))
        chosen = np.array(chosen, dtype=np.int64)
    else:
        key = hardness[candidates] if fine == "simple" else -hardness[candidates]
        order = np.lexsort((key, group))                  # stable: equal keys keep the set order
        g = group[order]
        size = np.bincount(g, minlength=len(quota))
        rank = np.arange(len(order)) - (np.cumsum(size) - size)[g]
        chosen = candidates[order[rank < quota[g]]]
    per_class = np.bincount(label[chosen], minlength=num_classes)
    return Selection(
        indices=chosen,
        per_class=per_class,
        candidates_per_class=np.bincount(cand_label, minlength=num_classes),
        filled_from_fallback=np.zeros(num_classes, dtype=np.int64),
        short=(k - per_class) if balance else np.zeros(num_classes, dtype=np.int64),
        quota=int(k) * int(num_classes),
    )


def _first_per_group(pos, group, tier, key_of, index, quota):
    """The positions among `pos` that come first in their group, quota[g] of group g, in the
    order (tier, key, global index): sort by (key, index), then stably by (group, tier), then keep
    the elements whose rank inside their group is below the group's quota. tier None: all alike.
    key_of(positions) gives the fine keys."""
    pos = pos[_order_by_key_then_index(key_of(pos), index[pos])]
    minor = tier[pos] if tier is not None else 0
    pos = pos[np.argsort(_pack(group[pos], minor, 4), kind="stable")]
    g = group[pos]
    size = np.bincount(g, minlength=len(quota))
    start = np.cumsum(size) - size
    rank = np.arange(len(pos)) - start[g]
    return pos[rank < quota[g]]


def _order_by_key_then_index(key, index):
    """Argsort by (key, index) for unique indices, using two fast unstable sorts.

    Sort by key, number the distinct keys 0, 1, 2, ... in that order (equal keys share a number,
    -0.0 equals 0.0), then sort by (number, index) packed into one uint64, which has no ties."""
    n = len(key)
    if n == 0 or index.max() >= 2 ** 32:
        return np.lexsort((index, key))
    order = np.argsort(key)
    sorted_key = key[order]
    number = np.zeros(n, dtype=np.uint64)
    np.cumsum(sorted_key[1:] != sorted_key[:-1], out=number[1:])
    packed = (number << np.uint64(32)) | index[order].astype(np.uint64)
    return order[np.argsort(packed)]


def _pack(major, minor, minor_size):
    """major * minor_size + minor in the smallest unsigned dtype (<= 16 bits gets radix sort)."""
    packed = major * minor_size + minor
    limit = (int(major.max()) + 1) * minor_size if len(major) else 1
    for dtype in (np.uint8, np.uint16, np.uint32):
        if limit <= np.iinfo(dtype).max + 1:
            return packed.astype(dtype)
    return packed.astype(np.uint64)


def _random_keys(index, seed):
    """splitmix64(index + salt), salt from np.random.default_rng(seed): random, unique, order-free."""
    salt = np.random.default_rng(seed).integers(2 ** 64, dtype=np.uint64)
    z = index.astype(np.uint64) + salt
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _check_inputs(index, label, pred, hardness, teacher_correct, k, coarse, fine, num_classes):
    if coarse not in COARSE:
        raise ConfigError(f"config key 'ccfs.coarse' must be one of {', '.join(COARSE)}, got {coarse!r}")
    if fine not in FINE:
        raise ConfigError(f"config key 'ccfs.fine' must be one of {', '.join(FINE)}, got {fine!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ConfigError(f"selection: images per class k must be a non-negative integer, got {k!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ConfigError(f"selection: num_classes must be a positive integer, got {num_classes!r}")
    arrays = {"index": np.asarray(index), "label": np.asarray(label), "pred": np.asarray(pred),
              "hardness": np.asarray(hardness)}
    if teacher_correct is not None:
        arrays["teacher_correct"] = np.asarray(teacher_correct)
    n = len(arrays["index"]) if arrays["index"].ndim == 1 else -1
    for name, a in arrays.items():
        if a.ndim != 1 or len(a) != n:
            shapes = ", ".join(f"{key} {v.shape}" for key, v in arrays.items())
            raise DataError(f"selection: pool arrays must be 1-D and of equal length, got {shapes}")
    for name in ("index", "label", "pred"):
        if n and not np.issubdtype(arrays[name].dtype, np.integer):
            raise DataError(f"selection: '{name}' must hold integers, got dtype {arrays[name].dtype}")
    index = arrays["index"].astype(np.int64, copy=False)
    label = arrays["label"].astype(np.int64, copy=False)
    pred = arrays["pred"].astype(np.int64, copy=False)
    hardness = arrays["hardness"].astype(np.float64, copy=False)
    if n and (label.min() < 0 or label.max() >= num_classes):
        bad = np.flatnonzero((label < 0) | (label >= num_classes))
        raise DataError(f"selection: {len(bad)} labels outside [0, {num_classes}) "
                        f"(global indices {index[bad[:5]].tolist()}); check num_classes against the data")
    if n and index.min() < 0:
        bad = np.flatnonzero(index < 0)
        raise DataError(f"selection: {len(bad)} negative global indices (first {index[bad[:5]].tolist()})")
    if n and not _unique(index):
        values, counts = np.unique(index, return_counts=True)
        dup = values[counts > 1]
        raise DataError(f"selection: pool indices must be unique, {len(dup)} repeated "
                        f"(first: {dup[:5].tolist()}); the prediction pass saw some samples twice")
    nan = np.isnan(hardness)
    if nan.any():
        bad = np.flatnonzero(nan)
        raise DataError(f"selection: {len(bad)} NaN difficulty values (global indices "
                        f"{index[bad[:5]].tolist()}); the score file or the filter outputs are broken")
    if teacher_correct is not None:
        tc = arrays["teacher_correct"]
        if tc.dtype != np.bool_:
            raise DataError(f"selection: 'teacher_correct' must be a bool array, got dtype {tc.dtype}")
        teacher_correct = tc
    return index, label, pred, hardness, teacher_correct


def _unique(index):
    """True if the non-negative int array has no repeats (a bitmap when the range is small)."""
    top = int(index.max())
    if top < 16 * len(index) + 1024:
        seen = np.zeros(top + 1, dtype=bool)
        seen[index] = True
        return int(np.count_nonzero(seen)) == len(index)
    return len(np.unique(index)) == len(index)
