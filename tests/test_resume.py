"""SIGKILL a real run at several points, resume it, and compare with an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_here, run_on_one_thread

SCRIPT = os.path.join(ROOT, "launch", "ccfs.py")
SLOW = os.path.join(ROOT, "tests", "workers", "slow_score_worker.py")
# long enough trainings that a kill lands inside them; epoch checkpoints every 3 epochs. The forgetting
# scores (the default difficulty) from 2 short runs: no kill point is in them, and their length adds only time
SETTINGS = ["teacher.epochs=12", "distill.iterations=10", "ccfs.ipc=6", "ccfs.alpha=0.34", "ccfs.phases=2",
            "train.epochs=60", "train.checkpoint_every=3", "eval.runs=1", "eval.baselines=false",
            "model.width=16", "scores.runs=2", "scores.epochs=4"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def run(out, script=SCRIPT, extra=(), env=ENV):
    proc = subprocess.run([sys.executable, script, "--out", str(out)] + SETTINGS + list(extra), env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kill_when(out, ready, script=SCRIPT, env=ENV, timeout=300, extra=()):
    """Start a run, SIGKILL its whole process group as soon as `ready()` holds, return its stdout."""
    proc = subprocess.Popen([sys.executable, script, "--out", str(out)] + SETTINGS + list(extra), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.stdout.read()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in this process on one thread as the killed runs' processes."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert run_on_one_thread(["--out", str(out), *SETTINGS]) == 0
    return {name: json.load(open(out / name)) for name in ("selected_indices.json", "eval_ccfs.json")}


def check_artifacts_whole(out):
    """Every artifact under its final name loads: a kill leaves only complete files (or hidden temps)."""
    import numpy as np
    import torch
    for p in out.rglob("*"):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix == ".json":
            json.load(open(p))
        elif p.suffix in (".npy", ".npz"):
            np.load(p, allow_pickle=False)
        elif p.suffix == ".pt":
            torch.load(p, weights_only=True)


def exists(path):
    return lambda: os.path.exists(path)


def check_killed(out, capsys, extra=()):
    """What a kill leaves: no summary, only whole artifacts, and a run that refuses to start without --resume
    (checked in this process: the refusal comes before any work)."""
    assert not (out / "summary.json").exists()
    check_artifacts_whole(out)
    refused = run_here(capsys, ["--out", str(out)] + SETTINGS + list(extra))
    assert refused.returncode == 2 and "--resume" in refused.stderr


def check_same_result(out, reference):
    assert json.load(open(out / "selected_indices.json")) == reference["selected_indices.json"]
    assert json.load(open(out / "eval_ccfs.json"))["final"] == reference["eval_ccfs.json"]["final"]
    leftovers = [p.name for p in out.rglob("*_state.pt")]
    assert not leftovers, leftovers


# a kill at each point in turn: killed after the teacher, the resume killed inside phase 2's filter training
# (a checkpoint written), that resume killed inside the evaluation model's training; then resumed to the end
CASES = {
    "after_teacher": lambda out: exists(out / "teacher.pt"),
    "phase_2_training": lambda out: exists(out / "phase_2" / "filter_state.pt"),
    "evaluation": lambda out: exists(out / "eval" / "ccfs_run0_state.pt"),
}


def test_run_killed_at_each_point_resumes_to_the_same_result(reference, tmp_path, capsys):
    """One run SIGKILLed at each point of CASES in turn (each kill but the first hits a resumed run): after
    every kill the artifacts are whole and a plain start is refused; the last resume ends with the
    uninterrupted run's selection and evaluation, and no training state left."""
    out = tmp_path / "run"
    for i, ready in enumerate(CASES.values()):
        kill_when(out, ready(out), extra=["--resume"] if i else [])
        check_killed(out, capsys)
    run(out, extra=["--resume"])
    check_same_result(out, reference)


@pytest.mark.parametrize("point", ["scoring", "phase_2_training_shared"])
def test_killed_run_resumes_to_the_same_result(point, reference, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["train.synthetic=shared"] if point.endswith("_shared") else []
    if point == "phase_2_training_shared":       # S_1 is in its file (S_0's removed); the filter trains on it
        kill_when(out, CASES["phase_2_training"](out), extra=extra)
        assert (out / "synthetic" / "S_1.npy").exists() and not (out / "synthetic" / "S_0.npy").exists()
    else:
        marker = tmp_path / "scoring-started"
        kill_when(out, exists(marker), script=SLOW, env=dict(ENV, CCFS_TEST_MARKER=str(marker)))
        assert (out / "phase_1" / "metrics.json").exists() and not (out / "phase_2" / "metrics.json").exists()
        assert (out / "phase_2" / "filter.pt").exists()
    check_killed(out, capsys, extra)
    resumed = run(out, extra=extra + ["--resume"])
    if extra:          # S_1 is in place: S_0 (deleted) is not written again, S_2 is
        assert "written to synthetic/S_0.npy" not in resumed.stdout and "written to synthetic/S_2.npy" in resumed.stdout
    check_same_result(out, reference)
