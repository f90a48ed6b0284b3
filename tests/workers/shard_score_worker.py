"""Score shard pools (streamed) and, with --memory, the same data in memory, with fixed models.

Usage: shard_score_worker.py CASES.json OUT_DIR [--memory]   (run directly or under `accelerate launch`)

CASES.json: a list of {"name", "memory": <data config of the original source>, "train": <train index JSON>,
"workers": <DataLoader workers>, "subset": <bool>[, "decode": data.decode, default cpu]}. Rank 0 writes OUT_DIR/<name>.stream.npz (and
<name>.memory.npz with --memory), each with the world size and the scorer's per-sample fields.
"""
import json
import os
import sys

import numpy as np
import torch

from ccfs_dist.data.sources import load_real
from ccfs_dist.runtime.dist import exit_process, make_accelerator, relaunch_cpu_processes
from ccfs_dist.training.models import build_model
from ccfs_dist.training.predict import predict
from ccfs_dist.data.pool import Norm
from ccfs_dist.data.shards.reader import ShardPool


def model_for(num_classes, shape):
    torch.manual_seed(0)
    return build_model({"name": "convnet", "width": 8, "depth": 2, "norm": "batchnorm"},
                       num_classes, shape[0], shape[1])


def main(cases_path, out_dir, memory):
    accelerator = make_accelerator(timeout_s=120)
    with open(cases_path) as f:
        cases = json.load(f)
    for case in cases:
        split = ShardPool(case["train"], num_workers=case["workers"], decode=case.get("decode", "cpu"))
        norm = Norm(tuple(split.meta["mean"]), tuple(split.meta["std"]))
        index = np.arange(len(split))
        if case["subset"]:               # an uneven, shuffled pool: what is left after earlier phases
            index = np.random.default_rng(1).permutation(index)[:len(index) * 2 // 3]
        runs = {"stream": (split, norm)}
        if memory:
            data = load_real(case["memory"])
            runs["memory"] = (data.train, data.norm)
        for kind, (pool, pool_norm) in runs.items():
            model = model_for(len(split.classes), split.shape)
            results, _ = predict(accelerator, model, pool, index, norm=pool_norm, batch_size=37)
            if accelerator.is_main_process:
                np.savez(os.path.join(out_dir, f"{case['name']}.{kind}.npz"),
                         world=accelerator.num_processes, **results)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    relaunch_cpu_processes([__file__, *sys.argv[1:]])
    main(sys.argv[1], sys.argv[2], "--memory" in sys.argv)
    exit_process(0)
