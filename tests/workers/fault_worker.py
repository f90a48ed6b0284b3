"""`ccfs run` where rank 1 raises inside the scorer's data loop (the first pool scoring of the run).

Usage (under accelerate launch): fault_worker.py [ccfs run args ...]
"""
import os
import sys

from ccfs_dist.data import pool
from ccfs_dist.cli import main
from ccfs_dist.runtime.dist import relaunch_cpu_processes

original = pool.TensorPool.batches


def faulty_batches(self, index, batch_size, rank, world, device):
    if rank == 1:
        raise RuntimeError("injected fault while scoring")
    yield from original(self, index, batch_size, rank, world, device)


if __name__ == "__main__":
    relaunch_cpu_processes([os.path.abspath(__file__), *sys.argv[1:]])
    pool.TensorPool.batches = faulty_batches
    sys.exit(main(["run", *sys.argv[1:]]))
