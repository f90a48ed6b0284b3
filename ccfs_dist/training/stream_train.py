"""Train a model on a pool streamed from WebDataset shards (one too large for memory): the teacher and the
difficulty-score runs of an ImageNet-size pool.

    train_stream(accelerator, model, split, recipe, *, norm, teacher, seed, ...) -> (model, stats)

The same estimator as train_model: its recipe (the same train.Recipe and Session: SGD, warm-up then cosine,
KD or cross-entropy, mixed precision), its batches (S = ceil(N / B) full global batches an epoch, the last
wrapped around to the epoch's first samples; the same steps, so the same schedule), its views (the crop
boxes and flips of an epoch's B * S positions drawn by train_model's generator, seeds.augmentation, alike on
every rank: a position's view does not depend on the process count), its BatchNorm (SyncBatchNorm on CUDA
when split over ranks) and its observations (on_batch in step, then rank order). Only the order of the
samples in an epoch differs, and only where the pool is larger than a rank's shuffle buffer:

- A pool of at most `shuffle_buffer` samples is read once (each rank a share of the shards, all-gathered)
  and trained by train_model itself: the same order, hence the same result as in memory.
- A larger pool is streamed every epoch. The plan (the same on every rank, from N, B and the world size W,
  `epoch_plan`): each global batch split over the ranks as dist.rank_slice; every sample is presented once
  an epoch, and each rank presents its first samples of the epoch again to complete the last batch. The
  shard order is a permutation of all shards drawn from (seed, epoch); the epoch's sample sequence is the
  shards in that order. Rank r takes the contiguous run of the sequence its shares add up to: whole shards,
  and partial ones at its two ends (read through, only its samples decoded). The rank's shards are dealt to
  its loader workers (ShardPool.stream), each of which interleaves `interleave` shards at random; the
  rank's samples then pass a bounded shuffle buffer of `shuffle_buffer` decoded samples from which each
  step's batch is drawn at random. The loader is never passed to accelerator.prepare (see docs/shards.md:
  Accelerate re-shards iterable loaders by batch). Each rank checks that its stream delivered exactly its
  planned samples, once each.
- All randomness of an epoch (shard order, interleaving, buffer draws) is seeded by (seed, epoch, rank[,
  worker]), the views by the saved generator: an epoch-boundary checkpoint (model, optimizer, schedule,
  generator, epoch) resumes to exactly the weights of an uninterrupted run with the same process and worker
  count. A run killed mid-epoch resumes from the last checkpoint and redoes the epochs after it.

On a streamed pool the sample order (which samples share a batch, and when) depends on the number of
processes and of loader workers; on the CPU so do the per-rank BatchNorm statistics (as with train_model
split over ranks). Nothing else: the recipe, the steps, the views and the observations per epoch are the
same for any process count. docs/shards.md gives the measured effect of the order.
"""
import math

import numpy as np
import torch

from ccfs_dist.training.augment import Augment
from ccfs_dist.runtime import seeds
from ccfs_dist.runtime.dist import rank_slice, rank_world, run_of, share_sizes
from ccfs_dist.errors import DataError
from ccfs_dist.runtime.progress import track
from ccfs_dist.training.train import Session, epoch_boxes, train_model


def epoch_plan(n, batch_size, world):
    """Distinct samples per rank per step (int64 steps x world): S = ceil(n / batch_size) global batches as
    train_model makes them, the first S - 1 full, the last holding the rest (each split over the ranks as
    dist.share_sizes). The last batch is completed to `batch_size` by wrapping around (epoch_batches), as
    train_model's is, so every step trains on a full global batch of rank shares share_sizes(batch_size)."""
    if n < world or batch_size < world:
        raise DataError(f"a pool of {n} samples in global batches of {batch_size} cannot be trained on by {world} "
                        f"processes (fewer samples than ranks in the pool or in a global batch)")
    steps = max(1, math.ceil(n / batch_size))
    sizes = [batch_size] * (steps - 1) + [n - (steps - 1) * batch_size]
    return np.array([share_sizes(b, world) for b in sizes], dtype=np.int64)


