"""Loader workers (shard_loader.Workers): every pass is the round-robin merge of the workers' own streams, exactly as
with fresh workers, while the workers are started once and reused; a stalled or dead worker fails the pass with an
error naming the step and the shard; hundreds of loader starts in threaded ranks finish; stopping or killing the
launcher of a 2-process streamed run leaves no process behind, and a TERMed run resumes.

CCFS_LOADER_STRESS=N runs the stress test with N passes per rank (the on-demand long version,
docs/tests-and-benchmarks.md)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import torch

from ccfs_dist import cli
from ccfs_dist.data.shards import loader as shard_loader, writer as shard_writer
from ccfs_dist.errors import CCFSError
from ccfs_dist.data.shards.loader import unpack
from ccfs_dist.data.shards.reader import ShardPool, _InterleavedStream, _ShardStream
from ccfs_dist.data.shards.writer import write_shards
from ccfs_dist.training.stream_train import epoch_batches, epoch_plan

from conftest import ROOT, free_port
from test_run import SCRIPT, TINY, check_artifacts, run_script

STRESS = os.path.join(ROOT, "tests", "workers", "loader_stress_worker.py")
DIGITS = {"source": "digits", "root": None, "image_size": None, "distilled": None}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Digits as 10 train shards of up to 150 samples and 1 test shard."""
    out = tmp_path_factory.mktemp("loader") / "d"
    for split in ("train", "test"):
        write_shards(DIGITS, out, split, per_shard=150, workers=1, log=lambda m: None)
    return str(out)


def round_robin(streams):
    """One batch from each stream still holding one, in stream order, until all are empty."""
    its, out = [iter(s) for s in streams], []
    while its:
        for it in list(its):
            item = next(it, None)
            if item is None:
                its.remove(it)
            else:
                out.append(item)
    return out


def own_streams(make, shards_, n):
    """Worker w's batches of a pass computed here, in this process: its stream with worker = (w, n)."""
    streams = []
    for w in range(n):
        s = make(shards_)
        s.worker = (w, n)
        streams.append(s)
    return streams


def test_every_pass_is_the_merge_of_the_workers_own_streams(pool):
    """Passes of different kinds (batches: prediction / fetch; stream: training, interleaved), ranks, worker
    counts and batch sizes on one split: each equals the round-robin merge of the workers' streams computed
    in this process (what a DataLoader with that many fresh workers gave), holds exactly the samples of the
    same pass without workers, and with 1 worker is that pass byte for byte; the workers are started once."""
    index_path = os.path.join(pool, "train.json")
    ref, split = ShardPool(index_path), ShardPool(index_path, num_workers=3)
    one = ShardPool(index_path, num_workers=1)
    rng = np.random.default_rng(0)
    pids = None
    cases = [("batches", 1, 0, 64), ("stream", 1, 0, 50), ("batches", 4, 1, 33), ("stream", 4, 3, 17)]
    for p, (kind, world, rank, batch) in enumerate(cases):
        index = np.sort(rng.permutation(len(ref))[:int(rng.integers(300, 700))])
        mask = np.zeros(len(ref), dtype=bool)
        mask[index] = True
        if kind == "batches":
            positions = ref.rank_shards(mask, rank, world)

            def make(s):
                return _ShardStream(ref, s, mask, batch)

            def run(sp):
                return [(x, y, i) for x, y, i in sp.batches(index, batch, rank, world, CPU)]
        else:
            positions = [int(i) for i in rng.permutation(ref.shards_with(mask))][rank::world]
            seed = (7, p, rank)

            def make(s):
                return _InterleavedStream(ref, s, mask, batch, 3, seed)

            def run(sp):
                return list(sp.stream(positions, mask, batch, interleave=3, seed=seed))
        got, zero, single = run(split), run(ref), run(one)
        n = min(3, len(positions))
        want = [unpack(*item, batch, ref.shape)
                for item in round_robin(own_streams(make, [ref.shards[i] for i in positions], n))]
        assert len(got) == len(want) and n >= 2, (kind, world, rank)
        for (x, y, i), (wx, wy, wi) in zip(got, want):
            assert torch.equal(i, wi) and torch.equal(y, wy) and torch.equal(x, wx), (p, kind)
        ids = np.concatenate([i.numpy() for _, _, i in got])
        assert np.array_equal(np.sort(ids), np.sort(np.concatenate([i.numpy() for _, _, i in zero])))
        assert len(single) == len(zero)
        for a, b in zip(single, zero):
            assert all(torch.equal(u, v) for u, v in zip(a, b)), (p, kind)
        now = [proc.pid for proc in split._workers.procs]
        assert pids is None or now[:len(pids)] == pids, "the workers were started again"
        pids = now
    assert len(pids) == 3
    split.close()
    assert not any(_alive(pid) for pid in pids)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def stalled_pool(pool, tmp_path):
    """A copy of the pool whose shard 2 is read by a `pipe:` command that waits on a FIFO (a read that
    stalls, as on a hung network mount) -> (index path, FIFO path)."""
    folder = tmp_path / "d"
    shutil.copytree(pool, folder)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    index_path = folder / "train.json"
    index = json.loads(index_path.read_text())
    shard = index["shards"][2]
    shard["file"] = f"pipe:cat {fifo} {folder / shard['file']}"
    index_path.write_text(json.dumps(index))
    return str(index_path), str(fifo)


