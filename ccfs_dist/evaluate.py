"""Evaluation: train fresh models on a final set and report test accuracy (the random baselines' indices
are drawn by selection.random_per_class)."""
import numpy as np
import torch

from .models import build_model
from .predict import accuracy
from .train import train_model


def evaluate_run(accelerator, images, labels, *, data, model_cfg, recipe, teacher, seed, desc, checkpoint=None,
                 best_after=0.8):
    """Train one fresh model on (images, labels); its final-epoch test accuracy (the headline) and the
    official protocol's figure, with the recipe it trained with.

    "official": the best test accuracy over every epoch e (0-based) with e > best_after * epochs, as
    ccfs_*.py's curriculum_train measures it (`if epoch > args.epochs * 0.8`) and reports it; the epoch
    is selected on the test set, so it is labelled as such wherever it is shown. (After a mid-training
    resume, over the epochs trained since, and always including the final epoch.)
    """
    seen = []

    def track(epoch, live_model):
        if epoch > best_after * recipe.epochs:
            seen.append(accuracy(accelerator, live_model, data.test, mean=data.mean, std=data.std))

    torch.manual_seed(seed)
    model = build_model(model_cfg, data.num_classes, data.channels, data.image_size)
    model, _ = train_model(accelerator, model, images, labels, recipe, mean=data.mean, std=data.std, teacher=teacher,
                           seed=seed, desc=desc, on_epoch_end=track, checkpoint=checkpoint)
    final = accuracy(accelerator, model, data.test, mean=data.mean, std=data.std)
    return {"final": final, "official": max(seen + [final]), "official_epochs": len(seen),
            "recipe": recipe.recorded()}


def summarize(runs):
    """Mean ± std (population) over evaluation runs (each a dict from evaluate_run). A run resumed from
    an older version's JSON has no official figure: then the official mean and std are None."""
    final = [r["final"] for r in runs]
    official = [r.get("official") for r in runs]
    known = None not in official
    return {"final": final, "official": official, "mean": float(np.mean(final)), "std": float(np.std(final)),
            "official_mean": float(np.mean(official)) if known else None,
            "official_std": float(np.std(official)) if known else None}
