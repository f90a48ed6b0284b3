"""Benchmark ccfs_dist.ccfs.selection.select against per-class Python sorting (the official approach).

Builds a synthetic ImageNet-1K-sized pool (default 1,281,167 samples, 1000 classes) with random
labels, filter predictions (30 % wrong), teacher correctness (80 % right) and a forgetting-like
difficulty in steps of 0.2 (many ties), shuffled as a gathered distributed result would be. For each
of the six coarse x fine combinations, with balance on and off, it times the vectorised `select`
(best of --repeats) and three plain Python implementations of the same rule:
  official  the engine's rule (ties by global index, fallback tiers) written in the *style* of the
            official CCFS code's selection_score: Python sets for the coarse step, per-class lists
            of the candidates bucketed by indexing the labels as a torch CPU tensor (its
            `true_labels = labels_all.cpu()`), `sorted` with a key lambda over the numpy score
            array, the first k of each; it is a timing baseline, not the official picks (those
            break ties in set order and have no fallback: ccfs.compat=official, select_official)
  numpy     the same with the labels as a numpy array: a faster Python baseline than the official code
  full      the straightforward way: Python lists, every pool sample in its class list, one `sorted`
            per class with the key (tier, fine key, index)
All get select's random keys precomputed (untimed) so that fine=random can be compared exactly.
It checks that all four select the same indices and prints a table; exit status 1 if they do not.
Targets: vectorised <= 1 s and >= 50x faster than the official version.

    python launch/bench_selection.py                      # full size, a few minutes
    python launch/bench_selection.py --n 50000 --classes 100 --json out/bench_selection.json
"""
import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

from ccfs_dist.bench.pools import make_pool  # noqa: E402  (shared with launch/bench.py's select_1k phase)
from ccfs_dist.runtime.io import write_json  # noqa: E402
from ccfs_dist.ccfs.selection import _random_keys, select  # noqa: E402

COMBOS = [(c, f) for c in ("misclassified", "correct") for f in ("simple", "hard", "random")]


def python_official(index, label, pred, hardness, k, coarse, fine, balance, teacher_correct, num_classes,
                    random_key, true_labels=None):
    """The engine's rule written in the official code's style (not its picks: the key breaks ties by
    (hardness, index), where the official code keeps set order): Python sets for the coarse step,
    per-class lists of the candidates, `sorted` with a key lambda that indexes the numpy arrays, the
    first k of each; the later tiers are built only for classes left short. `true_labels` is what the
    per-class bucketing indexes: the official code's torch CPU tensor, or (None) the numpy labels.
    random_key is select's per-sample random key, computed outside the timing."""
    n = len(index)
    true_labels = label if true_labels is None else true_labels
    coarse_ok = np.flatnonzero(pred != label) if coarse == "misclassified" else np.flatnonzero(pred == label)
    target = set(coarse_ok.tolist())
    candidates = target & set(np.flatnonzero(teacher_correct).tolist())
    if fine == "simple":
        key = lambda i: (hardness[i], index[i])     # noqa: E731
    elif fine == "hard":
        key = lambda i: (-hardness[i], index[i])    # noqa: E731
    else:
        key = lambda i: random_key[i]               # noqa: E731

    def later_tiers():
        return [sorted(target - candidates), sorted(set(range(n)) - target)]

    if balance:
        per_class = [[] for _ in range(num_classes)]
        for i in candidates:
            per_class[true_labels[i]].append(i)
        chosen, short = [], {}
        for c in range(num_classes):
            first = sorted(per_class[c], key=key)[:k]
            chosen += first
            if len(first) < k:
                short[c] = k - len(first)
        if short:
            for pool in later_tiers():
                by_class = {c: [] for c in short}
                for i in pool:
                    c = int(true_labels[i])
                    if c in by_class:
                        by_class[c].append(i)
                for c, members in by_class.items():
                    more = sorted(members, key=key)[:short[c]]
                    chosen += more
                    short[c] -= len(more)
    else:
        quota = k * num_classes
        chosen = sorted(candidates, key=key)[:quota]
        if len(chosen) < quota:
            for pool in later_tiers():
                chosen += sorted(pool, key=key)[:quota - len(chosen)]
    return sorted(index[i] for i in chosen)


