"""All distributed plumbing lives here: the Accelerator, splitting work over ranks, gathering results.

Every other module calls these helpers and otherwise reads like single-process PyTorch.
With one process every function degrades to the obvious local operation.
"""
import ctypes
import datetime
import functools
import math
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs


def make_accelerator(mixed_precision="no", timeout_s=1800):
    """One Accelerator per run. `timeout_s` bounds how long a collective waits for a dead rank.

    Without CUDA the processes run on the CPU with gloo (also when started by torchrun / --multi_gpu),
    and the C allocator is tuned for CPU compute (tune_malloc).
    """
    cpu = not torch.cuda.is_available()
    if cpu:
        tune_malloc()
    kwargs = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s))
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=[kwargs])


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # mallopt parameters, glibc's malloc.h
MMAP_THRESHOLD, TRIM_THRESHOLD = 64 << 20, 1 << 30


@functools.cache
def tune_malloc():
    """Keep freed blocks below 64 MB in glibc's heap instead of handing them back to the kernel.

    With glibc's defaults a CPU forward pass of a batch gets its activation buffers (a few MB each)
    from fresh mmap()ed or re-grown heap pages and returns them on free (its dynamic mmap threshold
    settles at exactly the size of the recurring buffers), so every batch page-faults them in again:
    measured here, ConvNet-D3 scoring at batch 512 spent half its time in the kernel (650 k page faults
    per 60 batches, 12.5 k img/s; 25 k img/s with this). The price: blocks up to 64 MB now share the
    heap with small long-lived ones, which can fragment it (the scorer preallocates its records for
    this reason). DataLoader workers inherit the setting (fork). CCFS_MALLOC_TUNING=0 keeps glibc's
    defaults. Returns True when the tuning is in effect.
    """
    if os.environ.get("CCFS_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt         # the C library this process runs on
    except (OSError, AttributeError):               # not glibc (musl, ...): nothing to tune
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def exit_process(status=0):
    """End this process with `status`. With several processes (WORLD_SIZE > 1) it flushes stdout/stderr and
    leaves through os._exit, skipping the interpreter's finalisation: a gloo worker thread that releases
    its last collective's tensors while Python shuts down needs the GIL, cannot get it, and aborts the
    process ("terminate called without an active exception", exit -6) after all work is done, about one
    exit in 20 here (pytorch/pytorch#190489). One process returns `status` for sys.exit."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return status
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(status or 0))


def _flag_value(argv, flag):
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def cpu_processes_requested():
    """N when we were started by `accelerate launch --cpu --num_processes N` (N > 1) without MPI, else 1.

    Accelerate's launcher starts a single process in that case (multi-CPU needs mpirun) but sets
    MASTER_ADDR; the requested count is read from the launcher's command line (Linux /proc).
    """
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1") or "MASTER_ADDR" not in env:
        return 1
    if any(k in env for k in ("LOCAL_RANK", "RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        return 1
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = f.read().decode(errors="replace").split("\0")
    except OSError:
        return 1
    if not any("accelerate" in a for a in parent):
        return 1
    value = _flag_value(parent, "--num_processes")
    machines = _flag_value(parent, "--num_machines") or "1"
    return int(value) if value and value.isdigit() and machines == "1" else 1


def relaunch_cpu_processes(script_argv):
    """Replace this process by `torchrun --nproc_per_node N` over the same script when N CPU processes
    were asked for but Accelerate started only one (see cpu_processes_requested)."""
    n = cpu_processes_requested()
    if n <= 1:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
           "--master_addr", os.environ["MASTER_ADDR"], "--master_port", os.environ.get("MASTER_PORT", "29500"),
           *script_argv]
    sys.stdout.flush()
    os.execv(sys.executable, cmd)


def rank_slice(n, rank, world):
    """Contiguous, balanced share [start, stop) of n items for `rank`; earlier ranks take the remainder."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather_rows_in_pieces(accelerator, tensors, piece_bytes=256 << 20):
    """gather_rows a piece at a time: yields the gathered rows (on the CPU) of at most `piece_bytes` per
    rank, so that a large result (images) never has to fit on the device, nor be held twice on the host.
    Every rank yields the same pieces; rows come grouped by piece, then by rank (callers carry ids)."""
    row_bytes = max(1, sum(math.prod(v.shape[1:]) * v.element_size() for v in tensors.values()))  # same on all ranks
    rows = max(1, piece_bytes // row_bytes)
    n_local = len(next(iter(tensors.values())))
    longest = int(accelerator.gather(torch.tensor([n_local], device=accelerator.device)).max())
    for start in range(0, longest, rows):
        yield gather_rows(accelerator, {k: v[start:start + rows] for k, v in tensors.items()})


def gather_rows(accelerator, tensors):
    """Concatenate each rank's rows (dict of 1-D/N-D tensors of equal length per rank), in rank order.

    Ranks may hold different row counts; every rank receives the full result (on CPU).
    """
    if accelerator.num_processes == 1:
        return {k: v.cpu() for k, v in tensors.items()}
    device = accelerator.device
    n_local = len(next(iter(tensors.values())))
    counts = accelerator.gather(torch.tensor([n_local], device=device)).cpu().tolist()
    longest = max(counts)
    out = {}
    for key, value in tensors.items():
        padded = torch.zeros((longest,) + tuple(value.shape[1:]), dtype=value.dtype, device=device)
        padded[:n_local] = value.to(device)
        gathered = accelerator.gather(padded).cpu().reshape((len(counts), longest) + tuple(value.shape[1:]))
        out[key] = torch.cat([gathered[r, :c] for r, c in enumerate(counts)])
    return out


def main_says(accelerator, value):
    """Rank 0's `value` (a str or None) on every rank: for a verdict only rank 0 can reach (it alone holds
    the run directory's lock), so that every rank fails alike instead of waiting in a collective."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([value], from_process=0)[0]
