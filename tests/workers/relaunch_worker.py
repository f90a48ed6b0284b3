"""Under `accelerate launch --cpu --num_processes N`: the ranks the entry-script relaunch starts meet in one
gloo group. Rank 0 prints `ranks <world> sum <sum of rank + 1>` and how it was started."""
import os
import sys

from ccfs_dist.runtime.relaunch import relaunch_cpu_processes

if __name__ == "__main__":
    relaunch_cpu_processes([os.path.abspath(__file__), *sys.argv[1:]])
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo")
    x = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(x)
    if dist.get_rank() == 0:
        started = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "supervisor"
        print(f"ranks {dist.get_world_size()} sum {int(x)} local {os.environ['LOCAL_WORLD_SIZE']} by {started}")
    dist.destroy_process_group()
