"""The process count changes the wall time, never the result (plan.py, jobs.py, dist.OneRankAccelerator).

With OMP_NUM_THREADS=1 in every process, the default config (the digits demo, with shorter trainings so
that CI stays quick: see SETTINGS) gives byte-identical selected_indices.json, phase_*/selected.npy and
eval_*.json (each set evaluated under KD and under hard labels: eval.labels=both) with 1 process, 2 processes, 2 "nodes" x 1 process on localhost, and after SIGKILL of one
rank of a 2-process run at 4 points and --resume (with 2 processes, or with 1; and a killed 1-process run
resumed with 2). No training
of this config is split over ranks (its batches are below train.min_batch_per_rank per rank), so bitwise
is the right comparison. A split training cannot be bitwise across process counts (gradient reduction
order; per-rank BatchNorm statistics on the CPU), so it is tested on its own: every rank ends with the
same parameters and buffers.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, accelerate_launch, free_port, run_on_one_thread
from ccfs_dist.config import load_config
from ccfs_dist.runtime.plan import make_plan, runs_data_parallel

SCRIPT = os.path.join(ROOT, "launch", "ccfs.py")
KILL = os.path.join(ROOT, "tests", "workers", "kill_worker.py")
SPLIT = os.path.join(ROOT, "tests", "workers", "split_worker.py")
# the default config with fewer epochs / iterations (the same pipeline: forgetting scores computed in the
# run, 3 phases, baselines); 3-epoch checkpoints so that a kill lands after one
SETTINGS = ["ccfs.ipc=10", "teacher.epochs=6", "distill.iterations=10", "train.epochs=6", "scores.epochs=4",
            "scores.runs=2", "eval.runs=2", "train.checkpoint_every=3", "model.width=16", "eval.labels=both"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
COMPARED = ["selected_indices.json", "phase_1/selected.npy", "phase_2/selected.npy", "phase_3/selected.npy",
            "eval_ccfs.json", "eval_distilled_random.json", "eval_random.json",     # both evaluation regimes
            "eval_ccfs_hard.json", "eval_distilled_random_hard.json", "eval_random_hard.json"]


def one_process(out, extra=()):
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out), *SETTINGS, *extra], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def two_processes(out, extra=()):
    return accelerate_launch([SCRIPT, "--out", str(out), *SETTINGS, *extra], processes=2)


def artifacts(out):
    return {name: (out / name).read_bytes() for name in COMPARED}


def assert_same(out, reference):
    got = artifacts(out)
    differ = [name for name in COMPARED if got[name] != reference[name]]
    assert not differ, f"differ from the 1-process run: {differ}"
    leftovers = [p.name for p in out.rglob("*_state.pt")]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-process run, in this process on one thread (the entry script's own start is tested in test_run.py
    and by every launched run here)."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert run_on_one_thread(["--out", str(out), *SETTINGS]) == 0
    return artifacts(out)


# --------------------------------------------------------------------------- the plan (a pure function)

SIZES = {"n_train": 1437, "num_classes": 10, "class_size": 143.7}


def plan_jobs(stages):
    return [(s.name, job.name, rank) for s in stages for rank, jobs in enumerate(s.local) for job in jobs]


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_plan_deals_every_training_once_whole(world):
    cfg = load_config(None, ["ccfs.difficulty=forgetting"])
    stages = make_plan(cfg, world, **SIZES)
    assert stages == make_plan(cfg, world, **SIZES)                   # deterministic
    assert [s.name for s in stages] == ["start", "phase 1", "phase 2", "phase 3", "final"]
    names = [name for _, name, _ in plan_jobs(stages)]
    expected = (["teacher"] + [f"score_run {r}" for r in range(3)] + [f"filter {j}" for j in (1, 2, 3)]
                + [f"eval {s} {r}" for s in ("ccfs", "distilled+random", "random") for r in range(3)])
    assert sorted(names) == sorted(expected)
    assert all(not s.split for s in stages)                           # batches of 32-128: nothing split
    where = {name: (stage, rank) for stage, name, rank in plan_jobs(stages)}
    assert where["teacher"][0] == "start" and all(where[f"filter {j}"][0] == f"phase {j}" for j in (1, 2, 3))
    assert all(where[f"eval ccfs {r}"][0] == "final" for r in range(3))
    if world == 1:
        assert {rank for _, _, rank in plan_jobs(stages)} == {0}
    else:                                      # the ranks work side by side: no rank idles through the start
        assert all(s.local[r] for s in stages[:1] for r in range(min(world, 4)))
        busy = sum(max(s.loads()) for s in stages)
        assert busy < 0.75 * sum(sum(s.loads()) for s in stages)       # well below the serial sum


def test_plan_splits_a_training_only_with_enough_samples_per_rank():
    assert not runs_data_parallel(128, 1, 1)
    assert runs_data_parallel(128, 2, 64) and not runs_data_parallel(128, 4, 64)
    cfg = load_config(None, ["ccfs.difficulty=forgetting", "train.min_batch_per_rank=64"])
    start = make_plan(cfg, 2, **SIZES)[0]
    assert [j.name for j in start.split] == ["teacher", "score_run 0", "score_run 1", "score_run 2"]
    assert all(not jobs for jobs in start.local)
    assert not make_plan(cfg, 4, **SIZES)[0].split                  # 32 per rank: whole again
    for world in (1, 2):                   # a streamed pool: teacher and score runs train on the stream, split
        stages = make_plan(load_config(None, ["ccfs.difficulty=forgetting"]), world, **SIZES, streamed=True)
        assert [j.name for j in stages[0].split] == ["teacher", "score_run 0", "score_run 1", "score_run 2"]
        assert all(not s.split for s in stages[1:])


# --------------------------------------------------------------------------- same result on any count


def test_two_processes_match_one(reference, tmp_path):
    out = tmp_path / "run"
    proc = two_processes(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(out / "summary.json"))["processes"] == 2
    assert_same(out, reference)


def test_two_processes_with_a_shared_synthetic_set_match_one_resident(reference, tmp_path):
    """train.synthetic=shared (S_j and the baselines in run-dir files shared by the ranks, rows moved per
    chunk) with 2 processes: every selection and evaluation equals the resident 1-process run's."""
    out = tmp_path / "run"
    proc = two_processes(out, extra=["train.synthetic=shared"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(out, reference)
    held = sorted(p.name for p in (out / "synthetic").iterdir())
    assert held == ["S_3.npy", "distilled_random.npy", "random.npy"], held     # S_0..S_2 were removed


def test_two_nodes_match_one(reference, tmp_path):
    """Two `accelerate launch --cpu --num_machines 2 --machine_rank 0|1` commands, one process each,
    sharing the run directory (as nodes share a file system)."""
    out, port = tmp_path / "run", str(free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_machines", "2", "--machine_rank",
         str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--num_processes", "2",
         "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, "--out", str(out), *SETTINGS],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert json.load(open(out / "summary.json"))["processes"] == 2
    assert_same(out, reference)


# --------------------------------------------------------------------------- kill one rank, resume


def killed(out, point, processes=2, resume=False):
    args = [KILL, point, "--out", str(out), *SETTINGS] + (["--resume"] if resume else [])
    proc = (accelerate_launch(args, processes=2) if processes == 2 else
            subprocess.run([sys.executable, *args], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600))
    assert proc.returncode != 0, "the run was not killed"
    assert not (out / "summary.json").exists()
    KILLED[point](out)


def killed_at_teacher(out):
    assert (out / "teacher_state.pt").exists() and not (out / "teacher.pt").exists()


def killed_at_distillation(out):
    assert (out / "teacher.pt").exists() and not (out / "distilled").exists()


def killed_at_scoring(out):
    assert (out / "phase_1" / "metrics.json").exists() and (out / "phase_2" / "filter.pt").exists()
    assert not (out / "phase_2" / "predictions.npz").exists()


def killed_at_evaluation(out):
    assert (out / "eval" / "ccfs_run1_state.pt").exists() and not (out / "eval_ccfs.json").exists()


KILLED = {"teacher": killed_at_teacher, "distillation": killed_at_distillation, "scoring": killed_at_scoring,
          "evaluation": killed_at_evaluation}


def test_rank_killed_at_each_point_resumes_to_the_same_result(reference, tmp_path):
    """SIGKILL of one rank of a 2-process run inside the teacher's training; its resume killed (one rank) in the
    distillation; that resume killed when phase 2's scoring starts (each leaving what its point names); then
    --resume with 2 processes: the 1-process run's artifacts, byte for byte."""
    out = tmp_path / "run"
    for i, point in enumerate(("teacher", "distillation", "scoring")):
        killed(out, point, 2, resume=i > 0)
    proc = two_processes(out, extra=["--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(out, reference)


@pytest.mark.parametrize("killed_with, resumed_with", [(2, 1), (1, 2)])
def test_killed_rank_resumes_to_the_same_result_with_another_count(killed_with, resumed_with, reference, tmp_path):
    """At "evaluation" the rank training CCFS evaluation model 2 is killed in its middle: of 2 processes (rank 1),
    resumed with 1, whose plan gives the training to rank 0; of 1 process, resumed with 2, whose plan gives it
    to rank 1. Either continues from the checkpoint."""
    out = tmp_path / "run"
    killed(out, "evaluation", killed_with)
    if resumed_with == 2:
        proc = two_processes(out, extra=["--resume"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        one_process(out, extra=["--resume"])
    assert_same(out, reference)


# --------------------------------------------------------------------------- a split training


def test_run_with_split_and_whole_trainings(tmp_path):
    """train.min_batch_per_rank=64 splits the batch-128 trainings (teacher, score runs) over the 2 ranks and
    keeps the batch-32 ones (filters, evaluation) whole: the collectives of split jobs and the dealing of
    whole ones in one run. The result is not compared with 1 process (a split training depends on the
    process count); the run must finish with every artifact."""
    out = tmp_path / "run"
    proc = two_processes(out, extra=["train.min_batch_per_rank=64"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plan: start: all ranks [teacher, score_run 0, score_run 1]" in proc.stdout
    assert "plan: final: rank 0 [eval ccfs 0" in proc.stdout
    summary = json.load(open(out / "summary.json"))
    assert summary["processes"] == 2 and summary["teacher"]["source"] == "trained"
    assert all(0 <= r["mean"] <= 1 for r in summary["evaluation"].values())
    assert len(json.load(open(out / "selected_indices.json"))["idx_selected"]) == sum(summary["budgets"]) * 10


def test_split_training_ends_identical_on_every_rank(tmp_path):
    """DDP keeps the parameters in step, but each rank's forward passes update its own BatchNorm running
    statistics (on the CPU torch has no SyncBatchNorm): they differ before the closing broadcast, and
    every rank holds rank 0's state after it. Whether a split job has finished is rank 0's answer on every
    rank, also where the other rank's file system does not show the artifact yet."""
    out = tmp_path / "split.npz"
    proc = accelerate_launch([SPLIT, str(out)], processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    assert int(got["world"]) == 2
    assert not np.array_equal(got["before"][0], got["before"][1])
    np.testing.assert_array_equal(got["after"][0], got["after"][1])
    np.testing.assert_array_equal(got["after"][0], got["before"][0])
    assert got["finished"].tolist() == [True, True]       # rank 0's look, broadcast (jobs.finished)


LOCAL_BF16 = """
import torch
from ccfs_dist.data.pool import Norm
from ccfs_dist.runtime.dist import OneRankAccelerator, make_accelerator
from ccfs_dist.training.models import build_model
from ccfs_dist.training.train import Recipe, train_model
acc = make_accelerator("bf16")
local = OneRankAccelerator(acc)
torch.manual_seed(0)
model = build_model({"name": "convnet", "width": 8, "depth": 2, "norm": "batchnorm"}, 10, 3, 16)
seen = []
model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
images, labels = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8), torch.arange(64) % 10
trained, stats = train_model(local, model, images, labels, Recipe(epochs=1, batch_size=32, lr=0.01),
                             norm=Norm((0.5,) * 3, (0.25,) * 3))
wrapped, _ = local.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
print(type(trained).__name__, seen[0], wrapped(images[:2].float()).dtype, stats["steps"])
"""


def test_local_training_keeps_mixed_precision():
    """A training run whole on one rank (dist.OneRankAccelerator, never Accelerator.prepare) still runs its forward
    under the accelerator's autocast, returns float32 logits, and hands back the bare model."""
    proc = subprocess.run([sys.executable, "-c", LOCAL_BF16], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ConvNet", "torch.bfloat16", "torch.float32", "2"]


def test_reading_another_ranks_artifact_waits_for_it(tmp_path):
    """io.wait_for: an artifact renamed into place on another node can show up late (NFS lookup cache)."""
    import threading
    from ccfs_dist.runtime import io
    path = tmp_path / "eval" / "ccfs_run0.json"
    timer = threading.Timer(0.3, lambda: io.write_json(path, {"final": 0.5}))
    timer.start()
    assert io.read_json(io.wait_for(str(path), seconds=30, poll=0.05)) == {"final": 0.5}
    timer.join()
    with pytest.raises(RuntimeError, match="did not appear within 0 s"):
        io.wait_for(str(tmp_path / "missing.json"), seconds=0.2, poll=0.05)
