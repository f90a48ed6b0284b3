"""Timing for the benchmarks: the clock (wall and CPU), device-synchronised windows, paired engine /
ceiling samples, peak memory, the CPU's name."""
import platform
import resource
import sys
import time

import numpy as np
import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(kind, device):
    """Start a new peak-memory window of `kind` ("cuda": allocated on the GPU, "rss": resident set of the
    process); False when the RSS peak cannot be reset (it is then the process's peak so far)."""
    if kind == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb(kind, device):
    if kind == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss          # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_kind(device):
    return "cuda" if device.type == "cuda" else "rss"


def clock():
    """(wall seconds, CPU seconds of this process)."""
    return np.array([time.perf_counter(), time.process_time()])


def paired(engine, ceiling, work, device):
    """Figures from paired samples: (wall, CPU) times of the engine and of the ceiling doing the same `work`
    (images), taken back to back.

    images/s is the median engine rate; ratio is the median of the per-pair wall-time ratios (load that
    comes and goes hits both sides of a pair alike) and the ceiling shown is images/s / ratio. On the CPU
    cpu_ratio is the same from the process's CPU time, which waiting for a core does not count: with one
    thread per process it is the ratio on an idle machine (with more threads it also counts spinning).
    """
    engine, ceiling = np.asarray(engine), np.asarray(ceiling)
    rate = work / float(np.median(engine[:, 0]))
    ratio = float(np.median(ceiling[:, 0] / engine[:, 0]))
    out = {"images_per_s": rate, "ceiling_images_per_s": rate / ratio, "ratio": ratio,
           "best_images_per_s": work / float(engine[:, 0].min()),
           "best_ceiling_images_per_s": work / float(ceiling[:, 0].min()), "pairs": int(len(engine))}
    if device.type == "cpu":
        out["cpu_ratio"] = float(np.median(ceiling[:, 1] / engine[:, 1]))
    return out


def timed(fn, calls, device):
    """(wall, CPU) seconds of `calls` calls of fn, the device synchronised at both ends."""
    sync(device)
    start = clock()
    for _ in range(calls):
        fn()
    sync(device)
    return clock() - start
