"""An independent re-computation of what a finished run had to select, from its own saved artifacts.

Written from the paper's rule (CCFS, CVPR 2025, Algorithm 1) in plain Python, sharing no code with
ccfs_dist.ccfs.selection or ccfs_dist.ccfs.curriculum, so that a bug in the engine's selection path (or in how a
run wires difficulty, teacher predictions and the pool into it) makes the run disagree with it:

    pool_j      every training sample not selected in phases 1..j-1
    coarse      the phase's filter misclassifies it (ccfs.coarse: misclassified) and the teacher
                classifies it correctly (ccfs.teacher_correct)
    fine        per class, in the difficulty order of ccfs.fine (simple: easiest first), ties by the
                smaller global index; the first k_j of each class
    fallback    a class with fewer than k_j coarse candidates takes them all, then the samples that are
                misclassified but not teacher-correct, then the rest of its pool, each in the same order

Difficulty (how hard a sample is, larger = harder), written out here per method:
    logits      minus the filter's true-class logit (phase_<j>/predictions.npz `true_logit`)
    forgetting  the run's scores_forgetting.npy (more forgetting events = harder)
"""
import json
import os

import numpy as np


def hardness_of(out, method, preds):
    """{global index: hardness} of the scored samples of one phase."""
    if method == "logits":
        return {int(i): -float(t) for i, t in zip(preds["index"], preds["true_logit"])}
    if method in ("forgetting", "loss", "el2n"):
        scores = np.load(os.path.join(out, f"scores_{method}.npy"), allow_pickle=False)
        return {int(i): float(scores[i]) for i in preds["index"]}
    raise ValueError(f"no independent rule written for difficulty {method!r}")


def expected_phase(labels, pred, hard, teacher_ok, k, num_classes, fine="simple"):
    """The indices phase selection must give (a sorted list) for one phase's pool.

    labels, pred, hard, teacher_ok: dicts over the pool's global indices."""
    chosen = []
    for c in range(num_classes):
        members = [i for i in labels if labels[i] == c]

        def tier(i):
            if pred[i] != labels[i]:
                return 1 if teacher_ok[i] else 2
            return 3
        sign = 1.0 if fine == "simple" else -1.0
        members.sort(key=lambda i: (tier(i), sign * hard[i], i))
        chosen += members[:k]
    return sorted(chosen)


def recheck_run(out, num_classes, n_train):
    """Recompute every phase's selection of the finished run at `out` (ccfs.compat: none, balance: true,
    coarse: misclassified, fine: simple or hard) and compare it with what the run saved; returns the
    per-phase selections. Also checks that each phase's pool is exactly the samples not selected before,
    and that selected_indices.json is the union of the phases."""
    summary = json.load(open(os.path.join(out, "summary.json")))
    import yaml
    cfg = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    c = cfg["ccfs"]
    assert c["compat"] == "none" and c["balance"] and c["coarse"] == "misclassified", "rule written for these only"
    tp = np.load(os.path.join(out, "teacher_predictions.npz"), allow_pickle=False)
    if c["teacher_correct"]:
        teacher_ok = {int(i): bool(p == y) for i, p, y in zip(tp["index"], tp["pred"], tp["label"])}
    else:
        teacher_ok = {int(i): True for i in tp["index"]}
    before, phases = set(), []
    for j, k in enumerate(summary["budgets"], 1):
        preds = np.load(os.path.join(out, f"phase_{j}", "predictions.npz"), allow_pickle=False)
        index = [int(i) for i in preds["index"]]
        assert sorted(index) == sorted(set(range(n_train)) - before), f"phase {j}: the pool is not N - S"
        labels = dict(zip(index, (int(y) for y in preds["label"])))
        assert all(labels[i] == int(tp["label"][i]) for i in index)
        pred = dict(zip(index, (int(p) for p in preds["pred"])))
        hard = hardness_of(out, summary["difficulty"], preds)
        want = expected_phase(labels, pred, hard, teacher_ok, k, num_classes, fine=c["fine"])
        got = sorted(np.load(os.path.join(out, f"phase_{j}", "selected.npy"), allow_pickle=False).tolist())
        assert got == want, f"phase {j}: selected {len(got)} differ from the rule's {len(want)} " \
                            f"({len(set(got) ^ set(want))} not shared)"
        phases.append(got)
        before |= set(got)
    final = json.load(open(os.path.join(out, "selected_indices.json")))["idx_selected"]
    assert sorted(final) == sorted(before) and len(final) == len(before)
    return phases