def python_full(index, label, pred, hardness, k, coarse, fine, balance, teacher_correct, num_classes,
                random_key):
    """The rule written the straightforward way: Python lists, every pool sample in its class list,
    one `sorted` per class with the key (tier, fine key, index), the first k of each."""
    index, label, pred = index.tolist(), label.tolist(), pred.tolist()
    hardness, teacher_correct, random_key = hardness.tolist(), teacher_correct.tolist(), random_key.tolist()
    misclassified = coarse == "misclassified"
    tier = [((0 if t else 1) if (p != y) == misclassified else 2) for p, y, t in zip(pred, label, teacher_correct)]
    if fine == "simple":
        key = lambda i: (tier[i], hardness[i], index[i])     # noqa: E731
    elif fine == "hard":
        key = lambda i: (tier[i], -hardness[i], index[i])    # noqa: E731
    else:
        key = lambda i: (tier[i], random_key[i])             # noqa: E731
    if balance:
        per_class = [[] for _ in range(num_classes)]
        for i, y in enumerate(label):
            per_class[y].append(i)
        chosen = [i for members in per_class for i in sorted(members, key=key)[:k]]
    else:
        chosen = sorted(range(len(index)), key=key)[:k * num_classes]
    return sorted(index[i] for i in chosen)


def best_of(repeats, fn):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_281_167, help="pool samples (default: ImageNet-1K train, 1281167)")
    p.add_argument("--classes", type=int, default=1000, help="number of classes (default 1000)")
    p.add_argument("--k", type=int, default=100,
                   help="images per class to select (default 100; above ~300 misclassified classes run short "
                        "and the fallback tiers are exercised)")
    p.add_argument("--repeats", type=int, default=3, help="timing runs of select; the best counts (default 3)")
    p.add_argument("--python-repeats", type=int, default=1,
                   help="timing runs of each Python version; the best counts (default 1, they are slow)")
    p.add_argument("--no-full", action="store_true", help="skip the full-pool Python variant (halves the run time)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic pool and of fine=random")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)

    index, label, pred, hardness, teacher_correct = make_pool(args.n, args.classes, args.seed)
    random_key = _random_keys(index, args.seed)
    labels_torch = torch.from_numpy(label)             # the official code's `true_labels = labels_all.cpu()`
    print(f"pool: {args.n} samples, {args.classes} classes, k={args.k}, teacher_correct on, "
          f"numpy {np.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs")
    baselines = [("official", lambda *a: python_official(*a, true_labels=labels_torch)),
                 ("numpy", python_official)] + ([] if args.no_full else [("full", python_full)])
    header = f"{'coarse':<14}{'fine':<7}{'balance':<8}{'vectorised s':>13}" + "".join(
        f"{name + ' s':>12}{'speedup':>9}" for name, _ in baselines) + "  match"
    print(header)
    print("-" * len(header))
    rows = []
    for coarse, fine in COMBOS:
        for balance in (True, False):
            kw = dict(coarse=coarse, fine=fine, balance=balance, teacher_correct=teacher_correct,
                      num_classes=args.classes, seed=args.seed)
            t_vec, sel = best_of(args.repeats, lambda: select(index, label, pred, hardness, args.k, **kw))
            ref_args = (index, label, pred, hardness, args.k, coarse, fine, balance, teacher_correct, args.classes,
                        random_key)
            row = dict(coarse=coarse, fine=fine, balance=balance, vectorised_s=round(t_vec, 4),
                       selected=len(sel.indices))
            line, match = "", True
            for name, fn in baselines:
                t_py, ref = best_of(args.python_repeats, lambda: fn(*ref_args))
                match = match and sel.indices.tolist() == ref
                row.update({f"{name}_s": round(t_py, 3), f"{name}_speedup": round(t_py / t_vec, 1)})
                line += f"{t_py:>12.2f}{t_py / t_vec:>8.1f}x"
            row["match"] = match
            rows.append(row)
            print(f"{coarse:<14}{fine:<7}{str(balance):<8}{t_vec:>13.4f}{line}  {'yes' if match else 'NO'}",
                  flush=True)
    ok = all(r["match"] for r in rows)
    print(f"worst vectorised {max(r['vectorised_s'] for r in rows):.3f} s (target <= 1 s); smallest speedup over "
          + ", ".join(f"{name} {min(r[name + '_speedup'] for r in rows):.0f}x" for name, _ in baselines)
          + f" (target >= 50x over official); outputs identical: {ok}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, dict(n=args.n, classes=args.classes, k=args.k, repeats=args.repeats,
                                   python_repeats=args.python_repeats, seed=args.seed, numpy=np.__version__,
                                   torch=torch.__version__, python=platform.python_version(),
                                   cpus=os.cpu_count(), rows=rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
