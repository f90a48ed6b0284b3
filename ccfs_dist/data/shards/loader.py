"""Loader workers: the processes that read a streamed split's shards (shard_reader) for its rank.

A rank's workers start from a fork server (or by spawn; never by fork: a rank runs threads) once per split and
are reused by every pass; each reads its share of a pass's shards and hands its batches over as one packed
buffer each (`pack`). Every wait is bounded: a worker that delivers nothing for data.worker_timeout seconds, or
ends, fails the pass with a CCFSError naming the step and the shards it was reading; a worker ends with its rank.
"""
import copy
import ctypes
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
import weakref

import numpy as np
import torch

from ccfs_dist.runtime.dist import deal, die_with_parent, tune_malloc
from ccfs_dist.errors import CCFSError, DataError
from ccfs_dist.data.images import fast_png_decoder

WORKER_TIMEOUT_S = 600        # data.worker_timeout's default: docs/configuration.md says why
PREFETCH = 2                  # batches a loader worker may have ready ahead of its rank (DataLoader's default)
LIVENESS_S = 5.0              # how often a waiting rank checks its workers, and an idle worker its rank
SLOTS = 64                    # shards per worker recorded as open, for the error that names a stalled loader's
READER = "ccfs_dist.data.shards.reader"   # the streamed pool whose split and streams a worker is sent (pickled)


def start_context():
    """The multiprocessing context that loader workers (and writer processes beside other threads) start in:
    `forkserver` where the platform has it, else `spawn`; not `fork`. A rank runs threads (gloo's, the TCP
    store's, tqdm's monitor), and a process forked while another thread holds a lock (the interpreter's,
    malloc's) waits for it forever.
    The fork server is a fresh single-threaded process that imports this module and the reader (torch, numpy,
    PIL) once and forks every worker from there, so a worker starts in milliseconds. Not torchvision: a worker
    loads its PNG op library alone (images.fast_png_decoder, milliseconds); the package would add about 1 s of
    CPU per server."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", __name__, READER])   # no effect once the server runs
    return ctx


def start_fork_server():
    """Start the fork server now (if start_context uses one): it imports while this process does other work,
    instead of when the first worker is wanted."""
    if start_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver
        forkserver.ensure_running()


def pack(batch_size, shape):
    """One uint8 buffer holding a batch: labels and ids (int64, 2 x batch_size) first, then the images.

    A worker sends one tensor per batch instead of three: each tensor crossing from a DataLoader worker
    costs the rank a file-descriptor hand-over, which limits the batches per second a rank can take in.
    Returns (buffer, images view, meta view)."""
    b, pixels = batch_size, int(np.prod(shape))
    buf = torch.empty(16 * b + b * pixels, dtype=torch.uint8)
    return buf, buf[16 * b:].view((b,) + tuple(shape)), buf[:16 * b].view(torch.int64).view(2, b)


def unpack(buf, n, batch_size, shape):
    """(images, labels, ids) views of the first n samples of a packed batch."""
    b = batch_size
    meta = buf[:16 * b].view(torch.int64).view(2, b)
    return buf[16 * b:].view((b,) + tuple(shape))[:n], meta[0, :n], meta[1, :n]


def pack_encoded(batch_size, payloads, jpeg, labels, ids):
    """One uint8 buffer of an encoded batch (decode="device"), one tensor per batch as pack: int64 labels,
    ids, payload lengths and is-JPEG flags (4 x batch_size) first, then the payloads end to end: JPEG bytes
    as stored, or the C x H x W pixels a worker decoded (a member that is not a JPEG)."""
    b, n = batch_size, len(ids)
    meta = np.zeros((4, b), dtype=np.int64)
    meta[0, :n], meta[1, :n] = labels, ids
    meta[2, :n] = [len(p) for p in payloads]
    meta[3, :n] = jpeg
    return torch.frombuffer(bytearray(meta.tobytes() + b"".join(payloads)), dtype=torch.uint8), n


def unpack_encoded(buf, n, batch_size):
    """(payload views, is-JPEG flags as numpy bools, labels, ids) of the first n samples of pack_encoded's buffer."""
    b = batch_size
    meta = buf[:32 * b].view(torch.int64).view(4, b)
    ends = np.cumsum(meta[2, :n].numpy()) + 32 * b
    payloads = [buf[end - length:end] for end, length in zip(ends.tolist(), meta[2, :n].tolist())]
    return payloads, meta[3, :n].numpy().astype(bool), meta[0, :n], meta[1, :n]


