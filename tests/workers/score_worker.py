"""Score the digits pool with a fixed model under any number of processes; rank 0 saves the results.

Usage: score_worker.py OUT_DIR   (run directly or under `accelerate launch`): OUT_DIR/full.npz scores the
whole pool, OUT_DIR/subset.npz an uneven, shuffled part of it (both from one process start).
"""
import sys

import numpy as np
import torch

from ccfs_dist.data.sources import load_real
from ccfs_dist.runtime.dist import exit_process, make_accelerator, relaunch_cpu_processes
from ccfs_dist.training.models import build_model
from ccfs_dist.training.predict import predict


def main(out):
    accelerator = make_accelerator(timeout_s=120)
    data = load_real({"source": "digits", "root": None, "image_size": None, "distilled": None})
    torch.manual_seed(0)
    model = build_model({"name": "convnet", "width": 16, "depth": 2, "norm": "batchnorm"},
                        data.num_classes, data.channels, data.image_size)
    full = np.arange(len(data.train))
    subset = np.random.default_rng(1).permutation(full)[:1001]   # uneven, shuffled: what earlier phases left
    for name, index in (("full", full), ("subset", subset)):
        results, _ = predict(accelerator, model, data.train, index,
                             norm=data.norm, batch_size=97)
        if accelerator.is_main_process:
            np.savez(f"{out}/{name}.npz", world=accelerator.num_processes, **results)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    relaunch_cpu_processes([__file__, *sys.argv[1:]])
    main(sys.argv[1])
    exit_process(0)
