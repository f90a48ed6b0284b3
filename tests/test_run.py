"""Whole small CCFS runs through the real entry script (in this process where the script is not what is tested),
and the CLI's user-facing errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, run_here

TINY = ["data.source=digits", "teacher.epochs=3", "distill.iterations=20", "ccfs.ipc=6", "ccfs.alpha=0.34",
        "ccfs.phases=2", "train.epochs=3", "eval.runs=1", "model.width=16", "scores.runs=2", "scores.epochs=4"]
SCRIPT = os.path.join(ROOT, "launch", "ccfs.py")


def run_script(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, SCRIPT] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def check_artifacts(out, processes, teacher_trained=True):
    sel = json.load(open(os.path.join(out, "selected_indices.json")))
    assert set(sel) == {"ipc", "alpha", "idx_selected"} and sel["ipc"] == 6 and sel["alpha"] == 0.34
    idx = np.array(sel["idx_selected"])
    assert len(idx) == 10 * 4 and len(np.unique(idx)) == len(idx) and np.array_equal(idx, np.sort(idx))
    phase_sets = []
    for j in (1, 2):
        d = os.path.join(out, f"phase_{j}")
        state = torch.load(os.path.join(d, "filter.pt"), weights_only=True)
        assert any(k.endswith("weight") for k in state)
        preds = np.load(os.path.join(d, "predictions.npz"), allow_pickle=False)
        assert set(preds.files) == {"index", "label", "pred", "true_logit", "margin", "loss"}
        assert len(preds["index"]) == 1437 - 20 * (j - 1)
        chosen = np.load(os.path.join(d, "selected.npy"), allow_pickle=False)
        assert chosen.dtype == np.int64 and len(chosen) == 20
        assert not np.isin(chosen, np.concatenate(phase_sets or [np.empty(0, int)])).any()
        assert np.isin(chosen, preds["index"]).all()
        phase_sets.append(chosen)
        metrics = json.load(open(os.path.join(d, "metrics.json")))
        assert metrics["selected_per_class"] == [2] * 10
        for key in ("pool_size", "filter_test_acc", "pool_misclassification_rate", "train", "score"):
            assert key in metrics
        assert metrics["train"]["images_per_s"] > 0 and metrics["score"]["images_per_s"] > 0
    assert np.array_equal(np.sort(np.concatenate(phase_sets)), idx)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["processes"] == processes and summary["budgets"] == [2, 2]
    assert set(summary["evaluation"]) == {"ccfs", "distilled+random", "random"}
    assert len(os.listdir(os.path.join(out, "distilled"))) == 10
    assert os.path.exists(os.path.join(out, "config.yaml"))
    assert os.path.exists(os.path.join(out, "teacher.pt")) == teacher_trained      # a given teacher is not copied
    tp = np.load(os.path.join(out, "teacher_predictions.npz"), allow_pickle=False)
    assert set(tp.files) == {"index", "label", "pred"} and np.array_equal(tp["index"], np.arange(1437))
    assert 0.5 < (tp["pred"] == tp["label"]).mean() <= 1.0
    run = json.load(open(os.path.join(out, "eval", "ccfs_run0.json")))
    assert run["recipe"]["epochs"] == 3 and run["recipe"]["batch_size"] == 32   # 6 of ~144 per class: < 10 %
    assert {"lr", "weight_decay", "warmup_epochs", "schedule_step"} <= set(run["recipe"])
    assert 0.0 <= run["final"] <= run["official"] <= 1.0


def test_small_run_two_processes(tmp_path, launch):
    out = str(tmp_path / "run2")
    proc = launch([SCRIPT, "--out", out] + TINY, processes=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "CCFS (distilled + selected real)" in proc.stdout and "random real only" in proc.stdout
    assert "official protocol*" in proc.stdout and "selected real images from the fallback tiers: " in proc.stdout
    check_artifacts(out, processes=2)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """A finished 1-process run through the entry script, shared by the tests that only read it (or copy it)."""
    out = str(tmp_path_factory.mktemp("one") / "run1")
    proc = run_script(["--out", out] + TINY)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_small_run_one_process_and_run_dir_protection(one_process_run):
    out = one_process_run
    check_artifacts(out, processes=1)
    before = open(os.path.join(out, "summary.json")).read()
    again = run_script(["--out", out] + TINY)
    assert again.returncode == 2 and "holds a finished run" in again.stderr and "--overwrite" in again.stderr
    assert open(os.path.join(out, "summary.json")).read() == before


def test_small_run_official_compat(tmp_path, capsys):
    """ccfs.compat=official: the run selects what the official code selects from the run's own artifacts,
    in selection order, and trains with the official per-epoch warm-up + cosine schedule (and a teacher
    trained with the squeeze RandomCrop)."""
    from test_official import check_official_run
    out = str(tmp_path / "official")
    proc = run_here(capsys, ["--out", out] + TINY + ["ccfs.compat=official", "eval.baselines=false",
                                                     "train.warmup_epochs=1", "train.warmup_start=0.01",
                                                     "train.schedule_step=epoch", "teacher.crop=pad", "teacher.padding=1"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    picks = check_official_run(out)
    assert len(picks) == len(set(picks)) and picks != sorted(picks)
    assert "selected real images from the fallback tiers: 0 of" in proc.stdout
    recipe = json.load(open(os.path.join(out, "eval", "ccfs_run0.json")))["recipe"]
    assert recipe["schedule_step"] == "epoch" and recipe["warmup_start"] == 0.01 and recipe["warmup_epochs"] == 1


def test_unfinished_run_dir_suggests_resume(tmp_path, capsys):
    out = tmp_path / "half"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    (out / ".ccfs-run").write_text("{}\n")                 # what a run writes first (rundir.MARKER)
    proc = run_here(capsys, ["--out", str(out)] + TINY)
    assert proc.returncode == 2 and "--resume" in proc.stderr


@pytest.mark.parametrize("args, words", [
    (["ccfs.ipcc=3"], "unknown config key 'ccfs.ipcc'"),
    (["ccfs.ipc=500"], "ccfs.ipc=500 exceeds the real images of class"),
    (["ccfs.phases=9"], "ccfs.phases"),
    (["ccfs.difficulty=file", "ccfs.difficulty_file=/no/such/scores.npy"], "/no/such/scores.npy"),
    (["score.batch_size=64"], "error: config key 'score.batch_size' was renamed to 'predict.batch_size'\n"),
    (["--config", "/no/such.yaml"], "config file '/no/such.yaml' does not exist"),
])
def test_user_errors_exit_2_with_message(tmp_path, args, words, capsys):
    argv = (["--out", str(tmp_path / "x")] + TINY + args if "--config" not in args
            else args + ["--out", str(tmp_path / "x")])
    # an error found once the data are loaded: in this process (no start-up of torch to pay); the others,
    # found before torch is imported, through the entry script
    late = any(a.startswith(("ccfs.ipc=", "ccfs.phases=", "ccfs.difficulty_file=")) for a in args)
    proc = run_here(capsys, argv) if late else run_script(argv, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert words in proc.stderr and "Traceback" not in proc.stderr


def test_help_explains():
    proc = run_script(["--help"], timeout=60)
    assert proc.returncode == 0 and "--resume" in proc.stdout and "key.sub=value" in proc.stdout


def test_resume_after_phase_one_gives_the_same_selection(one_process_run, tmp_path, capsys):
    """Simulate a run killed after phase 1 (a copy of the finished run): drop everything later, resume,
    compare the final selection."""
    import shutil
    out = tmp_path / "r"
    shutil.copytree(one_process_run, out, copy_function=shutil.copy2)
    full = json.load(open(out / "selected_indices.json"))
    teacher_mtime = os.path.getmtime(out / "teacher.pt")
    shutil.rmtree(out / "phase_2")
    shutil.rmtree(out / "eval")
    for name in ("selected_indices.json", "summary.json", "report.md") + tuple(
            p for p in os.listdir(out) if p.startswith("eval_")):
        if os.path.exists(out / name):
            os.remove(out / name)
    proc = run_here(capsys, ["--out", str(out), "--resume"] + TINY)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "phase 1: resumed" in proc.stdout and "phase 2: filter test acc" in proc.stdout
    assert os.path.getmtime(out / "teacher.pt") == teacher_mtime
    assert json.load(open(out / "selected_indices.json")) == full


def test_failing_rank_stops_both_processes_and_is_named(tmp_path, launch):
    """Rank 1 raises while scoring: both processes end non-zero well within the collective timeout."""
    import time
    worker = os.path.join(ROOT, "tests", "workers", "fault_worker.py")
    start = time.monotonic()
    proc = launch([worker, "--out", str(tmp_path / "f"), "--timeout", "120"] + TINY, processes=2, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "[rank 1] failed: RuntimeError: injected fault while scoring" in proc.stderr
    assert elapsed < 120, elapsed
