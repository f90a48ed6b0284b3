"""One training split over the ranks (DDP, as the plan does when train.min_batch_per_rank allows), with
a BatchNorm ConvNet; rank 0 saves every rank's parameters and buffers, just before the closing broadcast
and at the end, to OUT.npz (keys before, after: world x values), and every rank's answer to whether a split
job has finished when only rank 0 sees its artifact (key finished: world values; jobs.finished).

Usage (under accelerate launch): split_worker.py OUT.npz
"""
import sys

import numpy as np
import torch

from ccfs_dist.runtime import jobs
from ccfs_dist.training import train
from ccfs_dist.data.sources import load_real
from ccfs_dist.runtime.dist import exit_process, make_accelerator, relaunch_cpu_processes
from ccfs_dist.training.models import build_model
from ccfs_dist.runtime.plan import Job

states = {}


def flat(model):
    return torch.cat([t.detach().float().flatten() for t in list(model.parameters()) + list(model.buffers())])


def recording_broadcast(real):
    def broadcast_state(accelerator, module, src=0):
        states["before"] = accelerator.gather(flat(module)[None])
        return real(accelerator, module, src)
    return broadcast_state


def main(out):
    acc = make_accelerator(timeout_s=120)
    train.broadcast_state = recording_broadcast(train.broadcast_state)
    data = load_real({"source": "digits", "root": None, "image_size": None, "distilled": None})
    torch.manual_seed(0)
    model = build_model({"name": "convnet", "width": 8, "depth": 2, "norm": "batchnorm"}, data.num_classes,
                        data.channels, data.image_size)
    model, _ = train.train_model(acc, model, data.train.images[:512], data.train.labels[:512],
                                 train.Recipe(epochs=2, batch_size=64, lr=0.05, scale_min=0.5, flip=False),
                                 norm=data.norm, seed=0)
    after = acc.gather(flat(model)[None])

    def lagging(job):                  # rank 0 sees the artifact, the other ranks' file system does not yet
        return acc.is_main_process
    done = jobs.finished(acc, Job("filter", (1,), 1.0, True), lagging)
    finished = acc.gather(torch.tensor([done]))
    if acc.is_main_process:
        np.savez(out, before=states["before"].numpy(), after=after.numpy(), world=acc.num_processes,
                 finished=finished.numpy())
    acc.wait_for_everyone()


if __name__ == "__main__":
    relaunch_cpu_processes([__file__, *sys.argv[1:]])
    main(sys.argv[1])
    exit_process(0)
