"""Difficulty scores of digits with planted label noise, under any number of processes; rank 0 saves them.

Usage: scores_worker.py OUT.npz   (run directly or under `accelerate launch`)

Two recipes split every run over the ranks (train.min_batch_per_rank=1), both with a ConvNet whose
normalisation is per sample (instancenorm), so that 1- and N-process training compute the same function
of the same inputs (BatchNorm would use per-rank batch statistics: a different computation, not only a
different rounding):
  frozen  lr 0: the weights never move, every observation is the initial model on an augmented view;
          only the distributed bookkeeping (observe, gather, last presentation per epoch) is tested.
  train   a real short training run: 1- and N-process runs differ by floating-point reduction order only.
The third, whole, is the default rule (runs of batch 128 are not split): each run trains whole on one
rank, with BatchNorm; 1 and N processes give the same scores, bitwise.
"""
import sys

import numpy as np

from ccfs_dist.config import load_config
from ccfs_dist.cli import DEFAULT_CONFIG as DIGITS_CONFIG
from ccfs_dist.runtime.dist import exit_process, make_accelerator, relaunch_cpu_processes
from ccfs_dist.bench.stream_pools import planted_digits  # noqa: F401  (also this worker's API: test_scores)
from ccfs_dist.training.scores import training_dynamics

COMMON = ["model.width=16", "model.depth=2", "model.norm=instancenorm", "scores.runs=2", "scores.batch_size=128"]
SPLIT = ["train.min_batch_per_rank=1"]        # every run data-parallel over the ranks
RECIPES = {
    "frozen": COMMON + SPLIT + ["scores.epochs=6", "scores.el2n_epoch=3"],
    "train": COMMON + SPLIT + ["scores.epochs=20", "scores.lr=0.1"],
    "whole": COMMON + ["scores.epochs=6", "model.norm=batchnorm"],   # the default rule: each run on one rank
}


def compute_all(accelerator):
    data, planted = planted_digits()
    out = {"planted": planted, "world": accelerator.num_processes}
    for name, overrides in RECIPES.items():
        cfg = load_config(DIGITS_CONFIG, overrides)
        if name == "frozen":
            cfg["scores"]["lr"] = 0.0            # below the config's "positive" check: weights never move
        scores, _ = training_dynamics(accelerator, cfg, data)
        for method, values in scores.items():
            out[f"{name}_{method}"] = values
    return out


def main(out):
    accelerator = make_accelerator(timeout_s=120)
    results = compute_all(accelerator)
    if accelerator.is_main_process:
        np.savez(out, **results)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    relaunch_cpu_processes([__file__, *sys.argv[1:]])
    main(sys.argv[1])
    exit_process(0)
