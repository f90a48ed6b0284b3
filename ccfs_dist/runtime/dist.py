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

from ccfs_dist.errors import CCFSError
from ccfs_dist.runtime.relaunch import cpu_launch_requested, die_with_parent, relaunch_cpu_processes  # noqa: F401  (this module's API)


def make_accelerator(mixed_precision="no", timeout_s=1800, deterministic=True):
    """One Accelerator per run. `timeout_s` bounds how long a collective waits for a dead rank.

    Without CUDA the processes run on the CPU with gloo (also when started by torchrun / --multi_gpu),
    and the C allocator is tuned for CPU compute (tune_malloc). `deterministic` (train.deterministic) sets
    the deterministic algorithms (set_determinism) before the first CUDA work. With CUDA, each rank must
    have a GPU of its own (one_gpu_per_rank): a rank without one is a CCFSError before any collective.
    """
    set_determinism(deterministic)
    cpu = not torch.cuda.is_available()
    if cpu:
        tune_malloc()
    else:
        problem = one_gpu_per_rank(os.environ, torch.cuda.device_count())
        if problem:
            raise CCFSError(problem)
    kwargs = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s))
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=[kwargs])


CUBLAS_WORKSPACE = ":4096:8"     # what cuBLAS needs to be deterministic (CUDA >= 10.2; ":16:8" also works)