class Workers:
    """One rank's loader worker processes for one split: started (start_context) as passes need them, then
    reused by every later pass, each told its pass through a pipe of its own.

    A pass over n workers is exactly what a DataLoader with n fresh workers gave it: worker w reads every
    n-th shard from the w-th (_ShardStream.worker) and the rank takes the workers' batches round-robin, one
    from each worker still holding one, in worker order; a worker has at most PREFETCH batches ready ahead.
    Every wait for a batch is bounded: a worker that delivers nothing for `timeout` seconds, or ends, fails
    the pass (CCFSError naming the step and the shards the worker was reading) and ends every worker."""

    def __init__(self, split, timeout):
        self.ctx = start_context()
        self.timeout, self.index_path = timeout, split.index_path
        self.shards, self.firsts = split.shards, split._firsts
        self.split = copy.copy(split)            # what the workers are sent (__getstate__); not the split itself,
        self.procs, self.tasks, self.results, self.slots = [], [], [], []   # which ends them when it goes
        self.dealt, self.passes = [], 0
        self.tuned = tune_malloc.cache_info().currsize > 0 and tune_malloc()     # as its rank: tuned or not
        weakref.finalize(split, self.close)

    def _start(self, n):
        while len(self.procs) < n:
            w = len(self.procs)
            # pipes, not multiprocessing queues: their semaphores would be reported as leaked when a rank leaves
            # through os._exit (dist.exit_process)
            (tasks, to_worker), (results, from_worker) = self.ctx.Pipe(duplex=False), self.ctx.Pipe(duplex=False)
            slots = self.ctx.RawArray(ctypes.c_int64, SLOTS)
            slots[:] = [-1] * SLOTS
            proc = self.ctx.Process(target=_worker_main, name=f"ccfs-loader-{w}", daemon=True,
                                    args=(self.split, w, tasks, from_worker, slots, os.getpid(), self.tuned))
            proc.start()
            tasks.close()                        # the worker's ends: its death is then an EOF here
            from_worker.close()
            self.procs.append(proc)
            self.tasks.append(_Outbox(to_worker))
            self.results.append(results)
            self.slots.append(slots)
            self.dealt.append([])

    def run(self, stream, n):
        """The packed batches of `stream` (a _ShardStream) read by workers 0..n-1."""
        self._start(n)
        self.passes += 1
        p = self.passes
        spec = copy.copy(stream)
        spec.split = None                        # each worker has the split from its start
        for w, tasks in enumerate(self.tasks):
            mine = None
            if w < n:
                mine = copy.copy(spec)
                mine.worker = (w, n)
                self.dealt[w] = deal(stream.shards, w, n)
            tasks.put(("pass", p, mine))         # also to the idle ones: whatever they still read is dropped
            if w < n:
                tasks.put(("more", p, PREFETCH))
        live = list(range(n))
        while live:
            for w in list(live):
                kind, item = self._receive(w, p)
                if kind == "end":
                    live.remove(w)
                    continue
                self.tasks[w].put(("more", p, 1))
                yield item

    def _receive(self, w, p):
        """Worker w's next message of pass p: ("batch", item) or ("end", None)."""
        start = time.monotonic()
        while True:
            if self.passes != p:
                raise RuntimeError(f"{self.index_path}: a pass over the split started while another was being read; "
                                   f"passes over one split must not nest")
            waited = time.monotonic() - start
            try:
                if not self.results[w].poll(max(0.01, min(LIVENESS_S, self.timeout - waited))):
                    raise queue.Empty
                got, kind, item = self.results[w].recv()
            except (queue.Empty, EOFError, OSError) as e:
                proc = self.procs[w]
                closed = not isinstance(e, queue.Empty)          # the worker's pipe ended: so did the worker
                if closed:
                    proc.join(timeout=LIVENESS_S)                # for its exit code
                ended = closed or not proc.is_alive()
                if not ended and time.monotonic() - start < self.timeout:
                    continue
                reading = self._reading(w)
                self.close()
                if ended:
                    raise CCFSError(f"loader worker {w} (pid {proc.pid}) of {self.index_path} ended with exit code "
                                    f"{proc.exitcode} in {_stage()} while {reading} (killed, or out of memory?)")
                raise CCFSError(f"the loader of {self.index_path} delivered nothing for {self.timeout:g} s "
                                f"(data.worker_timeout) in {_stage()}: worker {w} (pid {proc.pid}) stalled while "
                                f"{reading}; check the storage (or the pipe: command) it reads, or raise "
                                f"data.worker_timeout if one batch can take that long")
            if got != p:                         # left over from a pass that was left before its end
                continue
            if kind == "error":
                raise DataError(item)
            if kind == "failed":
                self.close()
                raise RuntimeError(f"loader worker {w} of {self.index_path} failed:\n{item}")
            return kind, item

    def _reading(self, w):
        """The shards worker w has open, in words."""
        firsts = sorted(v for v in self.slots[w] if v >= 0)
        if not firsts:
            dealt = [s["url"] for s in self.dealt[w]]
            return (f"opening none of its {len(dealt)} shard(s) yet ({', '.join(dealt[:3])}"
                    f"{' ...' if len(dealt) > 3 else ''})")
        urls = [self.shards[int(np.searchsorted(self.firsts, f, side="right")) - 1]["url"] for f in firsts]
        return f"reading shard(s) {', '.join(urls)}"

    def close(self):
        """End every worker now (SIGKILL: a worker holds nothing that must be saved)."""
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(timeout=LIVENESS_S)
        for channel in self.tasks + self.results:
            channel.close()
        self.procs, self.tasks, self.results, self.slots, self.dealt = [], [], [], [], []


