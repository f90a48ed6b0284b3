"""Every random stream of a run, named, as a function of the run's `seed` (never of the rank or the
process count): a job seeded from this table gives the same result on whichever rank it runs.
The one exception is training on a streamed pool (stream_*), whose sample order depends on the process
count by design (stream_train.py); its streams are seeded per (seed, epoch, rank).

The values are those the pipeline has always used (changing one changes every result). Every stream is
drawn on the CPU (torch CPU generators, numpy) and the numbers are moved to the device, so a seed gives the
same numbers on every device (augment._rand).
"""


def teacher(seed):
    """Initial weights and the epoch order of the teacher's training."""
    return seed


def filter_model(seed, phase):
    """Initial weights and training order of phase `phase`'s filter (1-based)."""
    return seed + 1000 * phase


def eval_run(seed, run):
    """Initial weights and training order of evaluation model `run` (0-based) of every set."""
    return seed + 500 + run


def score_run(seed, run):
    """Training run `run` (0-based) of the training-dynamics difficulty scores."""
    return seed + 100 + run


def selection(seed, phase):
    """Tie-breaking / random fine selection of phase `phase`."""
    return seed + phase


def top_up_baseline(seed):
    """The random real images of the distilled + random baseline."""
    return seed + 7


def random_baseline(seed):
    """The random real images of the random-only baseline (and the benchmark's evaluation set)."""
    return seed + 11


def distill_batch(seed, gid):
    """Recovery batch `gid` of the base distiller (its noise, jitter and crops; its real start images)."""
    return seed * 100003 + gid


def augmentation(seed):
    """The crop boxes and flips of a training seeded `seed` (train.train_model; stream_train.train_stream too)."""
    return seed * 1000 + 1


def _entropy(*parts):
    """numpy SeedSequence entropy from integer parts (each taken mod 2**63)."""
    return [int(p) % (1 << 63) for p in parts]


def stream_shard_order(seed, epoch):
    """The shard order of epoch `epoch` of a training on a streamed pool (the same on every rank)."""
    return _entropy(seed, epoch, 0)


def stream_buffer(seed, epoch, rank):
    """Rank `rank`'s draws from its shuffle buffer in epoch `epoch` (streamed training)."""
    return _entropy(seed, epoch, 1, rank)


def stream_interleave(seed, epoch, rank):
    """Rank `rank`'s interleaving of the shards its loader workers read in epoch `epoch` (each worker
    appends its id: shard_reader.ShardPool.stream)."""
    return _entropy(seed, epoch, 2, rank)


def validation():
    """The carve of data.validation: fixed, not the run's seed, so every seed of a settings search sees the
    same validation split and the same pool."""
    return 20250