def set_determinism(deterministic):
    """Deterministic algorithms on (True: train.deterministic, the default) or off (False, for speed).

    True: torch.use_deterministic_algorithms(True) (an operation with no deterministic implementation
    raises instead of running), cuDNN's deterministic kernels without autotuning (cudnn.benchmark off: its
    pick can differ between runs), and CUBLAS_WORKSPACE_CONFIG, which cuBLAS reads when a handle is made,
    so it is set here, before the run's first CUDA work (a value the user set is kept). torch's filling of
    new tensors with NaN (fill_uninitialized_memory) stays off: it guards reads of uninitialised memory,
    which the engine never does, at the cost of a write of every new tensor.
    False: the defaults, and cudnn.benchmark on (the fastest kernels for each shape, picked by timing).
    On the CPU the settings change nothing the engine computes (its kernels are deterministic there).
    """
    deterministic = bool(deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def one_gpu_per_rank(env, device_count):
    """Why this process cannot have a GPU of its own (a message), or None.

    Accelerate gives local rank L the device cuda:L. Two ranks on one GPU fail at NCCL's first collective
    ("Duplicate GPU detected") after their setup; this tells it from the launcher's variables before any
    work: more processes on this node (LOCAL_WORLD_SIZE) than GPUs it shows (CUDA_VISIBLE_DEVICES), or a
    LOCAL_RANK beyond them."""
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    local_rank = int(env.get("LOCAL_RANK", "0") or 0)
    local_world = int(env.get("LOCAL_WORLD_SIZE", "0") or 0)
    if local_rank < device_count and local_world <= device_count:
        return None
    visible = env.get("CUDA_VISIBLE_DEVICES")
    shown = f"{device_count} GPU(s)" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
    per_node = f"{local_world} processes on this node" if local_world else f"local rank {local_rank}"
    return (f"{per_node} but this node shows {shown}: every rank needs a GPU of its own (two ranks on one "
            f"GPU fail in NCCL); start at most {device_count} process(es) per node (--num_processes), "
            f"or none with CUDA hidden (CUDA_VISIBLE_DEVICES=) to run on the CPU")


def fresh_scaler(accelerator):
    """A new fp16 loss scaler for one training, with the settings of `accelerator`'s, put in its place (the
    training's optimizer and backward use it); None without fp16. Each training starts from the initial
    scale, as one run alone would: it never inherits the scale that earlier trainings left, and its state
    is saved in the training's checkpoints (train.Session), so a resumed training scales exactly alike."""
    old = accelerator.scaler
    if old is None:
        return None
    accelerator.scaler = torch.amp.GradScaler(
        old._device, init_scale=old._init_scale, growth_factor=old._growth_factor,
        backoff_factor=old._backoff_factor, growth_interval=old._growth_interval, enabled=old._enabled)
    return accelerator.scaler


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # mallopt parameters, glibc's malloc.h
MMAP_THRESHOLD, TRIM_THRESHOLD = 64 << 20, 1 << 30


@functools.cache
def tune_malloc():
    """Keep freed blocks below 64 MB in glibc's heap instead of handing them back to the kernel.

    With glibc's defaults a CPU forward pass of a batch gets its activation buffers (a few MB each)
    from fresh mmap()ed or re-grown heap pages and returns them on free (its dynamic mmap threshold
    settles at exactly the size of the recurring buffers), so every batch page-faults them in again and
    a CPU scoring pass spends much of its time in the kernel (figures: BENCHMARKS.md, "The allocator").
    The price: blocks up to 64 MB now share the heap with small long-lived ones, which can fragment it
    (predict.predict preallocates its records for this reason). Loader workers (shard_loader.py) apply it too when
    their rank did.
    CCFS_MALLOC_TUNING=0 keeps glibc's defaults. Returns True when the tuning is in effect.
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
    if int(os.environ.get("WORLD_SIZE") or "1") <= 1:
        return status
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(status or 0))


# ------------------------------------------------------------------------- rank arithmetic
# Which rows, items or shards belong to rank r of w: every module that splits work over the ranks asks
# these (pure functions of r and w, or of the accelerator's), so that the rule is stated once.

def rank_world(accelerator):
    """(rank, world) of `accelerator`: its process index and process count; (0, 1) for None."""
    return (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)


def rank_slice(n, rank, world):
    """Contiguous, balanced share [start, stop) of n items for `rank`; earlier ranks take the remainder."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def share(accelerator, n):
    """This rank's rank_slice [start, stop) of n items (e.g. its rows of a global batch)."""
    return rank_slice(n, *rank_world(accelerator))


def share_sizes(n, world):
    """The length of every rank's rank_slice of n items, in rank order."""
    return [hi - lo for lo, hi in (rank_slice(n, r, world) for r in range(world))]


def most_per_rank(n, world):
    """The longest rank_slice of n items: how many a rank gets at most (ceil(n / world))."""
    return math.ceil(n / world)


def run_of(sizes, rank):
    """[start, stop) of `rank`'s run when a sequence is cut, in rank order, into contiguous runs of `sizes`
    (one length per rank)."""
    start = int(sum(sizes[:rank]))
    return start, start + int(sizes[rank])


def deal(items, rank, world):
    """`rank`'s items of the sequence `items` dealt round-robin (item i to rank i mod world), in order."""
    return items[rank::world]


def dealt(accelerator, n):
    """This rank's items of n dealt round-robin (item i to rank i mod world). Which rank runs an item depends
    on the world size; what the item computes must not (seed it by its own index)."""
    return deal(range(n), *rank_world(accelerator))


def step_rank_key(accelerator, step):
    """One integer per (step, rank), ordered step-major then by rank: the order in which the observations
    of a data-parallel training's ranks are merged (the same for every rank and every gather)."""
    rank, world = rank_world(accelerator)
    return step * world + rank


def log(accelerator, message):
    """`message` printed once, by the main process, flushed (so it interleaves in order with the other
    ranks' output). Not `accelerator.print`: that prints once per node, and a dist.OneRankAccelerator has none."""
    if accelerator.is_main_process:
        print(message, flush=True)


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


class _Autocast(torch.nn.Module):
    """`module` whose forward runs under the accelerator's autocast and returns float32 (what
    Accelerator.prepare does to a model under mixed precision), for a training that is not prepared."""

    def __init__(self, module, autocast):
        super().__init__()
        self.module, self._autocast = module, autocast

    def forward(self, *args, **kwargs):
        with self._autocast():
            return self.module(*args, **kwargs).float()


class OneRankAccelerator:
    """A one-process view of `accelerator`, for a training that runs whole on this rank.

    It has the Accelerator's interface as train_model, evaluate_run, predict and TrainingDynamics use it
    (prepare, backward, autocast, unwrap_model, gather, wait_for_everyone, ...), with no collective: the
    model is not wrapped in DDP, gathers return this rank's rows, and this rank writes the job's artifacts
    (is_main_process). Every training of the pipeline, also with one process, runs through it unless it
    is split over the ranks: that is what makes a training's result the same on whichever rank it runs.
    """
    num_processes, process_index, local_process_index = 1, 0, 0
    is_main_process = is_local_main_process = True

    def __init__(self, accelerator):
        self.acc = accelerator
        self.device = accelerator.device
        self.mixed_precision = accelerator.mixed_precision
        # fp16: a loss scaler of its own, starting fresh, so that the training does not inherit the scale
        # that earlier trainings on this rank left in the accelerator's (its result would depend on them)
        self.scaler = accelerator.scaler
        fresh_scaler(self)

    def prepare(self, model, optimizer):
        from accelerate.optimizer import AcceleratedOptimizer
        if self.mixed_precision != "no":
            model = _Autocast(model, self.acc.autocast)
        return model, AcceleratedOptimizer(optimizer, device_placement=False, scaler=self.scaler)

    def unwrap_model(self, model, keep_fp32_wrapper=True):
        return model.module if isinstance(model, _Autocast) else model

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def autocast(self):
        return self.acc.autocast()

    def gather(self, tensor):
        return tensor

    def wait_for_everyone(self):
        pass

    def free_memory(self):
        pass


def broadcast_state(accelerator, module, src=0):
    """Give every rank rank `src`'s parameters and buffers of `module` (in place): after a split training
    every rank then holds exactly the state that is saved (DDP keeps parameters in step, but each rank's
    forward passes update its own BatchNorm running statistics)."""
    if accelerator.num_processes == 1:
        return module
    import torch.distributed
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            torch.distributed.broadcast(tensor.data, src=src)
    return module


PATIENT_TIMEOUT = datetime.timedelta(days=7)


@functools.cache
def _patient_group():
    import torch.distributed
    return torch.distributed.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)


def wait_for_all(accelerator):
    """A barrier for ranks that wait while another trains (a teacher can take hours): on a gloo group of
    its own whose timeout is PATIENT_TIMEOUT, not the collectives' --timeout. Every rank must call it at
    the same points (the first call creates the group). A rank that dies still ends the others (their
    launcher stops them)."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed
    torch.distributed.barrier(group=_patient_group())


def main_says(accelerator, value):
    """Rank 0's `value` (a str, a bool or None) on every rank: for a verdict only rank 0 can reach (it alone
    holds the run directory's lock; whether a split job has finished, jobs.finished), so that every rank
    acts alike instead of one waiting in a collective the others never enter."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([value], from_process=0)[0]
