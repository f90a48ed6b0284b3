"""Distributed prediction: run a model over pool samples, each exactly once across ranks.

Per sample it keeps only index, label, prediction, true-class logit, margin and loss (never the full
logit matrix), gathers them so every rank holds the same arrays, sorted by global index, and checks
that every expected index came back exactly once.
"""
import contextlib
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ccfs_dist.training.augment import normalize
from ccfs_dist.runtime.dist import gather_rows, most_per_rank, rank_world
from ccfs_dist.runtime.progress import track

FIELDS = ("index", "label", "pred", "true_logit", "margin", "loss")
PROGRESS_MIN_BATCHES = 10       # passes of fewer batches per rank show no progress bar


def per_sample(logits, labels):
    """The per-sample record of one batch of logits (float32 on the logits' device)."""
    logits = logits.float()
    true_logit = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return {
        "label": labels,
        "pred": logits.argmax(1),
        "true_logit": true_logit,
        "margin": true_logit - others.amax(1),            # amax: cheaper than max(1) on the CPU (BENCHMARKS.md)
        "loss": F.cross_entropy(logits, labels, reduction="none"),
    }


def check_exactly_once(expected, got):
    """Raise RuntimeError listing missing or duplicated indices unless `got` is a permutation of `expected`."""
    expected = np.sort(np.asarray(expected))
    got = np.sort(np.asarray(got))
    if np.array_equal(expected, got):
        return
    values, counts = np.unique(got, return_counts=True)
    duplicated = values[counts > 1]
    missing = np.setdiff1d(expected, values)
    extra = np.setdiff1d(values, expected)
    raise RuntimeError(f"prediction accounting failed: {len(missing)} missing (first {missing[:10].tolist()}), "
                       f"{len(duplicated)} duplicated (first {duplicated[:10].tolist()}), "
                       f"{len(extra)} unexpected (first {extra[:10].tolist()})")


@torch.no_grad()
def predict(accelerator, model, split, index, *, norm, batch_size=512, channels_last=False, desc="predict"):
    """Predict the samples `index` (global indices) of `split` (in memory or streamed) with `model`,
    the images normalised by `norm` (a data.pool.Norm).

    Each rank predicts the share `split.batches` gives it. Returns (results, stats): results maps FIELDS
    to numpy arrays sorted by index, identical on every rank.
    """
    device = accelerator.device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last or any(p.device != device for p in model.parameters()):
        model = model.to(device, memory_format=memory_format)     # (a no-op walk over the modules otherwise)
    model.eval()
    index = np.asarray(index, dtype=np.int64)
    rank, world = rank_world(accelerator)
    # records go into buffers allocated once (this rank gets at most len(index) samples): many small
    # per-batch tensors kept alive between large transient ones fragment the heap (RSS grows ~4 KB/sample)
    local = {k: _empty(k, device, len(index)) for k in FIELDS}
    filled = 0
    # Accelerate's autocast context costs tens of microseconds a batch even when it does nothing
    autocast = accelerator.autocast if accelerator.mixed_precision != "no" else contextlib.nullcontext
    start = time.perf_counter()
    batches = split.batches(index, batch_size, rank, world, device)
    total = most_per_rank(math.ceil(len(index) / batch_size), world)     # batches on the busiest rank
    # no bar for a few batches: setting one up costs as much as a small batch
    for x, y, ids in track(batches, desc=desc, total=total, unit="batches",
                           main=accelerator.is_main_process and total >= PROGRESS_MIN_BATCHES):
        x = normalize(x, *norm).contiguous(memory_format=memory_format)
        with autocast():
            logits = model(x)
        record = per_sample(logits, y)
        record["index"] = ids
        if filled + len(ids) > len(index):
            raise RuntimeError(f"prediction accounting failed: rank {rank} received more than the "
                               f"{len(index)} samples asked for")
        for k in FIELDS:
            local[k][filled:filled + len(ids)] = record[k]
        filled += len(ids)
    local = {k: v[:filled] for k, v in local.items()}
    gathered = gather_rows(accelerator, local)
    del local
    seconds = time.perf_counter() - start
    check_exactly_once(index, gathered["index"].numpy())
    order = torch.argsort(gathered["index"])
    results = {k: gathered.pop(k)[order].numpy() for k in FIELDS}     # one field's copy at a time
    return results, {"seconds": seconds, "images": len(index), "images_per_s": len(index) / max(seconds, 1e-9)}


def _empty(field, device, n=0):
    dtype = torch.int64 if field in ("index", "label", "pred") else torch.float32
    return torch.empty(n, dtype=dtype, device=device)


def accuracy(accelerator, model, split, *, norm, batch_size=512, desc="test"):
    """Top-1 accuracy of `model` on a pool (pool.Pool), predicted across ranks."""
    results, _ = predict(accelerator, model, split, np.arange(len(split)), norm=norm,
                       batch_size=batch_size, desc=desc)
    return float((results["pred"] == results["label"]).mean())
