"""Process set-up in ccfs_dist.runtime.dist: the C allocator tuning every entry point gets from make_accelerator."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the forward passes of scoring: ConvNet-D3 (width 32) on batches of 512 16x16 RGB images, whose activation
# buffers (up to 16 MB) are freed after every batch; prints whether the tuning is on and the page faults
# of the last 10 batches (the first 5 settle the heap)
CHURN = """
import resource, torch
from ccfs_dist.runtime.dist import make_accelerator, tune_malloc
from ccfs_dist.training.models import build_model
make_accelerator()
torch.set_num_threads(1)
model = build_model({"name": "convnet", "width": 32, "depth": 3, "norm": "batchnorm"}, 100, 3, 16).eval()
x = torch.randn(512, 3, 16, 16)
with torch.no_grad():
    for i in range(15):
        if i == 5:
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
print(tune_malloc(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""
BUFFER_PAGES = 512 * 32 * 16 * 16 * 4 // 4096    # one activation buffer of the first layer


def churn(env_extra):
    env = dict(os.environ, PYTHONPATH=ROOT, **env_extra)
    out = subprocess.run([sys.executable, "-c", CHURN], env=env, capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning is glibc-only")
def test_activation_buffers_are_reused_not_faulted_in_again():
    tuned, faults = churn({})
    if not tuned:
        pytest.skip("this C library has no mallopt (not glibc)")
    _, untuned_faults = churn({"CCFS_MALLOC_TUNING": "0"})
    # with glibc's defaults the activation buffers go back to the kernel on free and are faulted in again in
    # every batch (80,000-110,000 faults in 10 batches here); tuned, the grown heap is reused and what is
    # left is noise of the machine (1,000-8,000 seen): a count, compared within one test, not a time
    if untuned_faults < 10 * BUFFER_PAGES:
        pytest.skip(f"this C library's defaults keep the buffers too ({untuned_faults} faults): nothing to compare")
    assert faults * 5 < untuned_faults, (f"{faults} page faults in 10 batches tuned, {untuned_faults} untuned "
                                         f"(one activation buffer: {BUFFER_PAGES} pages)")


def test_tuning_can_be_switched_off():
    tuned, _ = churn({"CCFS_MALLOC_TUNING": "0"})
    assert tuned is False


EXIT = """
import atexit, sys
from ccfs_dist.runtime.dist import exit_process
atexit.register(lambda: print("finalised"))
print("work done", end="")                 # unflushed: exit_process must flush it
sys.exit(exit_process(3))
"""


@pytest.mark.parametrize("world", ["1", "2"])
def test_exit_process_skips_finalisation_only_with_several_processes(world):
    """With WORLD_SIZE > 1 the process leaves through os._exit (no atexit handlers, no interpreter
    finalisation, where a gloo thread can abort it), with its status and its output flushed."""
    env = dict(os.environ, PYTHONPATH=ROOT, WORLD_SIZE=world)
    proc = subprocess.run([sys.executable, "-c", EXIT], env=env, capture_output=True, text=True)
    assert proc.returncode == 3
    assert proc.stdout == ("work done" if world == "2" else "work donefinalised\n")


def test_dealt_deals_items_round_robin():
    from types import SimpleNamespace

    from ccfs_dist.runtime.dist import dealt
    shares = [list(dealt(SimpleNamespace(process_index=r, num_processes=3), 7)) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]


def test_rank_arithmetic_covers_every_item_once():
    """The rank helpers: every item of n goes to exactly one rank, in the documented shapes (contiguous and
    balanced, earlier ranks taking the remainder; round-robin; runs laid end to end in rank order)."""
    from types import SimpleNamespace

    from ccfs_dist.runtime.dist import deal, most_per_rank, rank_slice, rank_world, run_of, share, share_sizes, step_rank_key
    assert rank_world(None) == (0, 1)
    for n in (0, 1, 5, 7, 12):
        for world in (1, 2, 3, 5):
            slices = [rank_slice(n, r, world) for r in range(world)]
            assert [i for lo, hi in slices for i in range(lo, hi)] == list(range(n))      # contiguous, in order
            sizes = share_sizes(n, world)
            assert sizes == [hi - lo for lo, hi in slices] and max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes, reverse=True) and max(sizes) == most_per_rank(n, world)
            accs = [SimpleNamespace(process_index=r, num_processes=world) for r in range(world)]
            assert [share(a, n) for a in accs] == slices and rank_world(accs[-1]) == (world - 1, world)
            assert sorted(i for r in range(world) for i in deal(list(range(n)), r, world)) == list(range(n))
            assert [run_of(sizes, r) for r in range(world)] == slices
            keys = [step_rank_key(a, step) for step in range(3) for a in accs]
            assert keys == list(range(3 * world))                        # step-major, then rank
    assert share_sizes(7, 3) == [3, 2, 2] and deal("abcdefg", 1, 3) == "be" and run_of([4, 0, 2], 2) == (4, 6)
