"""Train a model on a pool streamed from WebDataset shards (one too large for memory): the teacher and the
difficulty-score runs of an ImageNet-size pool.

    train_stream(accelerator, model, split, recipe, *, mean, std, teacher, seed, ...) -> (model, stats)

The recipe is train_model's (SGD with momentum and weight decay, linear warm-up then cosine, stepped per
optimizer step or per epoch, KD from a teacher or cross-entropy, mixed precision through the Accelerator,
RandomResizedCrop or padded RandomCrop + flip on the device with augment.Augment); only where the samples
come from differs. Every epoch:

- The plan (the same on every rank, from N, the global batch size B and the world size W): S = ceil(N / B)
  global batches, all full but the last (the remaining samples; folded into the one before when fewer than
  W, so every rank has a sample in every step), each split over the ranks as dist.rank_slice. Every
  sample is trained on exactly once per epoch; no batch wraps around.
- The shard order is a permutation of all shards drawn from (seed, epoch); the epoch's sample sequence is
  the shards in that order. Rank r takes the contiguous run of the sequence its shares add up to: whole
  shards, and partial ones at its two ends (read through, only its samples decoded). The rank's shards
  are dealt to its loader workers (ShardSplit.stream), each of which interleaves `interleave` shards at
  random; the rank's samples then pass a bounded shuffle buffer of `shuffle_buffer` decoded samples from
  which each step's batch is drawn at random. The loader is never passed to accelerator.prepare (see
  docs/shards.md: Accelerate re-shards iterable loaders by batch). Each rank checks that its stream
  delivered exactly its planned samples, once each.
- All randomness of an epoch (shard order, interleaving, buffer draws, crop boxes) is seeded by (seed,
  epoch, rank[, worker]): an epoch-boundary checkpoint (model, optimizer, schedule, epoch) resumes to
  exactly the weights of an uninterrupted run with the same process and worker count. A run killed
  mid-epoch resumes from the last checkpoint and redoes the epochs after it (same result).

The sample order (which samples share a batch, and when) depends on the number of processes and of
loader workers; so do the per-rank BatchNorm statistics (as with train_model under DDP). Nothing else:
the recipe, the step count and the samples per epoch are the same for any process count.
"""
import math

import numpy as np
import torch

from .augment import Augment
from . import seeds
from .dist import rank_world, run_of, share_sizes
from .errors import DataError
from .progress import track
from .train import Session


def epoch_plan(n, batch_size, world):
    """Samples per rank per step (int64 steps x world): full global batches of `batch_size`, the last
    holding the rest (folded into the one before when it has fewer than `world` samples)."""
    if n < world:
        raise DataError(f"a pool of {n} samples cannot be trained on by {world} processes (fewer samples than ranks)")
    steps = max(1, math.ceil(n / batch_size))
    sizes = [batch_size] * (steps - 1) + [n - (steps - 1) * batch_size]
    if sizes[-1] < world and len(sizes) > 1:
        rest = sizes.pop()
        sizes[-1] += rest
    return np.array([share_sizes(b, world) for b in sizes], dtype=np.int64)


def rank_run(split, order, plan, rank):
    """(shard positions in read order, boolean mask of wanted global ids) of `rank`'s contiguous run of
    the epoch's sample sequence (the shards in `order`)."""
    counts = np.array([split.shards[i]["count"] for i in order], dtype=np.int64)
    starts = np.cumsum(counts) - counts
    a, b = run_of(plan.sum(0), rank)
    mask = np.zeros(len(split), dtype=bool)
    hits = np.flatnonzero((starts < b) & (starts + counts > a))
    for i in hits:
        first = split.shards[order[i]]["first"]
        mask[first + max(a - starts[i], 0):first + min(b - starts[i], counts[i])] = True
    return [int(order[i]) for i in hits], mask


class ShuffleBuffer:
    """A bounded shuffle buffer of decoded samples: `push` appends a batch, `take(n)` removes n samples
    drawn at random (numpy generator) and fills their rows from the tail. Preallocated: no allocation per step.
    The images live on `device` (the device they are decoded on: data.decode), labels and ids on the CPU."""

    def __init__(self, capacity, shape, device="cpu"):
        self.x = torch.empty((capacity,) + tuple(shape), dtype=torch.uint8, device=device)
        self.y = torch.empty(capacity, dtype=torch.int64)
        self.ids = torch.empty(capacity, dtype=torch.int64)
        self.count = 0

    def push(self, x, y, ids):
        n = len(ids)
        if self.count + n > len(self.ids):
            raise RuntimeError(f"shuffle buffer overflow: {self.count} + {n} > {len(self.ids)}")
        rows = slice(self.count, self.count + n)
        self.x[rows], self.y[rows], self.ids[rows] = x, y, ids
        self.count += n

    def take(self, n, rng):
        chosen = np.sort(rng.choice(self.count, size=n, replace=False))
        pick = torch.from_numpy(chosen)
        out = self.x[pick.to(self.x.device)], self.y[pick], self.ids[pick]     # advanced indexing copies
        keep = np.ones(self.count, dtype=bool)
        keep[chosen] = False
        end = self.count - n
        holes = torch.from_numpy(np.flatnonzero(~keep[:end]))
        tail = torch.from_numpy(np.flatnonzero(keep[end:]) + end)
        self.x[holes.to(self.x.device)] = self.x[tail.to(self.x.device)]
        self.y[holes], self.ids[holes] = self.y[tail], self.ids[tail]
        self.count = end
        return out