def release(fifo):
    """Let the FIFO's reader (the stalled `cat`) go: open it for writing and close it."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_a_stalled_loader_fails_naming_the_step_and_the_shard(pool, tmp_path):
    index_path, fifo = stalled_pool(pool, tmp_path)
    split = ShardPool(index_path, num_workers=2, allow_urls=True, worker_timeout=1.5)
    try:
        fine = np.zeros(len(split), dtype=bool)
        fine[:300] = True                                             # shards 0 and 1: the workers start
        assert sum(len(i) for _, _, i in split.stream([0, 1], fine, 50)) == 300
        pids = [p.pid for p in split._workers.procs]
        plan = epoch_plan(len(split), 128, 1)
        t0 = time.monotonic()
        with pytest.raises(CCFSError, match=r"the loader of .*train.json delivered nothing for 1.5 s "
                                            r"\(data.worker_timeout\) in stream_train.epoch_batches: worker \d "
                                            r"\(pid \d+\) stalled while reading shard\(s\) .*pipe:cat .*fifo"):
            for _ in epoch_batches(split, plan, 0, 0, 0, 64, 2):
                pass
        assert time.monotonic() - t0 < 30
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in pids), "the stalled pass left its workers running"
    finally:
        release(fifo)
        split.close()


def test_a_worker_that_dies_fails_the_pass(pool, tmp_path, monkeypatch):
    monkeypatch.setattr(shard_loader, "LIVENESS_S", 0.2)             # the rank's checks (not the workers')
    index_path, fifo = stalled_pool(pool, tmp_path)
    split = ShardPool(index_path, num_workers=1, allow_urls=True, worker_timeout=60)
    killed = []

    def kill_when_stalled():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = split._workers
            if workers is not None and workers.slots and any(v >= 0 for v in workers.slots[0]) \
                    and workers.slots[0][0] == split.shards[2]["first"]:
                killed.append(workers.procs[0].pid)
                os.kill(killed[0], signal.SIGKILL)
                return
            time.sleep(0.02)
    thread = threading.Thread(target=kill_when_stalled)
    thread.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(CCFSError, match=r"loader worker 0 \(pid \d+\) of .*train.json ended with exit code -9 "
                                            r"in a pass over the shards while reading shard\(s\) pipe:cat"):
            for _ in split.batches(np.arange(len(split)), 100, 0, 1, CPU):
                pass
        assert time.monotonic() - t0 < 30 and killed
    finally:
        thread.join()
        release(fifo)
        split.close()


def test_the_writer_in_a_process_with_threads_starts_no_fork(tmp_path):
    """With another thread running, `ccfs shards`' writer processes start from the fork server (the source
    pickled to them), and the shards are byte for byte those written in this process alone."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert shard_writer._writer_context().get_start_method() != "fork"
        write_shards(DIGITS, tmp_path / "a", "train", per_shard=300, workers=2, log=lambda m: None)
    finally:
        stop.set()
        thread.join()
    write_shards(DIGITS, tmp_path / "b", "train", per_shard=300, workers=1, log=lambda m: None)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and len(names) == 6
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# ------------------------------------------------------------------------------- several processes