def held_whole(n, shuffle_buffer):
    """Whether a streamed pool of `n` samples fits a rank's shuffle buffer: then train_stream reads it once and
    trains on it as train_model does (the same order, batches and views: the same result)."""
    return n <= shuffle_buffer


def streams(cfg, split):
    """Whether a training on the pool `split` streams it over the ranks (a streamed pool larger than
    stream.shuffle_buffer); else it is resident or read whole once, and trained as a resident pool."""
    return not split.in_memory and not held_whole(len(split), cfg["stream"]["shuffle_buffer"])


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


def epoch_batches(split, plan, epoch, seed, rank, shuffle_buffer, interleave, device=torch.device("cpu"), share=None):
    """This rank's training batches of one epoch, (uint8 images, labels, global ids), one per step of `plan`;
    raises DataError when the stream does not deliver exactly the planned samples. Images on `device` when
    the split decodes there (data.decode: device), else on the CPU; labels and ids on the CPU.

    `share` (the rank's slots in every global batch): the last batch is completed to `share` samples by
    presenting again the rank's first samples of the epoch, in the order they were presented (cycling when
    the rank has fewer), as train_model wraps its last batch around to the epoch's first samples."""
    order = np.random.default_rng(seeds.stream_shard_order(seed, epoch)).permutation(len(split.shards))
    positions, mask = rank_run(split, order, plan, rank)
    sizes = plan[:, rank]
    expected = int(sizes.sum())
    wrap = 0 if share is None else int(share) - int(sizes[-1])
    if wrap < 0:
        raise ValueError(f"a share of {share} samples a step is smaller than the plan's {int(sizes[-1])}")
    loader_batch = int(sizes.max())
    on = device if split.decode == "device" else "cpu"
    buffer = ShuffleBuffer(shuffle_buffer + 2 * loader_batch, split.shape, on)
    rng = np.random.default_rng(seeds.stream_buffer(seed, epoch, rank))
    stream = iter(split.stream(positions, mask, loader_batch, interleave=interleave,
                               seed=seeds.stream_interleave(seed, epoch, rank), device=device))
    seen = np.zeros(len(split), dtype=bool)
    pushed = 0
    first = []                                     # the rank's first `wrap` presentations of the epoch
    where = f"{split.index_path}, epoch {epoch}, rank {rank}"
    for step, need in enumerate(sizes):
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
        x, y, ids = buffer.take(int(need), rng)
        kept = sum(len(part[2]) for part in first)
        if kept < wrap and len(ids):
            first.append((x[:wrap - kept], y[:wrap - kept], ids[:wrap - kept]))
        if step == len(sizes) - 1 and wrap:
            fx, fy, fids = (torch.cat(parts) for parts in zip(*first))
            again = torch.arange(wrap) % len(fids)          # cycles only when the rank has fewer than `wrap`
            x = torch.cat([x, fx[again.to(fx.device)]])
            y, ids = torch.cat([y, fy[again]]), torch.cat([ids, fids[again]])
        yield x, y, ids
    for _ in stream:
        raise DataError(f"{where}: the stream delivered more than the {expected} samples planned")
    if pushed != expected or int(seen.sum()) != expected:
        raise DataError(f"{where}: the stream delivered {int(seen.sum())} distinct of the {expected} samples planned")