def epoch_batches(split, plan, epoch, seed, rank, shuffle_buffer, interleave, device=torch.device("cpu")):
    """This rank's training batches of one epoch, (uint8 images, labels, global ids), one per step of `plan`;
    raises DataError when the stream does not deliver exactly the planned samples. Images on `device` when
    the split decodes there (data.decode: device), else on the CPU; labels and ids on the CPU."""
    order = np.random.default_rng(seeds.stream_shard_order(seed, epoch)).permutation(len(split.shards))
    positions, mask = rank_run(split, order, plan, rank)
    sizes = plan[:, rank]
    expected = int(sizes.sum())
    loader_batch = int(sizes.max())
    on = device if split.decode == "device" else "cpu"
    buffer = ShuffleBuffer(shuffle_buffer + 2 * loader_batch, split.shape, on)
    rng = np.random.default_rng(seeds.stream_buffer(seed, epoch, rank))
    stream = iter(split.stream(positions, mask, loader_batch, interleave=interleave,
                               seed=seeds.stream_interleave(seed, epoch, rank), device=device))
    seen = np.zeros(len(split), dtype=bool)
    pushed = 0
    where = f"{split.index_path}, epoch {epoch}, rank {rank}"
    for need in sizes:
        while buffer.count < need + shuffle_buffer:
            batch = next(stream, None)
            if batch is None:
                break
            x, y, ids = batch
            got = ids.numpy()
            if not mask[got].all() or seen[got].any():
                raise DataError(f"{where}: the stream yielded sample(s) outside this rank's run or twice")
            seen[got] = True
            pushed += len(got)
            buffer.push(x, y, ids)
        if buffer.count < need:
            raise DataError(f"{where}: the stream delivered {pushed} of the {expected} samples planned")
        yield buffer.take(int(need), rng)
    for _ in stream:
        raise DataError(f"{where}: the stream delivered more than the {expected} samples planned")
    if pushed != expected or int(seen.sum()) != expected:
        raise DataError(f"{where}: the stream delivered {int(seen.sum())} distinct of the {expected} samples planned")


def train_stream(accelerator, model, split, recipe, *, mean, std, teacher=None, seed=0, desc="train (stream)",
                 on_epoch_end=None, on_batch=None, checkpoint=None, extra_state=None, shuffle_buffer=4096,
                 interleave=16):
    """Train `model` in place on the streamed `split` (a ShardSplit) by `recipe` (a train.Recipe); return
    (model, stats).

    Arguments as train_model (the images and labels come from `split`; `on_batch(ids, logits)` gets the
    global ids of this rank's batch, on the device), plus `shuffle_buffer` (decoded samples per rank) and
    `interleave` (shards each loader worker reads at once). With `checkpoint` and the recipe's
    `checkpoint_every` > 0 the training state is saved every that many epochs and training continues from
    it when it exists; it is deleted at the end.
    """
    r = recipe
    device = accelerator.device
    rank, world = rank_world(accelerator)
    memory_format = torch.channels_last if r.channels_last else torch.contiguous_format
    augment = Augment(mean, std, split.shape[-1], scale_min=r.scale_min, flip=r.flip, crop=r.crop, padding=r.padding)
    plan = epoch_plan(len(split), r.batch_size, world)
    steps_per_epoch = len(plan)

    model = model.to(device, memory_format=memory_format)
    session = Session(accelerator, model, r, steps_per_epoch, teacher=teacher, memory_format=memory_format)
    first_epoch = session.resume(checkpoint, {}, extra_state)     # every epoch's randomness comes from (seed, epoch, rank)
    start, seen = session.clock(), 0
    session.ddp_model.train()
    for epoch in track(range(first_epoch, r.epochs), desc=desc, main=accelerator.is_main_process,
                       initial=first_epoch, total=r.epochs, unit="epochs"):
        aug_gen = torch.Generator().manual_seed(     # on the CPU: the same views on every device
            int(np.random.default_rng(seeds.stream_augmentation(seed, epoch, rank)).integers(1 << 62)))
        for x, y, ids in epoch_batches(split, plan, epoch, seed, rank, shuffle_buffer, interleave, device):
            x = augment(x.to(device, non_blocking=True), generator=aug_gen)
            x = x.contiguous(memory_format=memory_format)
            y, ids = y.to(device, non_blocking=True), ids.to(device, non_blocking=True)
            session.step(x, y, ids, on_batch)
            seen += len(ids)
        session.end_epoch(epoch, on_epoch_end, checkpoint, {}, extra_state)
    seconds = session.clock() - start
    seen = int(accelerator.reduce(torch.tensor([seen], device=device), reduction="sum").item()) if world > 1 else seen
    model = session.finish(checkpoint, broadcast=False)
    return model, session.stats(seconds, seen)


def stream_options(cfg):
    """train_stream's stream keywords from the config (section `stream`)."""
    return {"shuffle_buffer": cfg["stream"]["shuffle_buffer"], "interleave": cfg["stream"]["interleave"]}
