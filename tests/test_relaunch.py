"""relaunch.supervise and the ranks' environment: the CPU launcher that replaces torchrun (no torch here:
the children are tiny Python programs)."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT
from ccfs_dist.runtime import relaunch
from ccfs_dist.runtime.relaunch import exit_code, rank_environments, supervise

PY = sys.executable


def test_rank_environments_follow_torchrun():
    envs = rank_environments(2, 2, 1, {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "KEEP": "x"})
    assert [e["RANK"] for e in envs] == ["2", "3"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1"]
    for e in envs:
        assert (e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["GROUP_RANK"]) == ("4", "2", "1")
        assert (e["MASTER_ADDR"], e["MASTER_PORT"], e["KEEP"], e["OMP_NUM_THREADS"]) == ("10.0.0.1", "1234", "x", "1")
    assert rank_environments(2, 1, 0, {"MASTER_ADDR": "h", "OMP_NUM_THREADS": "3"})[0]["OMP_NUM_THREADS"] == "3"
    assert rank_environments(1, 1, 0, {"MASTER_ADDR": "h"})[0]["MASTER_PORT"] == "29500"


def test_all_ranks_succeed():
    assert supervise([[PY, "-c", "pass"]] * 3, [dict(os.environ)] * 3) == 0


def test_a_failed_rank_stops_the_others_and_gives_its_status(tmp_path):
    survivor = tmp_path / "survivor"
    t0 = time.monotonic()
    status = supervise([[PY, "-c", "import time; time.sleep(0.3); raise SystemExit(3)"],
                        [PY, "-c", f"import time; time.sleep(60); open({str(survivor)!r}, 'w')"]],
                       [dict(os.environ)] * 2)
    assert status == 3
    assert time.monotonic() - t0 < 30, "the other rank was not stopped"
    assert not survivor.exists()


def test_a_rank_killed_by_a_signal_reports_128_plus_it():
    assert exit_code(-signal.SIGKILL) == 137
    assert supervise([[PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]],
                     [dict(os.environ)]) == 137


def test_sigterm_to_the_supervisor_reaches_every_rank(tmp_path):
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    child = ("import sys, time; open(sys.argv[1], 'w').close(); time.sleep(60)")
    code = ("import os, sys; from ccfs_dist.runtime.relaunch import supervise; "
            f"sys.exit(supervise([[sys.executable, '-c', {child!r}, r] for r in {[str(r) for r in ready]!r}], "
            "[dict(os.environ)] * 2))")
    proc = subprocess.Popen([PY, "-c", code], env=dict(os.environ, PYTHONPATH=os.getcwd()),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not all(r.exists() for r in ready):
            assert time.monotonic() < deadline and proc.poll() is None, "ranks did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # no rank is left behind in the supervisor's session
    out = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert out == []


def test_ranks_that_ignore_a_forwarded_signal_are_killed_after_the_grace_period(tmp_path, monkeypatch):
    monkeypatch.setattr(relaunch, "STOP_GRACE_S", 1)
    ready = tmp_path / "ready"
    child = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             "open(sys.argv[1], 'w').close(); time.sleep(60)")

    def term_when_ready():
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)                  # to this process, the supervisor
    threading.Thread(target=term_when_ready, daemon=True).start()
    t0 = time.monotonic()
    assert supervise([[PY, "-c", child, str(ready)]], [dict(os.environ)]) == 128 + signal.SIGKILL
    assert time.monotonic() - t0 < 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_process_that_asked_dies_with_its_parent(tmp_path):
    """die_with_parent: the grandchild ends when its parent (which started it, then exits) is gone."""
    pid_file = tmp_path / "pid"
    grandchild = ("import os, sys, time; from ccfs_dist.runtime.relaunch import die_with_parent; "
                  "assert die_with_parent(); open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)")
    parent = (f"import subprocess, sys, time, os; subprocess.Popen([sys.executable, '-c', {grandchild!r}, "
              f"{str(pid_file)!r}]); "
              f"[time.sleep(0.02) for _ in range(1500) if not os.path.exists({str(pid_file)!r})]")
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([PY, "-c", parent], env=env, timeout=60, check=True)   # exits once the grandchild is up
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ")[1][0] == "Z":
                break
        time.sleep(0.05)
    gone = not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"
    assert gone, "the grandchild outlived its parent"


@pytest.mark.parametrize("how", ["supervisor", "torchrun"])
def test_launched_ranks_meet_in_one_group(how, launch):
    """`accelerate launch --cpu --num_processes 2`: the supervisor's ranks (or torchrun's, with
    CCFS_RELAUNCH=torchrun) join one gloo group through the env:// rendezvous."""
    env = {"CCFS_RELAUNCH": "torchrun"} if how == "torchrun" else {"CCFS_RELAUNCH": ""}
    proc = launch([os.path.join(ROOT, "tests", "workers", "relaunch_worker.py")], processes=2, timeout=180,
                  env_extra=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"ranks 2 sum 3 local 2 by {how}" in proc.stdout


def test_a_rank_that_cannot_start_stops_the_started_ones(tmp_path):
    survivor = tmp_path / "survivor"
    with pytest.raises(OSError):
        supervise([[PY, "-c", f"import time; time.sleep(1); open({str(survivor)!r}, 'w')"],
                   [str(tmp_path / "no-such-program")]], [dict(os.environ)] * 2)
    time.sleep(2)
    assert not survivor.exists()
