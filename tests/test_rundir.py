"""The run directory (ccfs_dist/runtime/rundir.py): staged --overwrite that a SIGKILL never costs the earlier run, the
repair of an interrupted commit, one run per directory (flock, released by the OS), leftovers removed, and a
new run that never picks up a training state."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ccfs_dist.cli import main

from conftest import ROOT
from test_bad_input import TINY, run_dir, snapshot  # noqa: F401  (run_dir: a fixture)

SCRIPT = os.path.join(ROOT, "launch", "ccfs.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
# the replacing run is slow enough that a kill lands inside it (its epochs, not its start-up)
SLOW = TINY + ["teacher.epochs=30", "train.epochs=40", "seed=1", "ccfs.difficulty=logits"]


def siblings(run_dir):
    return sorted(n for n in os.listdir(run_dir.parent) if n.startswith(f".{run_dir.name}.ccfs-"))


def start(args):
    return subprocess.Popen([sys.executable, SCRIPT] + args, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(proc, ready, timeout=300):
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before the kill point: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.05)


def kill(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_overwrite_killed_anywhere_keeps_the_earlier_run_and_locks_out_a_second_run(run_dir, capsys):
    """SIGKILL at three points of a replacing run: the earlier run stays byte for byte."""
    before = snapshot(run_dir)
    staged = run_dir.parent / ".run.ccfs-new"
    kill_points = [lambda: (staged / "config.yaml").exists(),                     # just started
                   lambda: (staged / "teacher_state.pt").exists(),                # inside the teacher's training
                   lambda: (staged / "phase_1" / "steps.json").exists()]          # a phase underway
    for i, ready in enumerate(kill_points):
        proc = start(["--out", str(run_dir), "--overwrite"] + SLOW)
        wait_for(proc, ready)
        if i == 1:                 # a second run into the same directory while the first one holds it
            assert main(["run", "--out", str(run_dir), "--overwrite"] + TINY) == 2
            err = capsys.readouterr().err
            assert f"error: run directory '{run_dir}' is in use by another run (pid {proc.pid})" in err, err
        kill(proc)
        assert snapshot(run_dir) == before, f"kill point {i}"
    # the killed runs' lock went with them, its file and their partial staged run stay behind ...
    assert siblings(run_dir) == [".run.ccfs-lock", ".run.ccfs-new"]
    # ... until the next run, which removes them (and its own lock file when it ends), and which never loads
    # a training state (`*_state.pt`, garbage here) of an earlier run: only a resume does (test_resume.py)
    for part in ("teacher_state.pt", "phase_1/filter_state.pt", "eval/ccfs_run0_state.pt"):
        (run_dir / part).write_bytes(b"not a checkpoint")
    assert main(["run", "--out", str(run_dir), "--overwrite"] + TINY + ["seed=2"]) == 0
    assert "seed: 2" in (run_dir / "config.yaml").read_text()
    assert siblings(run_dir) == [] and not list(run_dir.rglob("*_state.pt"))


def make_state(run_dir, tmp_path, old, staged, staged_finished):
    """The folders a kill inside `commit` leaves: the earlier run A moved aside, the new run B staged."""
    a, b = run_dir, tmp_path / "b"
    shutil.copytree(a, b)
    (b / "config.yaml").write_text((b / "config.yaml").read_text() + "# B\n")
    if not staged_finished:
        os.remove(b / "summary.json")
    want = {"A": snapshot(a), "B": snapshot(b)}
    if old:
        os.rename(a, run_dir.parent / ".run.ccfs-old")
    if staged:
        os.rename(b, run_dir.parent / ".run.ccfs-new")
    else:
        os.rename(b, run_dir)
    return want


@pytest.mark.parametrize("state, expect", [
    ({"old": True, "staged": True, "staged_finished": True}, "B"),    # killed between commit's renames
    ({"old": True, "staged": True, "staged_finished": False}, "A"),   # (B unfinished: cannot happen, but safe)
    ({"old": True, "staged": False, "staged_finished": True}, "B"),   # killed before deleting A
    ({"old": False, "staged": True, "staged_finished": False}, "A"),  # killed before the commit
])
def test_interrupted_commit_is_repaired_by_the_next_run(run_dir, tmp_path, capsys, state, expect):
    want = make_state(run_dir, tmp_path, **state)
    # the next run fails on an input checked after the run directory's repair: nothing else is touched
    assert main(["run", "--out", str(run_dir), "--overwrite"] + TINY + ["ccfs.ipc=1000"]) == 2
    assert "exceeds the real images" in capsys.readouterr().err
    assert snapshot(run_dir) == want[expect]
    assert siblings(run_dir) == []


def test_resume_removes_what_a_killed_run_left(run_dir):
    (run_dir / ".distilled.abc123.tmp" / "new000").mkdir(parents=True)
    (run_dir / ".distilled.abc123.tmp" / "new000" / "x.png").write_bytes(b"partial")
    (run_dir / ".distilled.q1.old").mkdir()
    (run_dir / "phase_1" / ".selected.npy.k9.tmp").write_bytes(b"partial")
    (run_dir / ".summary.json.zz.tmp").write_bytes(b"{")
    assert main(["run", "--out", str(run_dir), "--resume"] + TINY) == 0
    left = [p for p in run_dir.rglob(".*") if p.name != ".ccfs-run"]       # the marker stays: a run
    assert left == [], left


def test_out_below_folders_that_do_not_exist_yet(tmp_path, capsys):
    """The lock file is made beside RUN, in folders made for it (as launch/ablate.py's cells need); a refused
    run removes them again: it leaves nothing behind."""
    out = tmp_path / "a" / "b" / "run"
    assert main(["run", "--out", str(out)] + TINY + ["ccfs.ipc=1000"]) == 2     # checked after the lock
    assert "exceeds the real images" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_resume_with_a_damaged_training_state(run_dir, capsys):
    """An unfinished evaluation whose mid-training state file is garbage: one error line, nothing lost."""
    for name in ("summary.json", "eval_ccfs.json", "eval/ccfs_run0.json"):
        os.remove(run_dir / name)
    (run_dir / "eval" / "ccfs_run0_state.pt").write_bytes(b"not a checkpoint")
    before = snapshot(run_dir)
    assert main(["run", "--out", str(run_dir), "--resume"] + TINY) == 2
    err = capsys.readouterr().err
    assert f"error: training state {run_dir}/eval/ccfs_run0_state.pt cannot be resumed" in err, err
    assert "delete it to restart" in err and err.count("\n") == 1
    assert snapshot(run_dir) == before


def test_layout_names_the_documented_artifacts_and_finds_finished_phases(tmp_path):
    import numpy as np
    import torch

    from ccfs_dist.runtime import io
    from ccfs_dist.runtime.rundir import Layout
    run = Layout(tmp_path)
    names = {run.teacher(): "teacher.pt", run.scores("el2n"): "scores_el2n.npy",
             run.score_run(2): "scores_runs/run2.npz", run.phase(3, "selected.npy"): "phase_3/selected.npy",
             run.eval_run("distilled+random", 1): "eval/distilled_random_run1.json",
             run.eval_run("ccfs", 0, state=True): "eval/ccfs_run0_state.pt",
             run.eval_summary("distilled+random"): "eval_distilled_random.json",
             run.selected_indices(): "selected_indices.json", run.summary(): "summary.json"}
    for path, name in names.items():
        assert path == os.path.join(str(tmp_path), name)
    assert run.finished_phases() == [] and not run.complete()
    for j in (10, 2):
        io.write_json(run.phase(j, "metrics.json"), {"phase": j})
    os.makedirs(run.phase(3))                                   # no metrics.json: not finished
    assert [j for j, _ in run.finished_phases()] == [2, 10]
    io.write_json(run.summary(), {})
    assert run.complete()
    # loading a saved model leaves the global RNG where it was
    model = torch.nn.Linear(3, 2)
    io.save_torch(run.teacher(), model.state_dict())
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    loaded = run.load_model(run.teacher(), lambda: torch.nn.Linear(3, 2))
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(loaded.weight, model.weight)
    io.write_npz(run.teacher_predictions(), pred=np.arange(3))
    assert np.array_equal(run.read_npz(run.teacher_predictions())["pred"], np.arange(3))