def marked(marker):
    """Pids of the live processes whose environment holds CCFS_TEST_RUN=marker (a run and all it started)."""
    tag, pids = f"CCFS_TEST_RUN={marker}".encode(), []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if tag in f.read().split(b"\0") and _alive(int(d)):
                        pids.append(int(d))
            except OSError:
                continue
    return pids


def loader_workers(pids):
    """How many of `pids` are fork servers or the loader workers forked from them."""
    n = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                n += b"forkserver" in f.read()
        except OSError:
            pass
    return n


def start_run(args, marker, processes=2):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port())] + list(args)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, CCFS_TEST_RUN=marker)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def stop_and_count(proc, marker, signum, within, ready=6, start_limit=240, also=lambda: True):
    """Once the run has its loader workers (2 fork servers + workers: `ready` processes) and `also()` holds,
    send `signum` to the launcher alone; return (seconds until no process of the run was left, or None after
    `within`)."""
    try:
        deadline = time.monotonic() + start_limit
        while loader_workers(marked(marker)) < ready or not also():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run's loader workers did not start"
            time.sleep(0.1)
        t0 = time.monotonic()
        proc.send_signal(signum)
        while marked(marker):
            if time.monotonic() - t0 > within:
                return None
            time.sleep(0.2)
        return time.monotonic() - t0
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in marked(marker):                                   # whatever left the group
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def test_hundreds_of_loader_starts_in_threaded_ranks_finish(pool, launch):
    """2 ranks, each with gloo's threads, a tqdm bar and a busy Python thread: 120 passes per rank through
    loader workers (240 loader starts as the old DataLoader-per-pass counted them), a fresh pool of 2 workers
    every 6th pass (80 worker starts). A hang fails at the launch helper's timeout."""
    passes = int(os.environ.get("CCFS_LOADER_STRESS", "120"))
    proc = launch([STRESS, os.path.join(pool, "train.json"), str(passes), "6"], processes=2,
                  timeout=max(300, passes))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"passes {2 * passes} starts {2 * 2 * -(-passes // 6)} in" in proc.stdout
    print(proc.stdout.strip().splitlines()[-1])


def test_killing_the_launcher_leaves_no_process_of_the_run(pool):
    """SIGKILL to `accelerate launch` (nothing can be forwarded): the supervisor, its ranks, their fork
    servers and loader workers all notice (parent-death signals) and end within 60 s."""
    marker = uuid.uuid4().hex
    proc = start_run([STRESS, os.path.join(pool, "train.json"), "0", "1000000"], marker)
    took = stop_and_count(proc, marker, signal.SIGKILL, within=60)
    assert took is not None, "processes of the run outlived its launcher by 60 s"
    print(f"no process of the run left {took:.1f} s after SIGKILL to the launcher")


def test_term_to_the_launcher_ends_the_run_within_30_s_and_it_resumes(tmp_path):
    """SIGTERM to `accelerate launch` while a 2-process run on a shard pool with 2 loader workers per rank (per
    split) is in its second phase: no process of the run is left after 30 s, and `--resume` (here with one
    process) completes it."""
    folder = str(tmp_path / "shards")
    assert cli.main(["shards", "--out", folder, "--per-shard", "300", "--workers", "1", "data.source=digits"]) == 0
    out = str(tmp_path / "run")
    args = [SCRIPT, "--out", out] + TINY + ["data.source=webdataset", f"data.root={folder}/train.json",
                                            f"data.test_root={folder}/test.json", "data.num_workers=2"]
    marker = uuid.uuid4().hex
    late = os.path.join(out, "phase_1", "selected.npy")              # TERMed late: the resume has less to do
    took = stop_and_count(start_run(args, marker), marker, signal.SIGTERM, within=30, ready=4,
                          also=lambda: os.path.exists(late))
    assert took is not None, "processes of the run outlived a SIGTERM to its launcher by 30 s"
    print(f"no process of the run left {took:.1f} s after SIGTERM to the launcher")
    # resumed by one process (a streamed run accepts another count when told): what the TERMed run left must
    # be a valid start
    proc = run_script(args[1:] + ["stream.resume_other_processes=true", "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_artifacts(out, processes=1)
