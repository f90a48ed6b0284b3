"""launch/bench_scaling.py: pairs of whole runs (1 process, then 2) back to back, with config overrides."""
import json
import os
import re
import subprocess
import sys

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "launch", "bench_scaling.py")
TINY = ["teacher.epochs=1", "distill.iterations=2", "train.epochs=1", "scores.runs=2", "scores.epochs=1",
        "eval.runs=1", "model.width=4", "ccfs.phases=1"]


def test_pairs_overrides_and_median(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, SCRIPT, "--workloads", "default", "--repeat", "2", "--out", str(tmp_path),
                           *TINY], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("results byte-identical: True") == 2
    assert "(pair 2 of 2)" in out
    wholes = [float(r) for r in re.findall(r"^whole command\s+\S+\s+\S+\s+(\S+)$", out, re.M)]
    listed = re.search(r"whole-command ratios (\S+) (\S+); median (\S+)", out)
    assert listed and [float(listed[1]), float(listed[2])] == wholes
    assert float(listed[3]) == min(wholes)                  # the lower middle of two
    # the overrides reached every run: one evaluation model, two score runs
    for run_dir in ("default_1", "default_2", "default_1_1", "default_2_1"):
        with open(tmp_path / run_dir / "eval_ccfs.json") as f:
            assert len(json.load(f)["final"]) == 1
        assert sorted(os.listdir(tmp_path / run_dir / "scores_runs")) == ["run0.npz", "run1.npz"]


def test_bad_repeat_is_one_error_line():
    proc = subprocess.run([sys.executable, SCRIPT, "--repeat", "0"], env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "bench_scaling.py: error: --repeat must be at least 1, got 0"
