"""The benchmarks' random streams, as functions of the config's `seed` (the engine's are ccfs_dist.runtime.seeds)."""


def first_set(seed):
    """The benchmark's stand-in for the distilled set (random real images)."""
    return seed + 3


def filter_model(seed):
    """The benchmark's filter training."""
    return seed + 1000


def selection(seed):
    """The benchmark's selection pass."""
    return seed + 1


def evaluation(seed):
    """The benchmark's evaluation training."""
    return seed + 500
