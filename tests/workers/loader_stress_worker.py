"""Start loader workers again and again in ranks that run threads: every pass over a shard pool goes through
loader workers (ShardPool.batches and .stream in turn), a fresh set of workers (a new ShardPool) every
PER_POOL-th pass, while the rank's gloo threads, a tqdm bar's monitor thread and a busy Python thread run.

Usage: loader_stress_worker.py INDEX.json PASSES [PER_POOL]   (PASSES 0: until stopped; under `accelerate
launch`). Every pass checks that it delivered exactly its wanted samples, and the ranks sum their passes in a
collective after each; rank 0 prints `passes <total over ranks> starts <worker starts over ranks> in <s> s`.
"""
import hashlib
import os
import sys
import threading
import time

from ccfs_dist.runtime.relaunch import relaunch_cpu_processes

WORKERS = 2


def busy(stop):
    """A Python thread that takes and drops the interpreter lock all the time (what tqdm, gloo's Python side
    or a logging thread do now and then): a child forked from this process would often inherit it held."""
    data = b"x" * 4096
    while not stop.wait(0.001):
        hashlib.sha256(data).digest()


def main(index_path, passes, per_pool):
    import numpy as np
    import torch
    from tqdm import tqdm
    from ccfs_dist.runtime.dist import exit_process, make_accelerator
    from ccfs_dist.data.shards.reader import ShardPool

    acc = make_accelerator(timeout_s=120)
    rank, world = acc.process_index, acc.num_processes
    stop = threading.Event()
    threading.Thread(target=busy, args=(stop,), daemon=True).start()
    bar = tqdm(total=passes or None, desc=f"rank {rank} passes", mininterval=0.01, file=sys.stderr)
    split, starts, t0, i = None, 0, time.monotonic(), 0
    cpu = torch.device("cpu")
    while passes == 0 or i < passes:
        if i % per_pool == 0:
            if split is not None:
                split.close()
            split = ShardPool(index_path, num_workers=WORKERS, worker_timeout=60)
            starts += WORKERS
        rng = np.random.default_rng(i)
        index = np.sort(rng.permutation(len(split))[:len(split) // 4])
        if i % 2:
            got = np.concatenate([ids.numpy() for _, _, ids in split.batches(index, 64, rank, world, cpu)])
            mask = np.zeros(len(split), dtype=bool)
            mask[index] = True
            want = np.concatenate([np.flatnonzero(mask[s["first"]:s["first"] + s["count"]]) + s["first"]
                                   for s in (split.shards[k] for k in split.rank_shards(mask, rank, world))])
        else:
            mask = np.zeros(len(split), dtype=bool)
            mask[index] = True
            positions = [k for k in split.shards_with(mask)][rank::world]
            got = np.concatenate([ids.numpy() for _, _, ids in split.stream(positions, mask, 50, interleave=2,
                                                                            seed=(i, rank))])
            want = np.concatenate([np.flatnonzero(mask[s["first"]:s["first"] + s["count"]]) + s["first"]
                                   for s in (split.shards[k] for k in positions)])
        assert np.array_equal(np.sort(got), want), f"pass {i} on rank {rank}: wrong samples"
        done = acc.reduce(torch.tensor([1]), reduction="sum")          # a collective between passes
        assert int(done) == world
        bar.update(1)
        i += 1
    bar.close()
    stop.set()
    split.close()
    total = acc.reduce(torch.tensor([i, starts]), reduction="sum")
    if acc.is_main_process:
        print(f"passes {int(total[0])} starts {int(total[1])} in {time.monotonic() - t0:.1f} s", flush=True)
    acc.wait_for_everyone()
    exit_process(0)


if __name__ == "__main__":
    relaunch_cpu_processes([os.path.abspath(__file__), *sys.argv[1:]])
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 4)
