"""Evaluation: train fresh models on a final set and report test accuracy (the random baselines' indices
are drawn by selection.random_per_class).

Two regimes (`eval.labels`: kd | hard | both) train the evaluation models of every set: "kd", knowledge
distillation from the teacher (the paper's protocol; the labels are unused), and "hard", cross-entropy on
the true labels with the same recipe and seeds, without the teacher. Under KD the teacher's soft labels
carry much of the signal, so subsets of different quality score alike; under hard labels the subset
itself is judged. The KD regime keeps the artifact names and summary keys it always had; the hard
regime's carry "hard" (`regime_suffix`), so the two can never be mixed up.
"""
import numpy as np

from ccfs_dist.training.fused import train_fused
from ccfs_dist.training.models import seeded_model
from ccfs_dist.training.predict import accuracy
from ccfs_dist.runtime.rundir import regime_suffix
from ccfs_dist.training.train import train_model


def evaluate_run(accelerator, images, labels, *, data, model_cfg, recipe, teacher, seed, desc, checkpoint=None,
                 best_after=0.8):
    """Train one fresh model on (images, labels); its final-epoch test accuracy (the headline) and the
    official protocol's figure, with the recipe it trained with.

    "official": the best test accuracy over every epoch e (0-based) with e > best_after * epochs, as
    ccfs_*.py's curriculum_train measures it (`if epoch > args.epochs * 0.8`) and reports it; the epoch
    is selected on the test set, so it is labelled as such wherever it is shown. (After a mid-training
    resume, over the epochs trained since, and always including the final epoch.)
    """
    seen, track = _tracker(accelerator, data, recipe, best_after)
    model = seeded_model(model_cfg, data, seed)
    model, _ = train_model(accelerator, model, images, labels, recipe, norm=data.norm, teacher=teacher,
                           seed=seed, desc=desc, on_epoch_end=track, checkpoint=checkpoint)
    return _result(accelerator, model, data, recipe, seen)


def _tracker(accelerator, data, recipe, best_after):
    """(the test accuracies seen, the on_epoch_end hook that measures them after best_after * epochs)."""
    seen = []

    def track(epoch, live_model):
        if epoch > best_after * recipe.epochs:
            seen.append(accuracy(accelerator, live_model, data.test, norm=data.norm))
    return seen, track


def _result(accelerator, model, data, recipe, seen):
    final = accuracy(accelerator, model, data.test, norm=data.norm)
    return {"final": final, "official": max(seen + [final]), "official_epochs": len(seen),
            "recipe": recipe.recorded()}


def evaluate_fused(accelerator, sets, *, regime, teacher, data, model_cfg, recipe, seeds, desc, checkpoints,
                   best_after=0.8):
    """evaluate_in_regime of K models trained as one fused training (fused.py; plan.fuse): model k seeded
    `seeds[k]` (its initial weights, order and augmentation, as evaluate_run's) on `sets[k]` = (images,
    labels), with its own state file `checkpoints[k]`; the K results in order."""
    if regime not in REGIMES:
        raise ValueError(f"unknown evaluation regime {regime!r}")
    models = [seeded_model(model_cfg, data, seed) for seed in seeds]
    trackers = [_tracker(accelerator, data, recipe, best_after) for _ in seeds]
    trained = train_fused(accelerator, models, sets, recipe, norm=data.norm, seeds=seeds,
                          teacher=teacher if regime == "kd" else None, desc=desc,
                          on_epoch_end=[track for _, track in trackers], checkpoints=checkpoints)
    return [{**_result(accelerator, model, data, recipe, seen), "regime": regime}
            for (model, _), (seen, _) in zip(trained, trackers)]


REGIMES = ("kd", "hard")
REGIME_LABELS = {"kd": "KD from the teacher", "hard": "hard labels (cross-entropy)"}


def regimes(cfg):
    """The evaluation regimes a run trains (eval.labels), KD first."""
    labels = cfg["eval"]["labels"]
    return REGIMES if labels == "both" else (labels,)


def summary_key(regime):
    """summary.json's key of a regime's results: "evaluation" (KD), "evaluation_hard"."""
    return "evaluation" + regime_suffix(regime)


def lead_key(regime):
    """summary.json's key of CCFS's lead over each baseline in a regime: "ccfs_lead", "ccfs_lead_hard"."""
    return "ccfs_lead" + regime_suffix(regime)


def eval_key(name, r, regime):
    """The plan's key of evaluation run r of set `name` in `regime`: (name, r) for KD, as before;
    (name, r, "hard") for hard labels."""
    return (name, r) if regime == "kd" else (name, r, regime)


def regime_of(key):
    return key[2] if len(key) > 2 else "kd"


def evaluate_in_regime(accelerator, images, labels, *, regime, teacher, **kw):
    """evaluate_run in `regime`: with the teacher (KD), or without it (cross-entropy on `labels`); the
    result records its regime."""
    if regime not in REGIMES:
        raise ValueError(f"unknown evaluation regime {regime!r}")
    result = evaluate_run(accelerator, images, labels, teacher=teacher if regime == "kd" else None, **kw)
    return {**result, "regime": regime}


def lead(ccfs_runs, baseline_runs):
    """CCFS's lead over a baseline, in points: run r of each set is trained with the same seed (paired):
    mean ± std (population) of the per-run differences, and how many runs CCFS is ahead / behind."""
    d = 100 * (np.asarray(ccfs_runs, dtype=float) - np.asarray(baseline_runs, dtype=float))
    return {"mean": float(d.mean()), "std": float(d.std()), "ahead": int((d > 0).sum()), "behind": int((d < 0).sum())}


def leads(evaluation):
    """{baseline: lead} of one regime's {set: summarize(...)}; empty without baselines."""
    if "ccfs" not in evaluation:
        return {}
    return {name: lead(evaluation["ccfs"]["final"], r["final"]) for name, r in evaluation.items() if name != "ccfs"}


def summarize(runs):
    """Mean ± std (population) over evaluation runs (each a dict from evaluate_run). A run resumed from
    an older version's JSON has no official figure: then the official mean and std are None."""
    final = [r["final"] for r in runs]
    official = [r.get("official") for r in runs]
    known = None not in official
    return {"final": final, "official": official, "mean": float(np.mean(final)), "std": float(np.std(final)),
            "official_mean": float(np.mean(official)) if known else None,
            "official_std": float(np.std(official)) if known else None}
