"""Progress of long loops (epochs, prediction batches, decoding), fit for a terminal and for a log file.

    track(iterable, desc=..., total=..., initial=0, main=True, unit="it") -> iterable

`--progress` (or the environment variable CCFS_PROGRESS, which the ranks of a launch inherit) picks:
  auto   bars on a terminal, lines otherwise (output redirected to a file, as under SLURM)
  bars   tqdm bars, drawn by global rank 0 only (two ranks' bars on one terminal overwrite each other)
  lines  one line when a loop ends, and one every LINE_INTERVAL_S seconds while it runs
  off    nothing
A loop that all ranks run together reports from the main process only (`main`); a training that one rank
runs whole (`dist.OneRankAccelerator`: main in its own view) reports from that rank, as lines where it is not rank 0.
"""
import os
import sys
import time

from tqdm import tqdm

MODES = ("auto", "bars", "lines", "off")
ENV = "CCFS_PROGRESS"
LINE_INTERVAL_S = 60.0     # a 500-epoch training logs a line a minute, not one per epoch

# tqdm's monitor is a thread in every process that draws a bar; a rank needs no extra thread
tqdm.monitor_interval = 0


def set_mode(mode):
    """Make `mode` this process's and its children's (relaunched ranks read the environment)."""
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
    os.environ[ENV] = mode


def mode():
    """The mode in force, `auto` resolved; an unknown value in the environment counts as `auto`."""
    chosen = os.environ.get(ENV, "auto")
    if chosen not in MODES or chosen == "auto":
        return "bars" if sys.stderr.isatty() else "lines"
    return chosen


def track(iterable, *, desc, total=None, initial=0, main=True, unit="it"):
    """`iterable`, reporting its progress in the mode in force (nothing off the main process)."""
    chosen = mode()
    if not main or chosen == "off":
        return iterable
    if chosen == "bars" and os.environ.get("RANK", "0") in ("", "0"):
        return tqdm(iterable, desc=desc, total=total, initial=initial, leave=False, unit=unit)
    return _lines(iterable, desc, total, initial, unit)


def _lines(iterable, desc, total, initial, unit):
    start = last = time.perf_counter()
    done = initial
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= LINE_INTERVAL_S:
            _line(desc, done, total, unit, now - start)
            last = now
    _line(desc, done, total, unit, time.perf_counter() - start)


def _line(desc, done, total, unit, seconds):
    of = f"/{total}" if total is not None else ""
    print(f"{desc}: {done}{of} {unit}, {seconds:.1f} s", file=sys.stderr, flush=True)