def train_stream(accelerator, model, split, recipe, *, norm, teacher=None, seed=0, desc="train (stream)",
                 on_epoch_end=None, on_batch=None, checkpoint=None, extra_state=None, shuffle_buffer=4096,
                 interleave=16):
    """Train `model` in place on the streamed `split` (a ShardPool) by `recipe` (a train.Recipe); return
    (model, stats).

    Arguments as train_model (the images and labels come from `split`; `on_batch(ids, logits)` gets the
    global ids of this rank's batch, on the device), plus `shuffle_buffer` (decoded samples per rank) and
    `interleave` (shards each loader worker reads at once). A pool of at most `shuffle_buffer` samples is read
    once and trained by train_model (its stats, "lrs" included). With `checkpoint` and the recipe's
    `checkpoint_every` > 0 the training state is saved every that many epochs and training continues from
    it when it exists; it is deleted at the end.
    """
    r = recipe
    device = accelerator.device
    rank, world = rank_world(accelerator)
    kw = dict(norm=norm, teacher=teacher, seed=seed, desc=desc, on_epoch_end=on_epoch_end,
              on_batch=on_batch, checkpoint=checkpoint, extra_state=extra_state)
    if held_whole(len(split), shuffle_buffer):   # the buffer would hold the whole pool: read it once (each rank
        images, labels = split.fetch(np.arange(len(split)), accelerator)     # a share, all-gathered) and train
        return train_model(accelerator, model, images, labels, r, **kw)      # as resident: rows = global ids
    memory_format = torch.channels_last if r.channels_last else torch.contiguous_format
    augment = Augment(norm, split.shape[-1], scale_min=r.scale_min, flip=r.flip, crop=r.crop, padding=r.padding)
    plan = epoch_plan(len(split), r.batch_size, world)
    steps_per_epoch = len(plan)
    lo, hi = rank_slice(r.batch_size, rank, world)        # this rank's slots of every global batch

    if world > 1 and device.type == "cuda":   # global BatchNorm statistics, as train_model (no CPU SyncBatchNorm)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=memory_format)
    session = Session(accelerator, model, r, steps_per_epoch, teacher=teacher, memory_format=memory_format)
    # the views of an epoch's positions come from train_model's generator, drawn alike on every rank (on the
    # CPU: the same views on every device) and moved to the device
    generators = {"aug_gen": torch.Generator().manual_seed(seeds.augmentation(seed))}
    first_epoch = session.resume(checkpoint, generators, extra_state)   # the stream's order: from (seed, epoch, rank)
    height, width = split.shape[1], split.shape[2]
    start, seen = session.clock(), 0
    session.ddp_model.train()
    for epoch in track(range(first_epoch, r.epochs), desc=desc, main=accelerator.is_main_process,
                       initial=first_epoch, total=r.epochs, unit="epochs"):
        boxes, flips = epoch_boxes(augment, steps_per_epoch * r.batch_size, height, width, generators["aug_gen"],
                                   device)
        my_boxes = boxes.view(steps_per_epoch, r.batch_size, 4)[:, lo:hi]
        my_flips = flips.view(steps_per_epoch, r.batch_size)[:, lo:hi]
        batches = epoch_batches(split, plan, epoch, seed, rank, shuffle_buffer, interleave, device, share=hi - lo)
        for step, (x, y, ids) in enumerate(batches):
            x = augment.apply(x.to(device, non_blocking=True), my_boxes[step], my_flips[step])
            x = x.contiguous(memory_format=memory_format)
            y, ids = y.to(device, non_blocking=True), ids.to(device, non_blocking=True)
            session.step(x, y, ids, on_batch)
            seen += len(ids)
        session.end_epoch(epoch, on_epoch_end, checkpoint, generators, extra_state)
    seconds = session.clock() - start
    seen = int(accelerator.reduce(torch.tensor([seen], device=device), reduction="sum").item()) if world > 1 else seen
    model = session.finish(checkpoint, broadcast=world > 1)   # rank 0's BatchNorm buffers, as train_model
    return model, session.stats(seconds, seen)


def stream_options(cfg):
    """train_stream's stream keywords from the config (section `stream`)."""
    return {"shuffle_buffer": cfg["stream"]["shuffle_buffer"], "interleave": cfg["stream"]["interleave"]}
