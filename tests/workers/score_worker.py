"""Score the digits pool with a fixed model under any number of processes; rank 0 saves the results.

Usage: score_worker.py OUT.npz [--subset]   (run directly or under `accelerate launch`)
"""
import sys

import numpy as np
import torch

from ccfs_dist.sources import load_real
from ccfs_dist.dist import exit_process, make_accelerator, relaunch_cpu_processes
from ccfs_dist.models import build_model
from ccfs_dist.predict import predict


def main(out, subset):
    accelerator = make_accelerator(timeout_s=120)
    data = load_real({"source": "digits", "root": None, "image_size": None, "distilled": None})
    torch.manual_seed(0)
    model = build_model({"name": "convnet", "width": 16, "depth": 2, "norm": "batchnorm"},
                        data.num_classes, data.channels, data.image_size)
    index = np.arange(len(data.train))
    if subset:                       # an uneven, shuffled pool: what is left after earlier phases
        index = np.random.default_rng(1).permutation(index)[:1001]
    results, _ = predict(accelerator, model, data.train, index,
                         mean=data.mean, std=data.std, batch_size=97)
    if accelerator.is_main_process:
        np.savez(out, world=accelerator.num_processes, **results)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    relaunch_cpu_processes([__file__, *sys.argv[1:]])
    main(sys.argv[1], "--subset" in sys.argv)
    exit_process(0)