class _Outbox:
    """Messages to one loader worker, written to its pipe by a thread of their own: the rank never waits for a
    worker to read (a pass's message holds its mask, larger than a pipe's buffer)."""

    def __init__(self, conn):
        self.conn, self.queue = conn, queue.SimpleQueue()
        threading.Thread(target=self._send, daemon=True, name="ccfs-loader-outbox").start()

    def put(self, message):
        self.queue.put(message)

    def _send(self):
        try:
            while True:
                message = self.queue.get()
                if message is _Outbox:           # closed
                    return
                self.conn.send(message)
        except OSError:                          # the worker is gone; the rank finds out when it waits for it
            pass
        finally:
            self.conn.close()                    # here, not by another thread while this one may write to it

    def close(self):
        self.queue.put(_Outbox)


def _stage():
    """The pipeline step reading a loader, for its errors: the engine's functions on the stack outside this
    module and the reader, outermost first (e.g. scores.dynamics_run > stream_train.train_stream >
    stream_train.epoch_batches)."""
    names, frame = [], sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("ccfs_dist.") and module not in (__name__, READER):
            names.append(f"{module.rsplit('.', 1)[1]}.{frame.f_code.co_name}")   # the module, not its package
        frame = frame.f_back
    return " > ".join(reversed(names[:4])) or "a pass over the shards"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _worker_main(split, w, tasks, results, slots, rank, tuned):
    """A loader worker process (Workers). Messages from its rank: ("pass", id, _ShardStream or None) starts
    a pass (dropping the one before), ("more", id, k) asks for k more of its batches, None ends the worker.
    Replies, per pass: (id, "batch", packed batch) each, then (id, "end", None); (id, "error", message) for a
    DataError, (id, "failed", traceback) for any other exception. It ends with its rank: SIGKILL when the
    fork server ends (which ends with the rank), and an idle worker checks for its rank every LIVENESS_S."""
    die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole process group: the rank decides
    torch.set_num_threads(1)
    if tuned:
        tune_malloc()
    fast_png_decoder()                           # probed once here, not at the first PNG
    batches, current, credit = None, None, 0
    while True:
        busy = batches is not None and credit > 0
        try:
            message = tasks.recv() if tasks.poll(0 if busy else LIVENESS_S) else ()
        except (EOFError, OSError):              # the rank is gone
            return
        if message == () and not busy:
            if not _alive(rank):
                return
            continue
        if message is None:
            return
        if message:                              # every message waiting is read before the next batch
            kind, p, payload = message
            if kind == "pass":
                if batches is not None:
                    batches.close()
                slots[:] = [-1] * SLOTS
                batches, current, credit = None, p, 0
                if payload is not None:
                    payload.split, payload.slots = split, (slots, 0)
                    batches = iter(payload)
            elif p == current:
                credit += payload
            continue
        try:
            reply = (current, "batch", next(batches))
            credit -= 1
        except StopIteration:
            reply, batches = (current, "end", None), None
        except DataError as e:
            reply, batches = (current, "error", str(e)), None
        except Exception:                        # noqa: BLE001 - a bug: the rank raises it with this traceback
            reply, batches = (current, "failed", traceback.format_exc()), None
        try:
            results.send(reply)
        except OSError:                          # the rank is gone
            return
