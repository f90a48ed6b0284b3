"""launch/device_check.py in its CPU mode (--quick sizes; CUDA hidden, also on a machine that has it):
the checks a CPU can run pass, the GPU ones are marked skipped, and both files are written."""
import json
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "launch", "device_check.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
NAMES = ["environment", "determinism", "step_time", "engine", "small_run", "small_run_bf16", "jpeg_decode"]


def test_cpu_mode_runs_what_a_cpu_can_and_writes_both_files(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--quick"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "device_check.json").read_text())
    records = {r["name"]: r for r in report["checks"]}
    assert [r["name"] for r in report["checks"]] == NAMES and report["mode"] == "quick"
    for name in ("step_time", "engine", "small_run_bf16", "jpeg_decode"):
        assert records[name]["skipped"] == "no CUDA" and records[name]["passed"] is None
    env = records["environment"]
    assert env["passed"] and env["figures"]["deterministic"] and env["figures"]["cublas_workspace"] == ":4096:8"
    det = records["determinism"]["figures"]
    assert records["determinism"]["passed"] and det["bitwise_equal"] and det["views_equal_cpu"] and det["steps"] == 4
    run = records["small_run"]
    assert run["passed"] and run["figures"]["compared"] == 2 and run["figures"]["differ"] == []
    assert 0.0 <= run["figures"]["a_accuracy"] == run["figures"]["b_accuracy"] <= 1.0
    md = (out / "device_check.md").read_text()
    assert "python launch/device_check.py --out DIR --quick" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert [row.split(" | ")[0][2:] for row in rows] == NAMES
    assert sum("skipped: no CUDA" in row for row in rows) == 4 and sum("| passed |" in row for row in rows) == 3
    assert not [p.name for p in out.iterdir() if p.name not in ("device_check.json", "device_check.md")]


def test_an_out_that_is_a_file_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "launch"))
    import device_check
    target = tmp_path / "file"
    target.write_text("mine")
    assert device_check.main(["--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and len(err.strip().splitlines()) == 1 and target.read_text() == "mine"
