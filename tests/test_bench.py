"""The per-phase benchmark (launch/bench.py) on a tiny setting: the report's shape, not speed."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "launch", "bench.py")
_spec = importlib.util.spec_from_file_location("bench", SCRIPT)    # launch/ scripts live outside the package
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
ENV = dict(os.environ, PYTHONPATH=ROOT)                            # the launched scripts import this checkout
TINY = ["--classes", "4", "--pool", "256", "--steps", "8", "--repeats", "1", "--selection-n", "3000",
        "--selection-classes", "10", "--selection-k", "5", "ccfs.ipc=16", "ccfs.alpha=0.25", "train.batch_size=16",
        "predict.batch_size=64", "model.width=8"]
TRAINING = ("filter_train", "eval_train")


def check_report(report, processes, phases=bench.PHASES):
    assert report["processes"] == processes
    assert set(report["phases"]) == set(phases)
    for name, phase in report["phases"].items():
        for key in ("images", "seconds", "images_per_s"):
            assert phase[key] > 0, (name, key)
        assert len(phase["peak_mem_mb"]) == processes and all(m > 0 for m in phase["peak_mem_mb"])
        if name in ("select", "select_1k"):
            assert phase["ceiling_images_per_s"] is None and phase["ratio"] is None
        else:
            assert phase["ceiling_images_per_s"] > 0 and phase["ratio"] > 0 and phase["pairs"] >= 1
    for name in set(TRAINING) & set(phases):
        assert report["phases"][name]["kd"] is True and report["phases"][name]["batch_size"] == 16
    if "select_1k" in phases:
        assert report["phases"]["select_1k"]["images"] == 3000
        assert report["phases"]["select"]["images"] == 256      # the whole pool of the first phase


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "one.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, SCRIPT, *TINY, "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_one_process_report_and_table(one_process):
    out, stdout = one_process
    report = json.load(open(out))
    check_report(report, 1)
    assert report["compile"] is False and report["data"] == "generated"
    for label in ("filter training", "scoring", "selection", "eval training"):
        assert label in stdout
    assert "ceiling" in stdout and "ratio" in stdout


def test_two_processes_with_baseline_and_compile(one_process, launch, tmp_path):
    """2 CPU processes through accelerate launch, DDP + torch.compile (quick 'eager' backend), speedup
    against the 1-process report (two phases, to keep the test short)."""
    baseline, _ = one_process
    out = tmp_path / "two.json"
    proc = launch([SCRIPT, *TINY, "--phases", "filter_train,score", "train.compile=true", "--compile-backend", "eager",
                   "--baseline", str(baseline), "--json", str(out)], processes=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(out))
    check_report(report, 2, phases=("filter_train", "score"))
    assert report["compile"] == "eager"
    for phase in report["phases"].values():
        assert phase["speedup"] > 0 and phase["efficiency"] > 0 and phase["baseline_processes"] == 1
    assert report["phases"]["filter_train"]["rank_batch"] == 8
    assert "speedup" in proc.stdout


def test_table_scaling_and_cut():
    phase = {"images": 10, "seconds": 1.0, "images_per_s": 10.0, "ceiling_images_per_s": 20.0, "ratio": 0.5,
             "peak_mem_mb": [100.0, 101.0]}
    report = {"data": "generated", "image_shape": [1, 8, 8], "model": {"name": "convnet"}, "processes": 2,
              "device": "cpu", "threads_per_process": 1, "mixed_precision": "no", "channels_last": False,
              "compile": False, "kd": True, "phases": {"filter_train": dict(phase), "select": dict(phase)}}
    base = {"processes": 1, "phases": {"filter_train": dict(phase, images_per_s=8.0)}}
    bench.add_scaling(report, base)
    assert report["phases"]["filter_train"]["speedup"] == pytest.approx(1.25)
    assert report["phases"]["filter_train"]["efficiency"] == pytest.approx(0.625)
    assert "speedup" not in report["phases"]["select"]
    table = bench.format_table(report)
    assert "1.25x" in table and "100/101" in table
    import torch
    x, y = torch.zeros(1000, 1, 2, 2), torch.zeros(1000)
    cut_x, _, epochs = bench._cut(x, y, 10, 100)               # 100 steps in at least 4 epochs
    assert len(cut_x) == 250 and epochs == 4
    cut_x, _, epochs = bench._cut(x[:40], y[:40], 32, 100)     # small sets are kept, more epochs
    assert len(cut_x) == 40 and epochs == 50


def test_cli_and_bad_arguments(tmp_path):
    from ccfs_dist.cli import build_parser
    args = build_parser().parse_args(["bench", "--steps", "5", "model.width=8"])
    assert args.args == ["--steps", "5", "model.width=8"]
    assert bench.main(["--phases", "nonsense"]) == 2
    assert bench.main(["--steps", "0"]) == 2
    child = bench._child_argv(bench.add_args(__import__("argparse").ArgumentParser()).parse_args(
        ["--scaling", "2", "--json", "x.json", "--steps", "7", "model.width=8"]))
    assert "--scaling" not in child and "--json" not in child and child[-1] == "model.width=8"
    assert child[child.index("--steps") + 1] == "7"


def test_selection_benchmark_matches_the_python_versions(tmp_path):
    """launch/bench_selection.py on a small pool: every combination, the official-style, numpy and full-pool
    Python versions select the same indices (k 200 is above the ~120 candidates per class, so the
    fallback tiers are exercised), and the JSON has every row."""
    out = tmp_path / "sel.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench_selection.py"), "--n", "5000",
                           "--classes", "10", "--k", "200", "--repeats", "1", "--json", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.load(open(out))["rows"]
    assert len(rows) == 12 and all(r["match"] for r in rows)
    assert all(r["selected"] == 2000 for r in rows)
    for name in ("official", "numpy", "full"):
        assert all(r[f"{name}_s"] > 0 and r[f"{name}_speedup"] > 0 for r in rows)
    assert "outputs identical: True" in proc.stdout


def test_shard_benchmark_report(tmp_path):
    """launch/bench_shards.py on 3,000 generated 8 px images in 6 shards: generation, both pools scored in a
    child process with a loader worker, the paired ratio and the RSS figures in result.json."""
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench_shards.py"), "--cpu",
                           "--out", str(out), "--samples", "3000", "--small", "1000", "--per-shard", "500",
                           "--classes", "10", "--image-size", "8", "--gen-workers", "1", "--batch-size", "100",
                           "--forward-images", "1000", "--loader-images", "1000", "--pairs", "4", "--width", "8"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.load(open(out / "result.json"))
    assert (result["small"]["samples"], result["small"]["shards"]) == (1000, 2)
    assert (result["full"]["samples"], result["full"]["shards"]) == (3000, 6)
    for r in (result["small"], result["full"]):
        assert r["pairs"] >= 1 and r["paired_ratio"] > 0 and r["stream_ips"] > 0 and r["forward_ips"] > 0
        assert r["rss_rank_mb"][0] > 0 and r["workers"] == 1
    assert result["rss_ratio"] > 0 and result["throughput_ratio"] == result["full"]["paired_ratio"]
    assert "paired windows" in proc.stdout


def test_shard_decode_benchmark_report(tmp_path):
    """launch/bench_shards.py --decode on 20 generated JPEGs read at 32 px: both shard sets (as stored and
    pre-resized), both decode paths, every image counted, the table printed and result.json written."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench_shards.py"), "--decode", "--cpu",
                           "--out", str(out), "--decode-images", "20", "--decode-size", "32", "--decode-per-shard", "10",
                           "--gen-workers", "1", "--batch-size", "8"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.load(open(out / "decode" / "result.json"))
    rows = {(r["shards"], r["decode"]): r for r in result["rows"]}
    assert set(rows) == {(s, d) for s in ("full", "resized") for d in ("cpu", "device")}
    assert all(r["images"] == 20 and r["images_per_s"] > 0 for r in rows.values())
    assert rows["resized", "cpu"]["mb_per_image"] < rows["full", "cpu"]["mb_per_image"]
    assert rows["full", "device"]["decoded_on"] == "cpu" and result["device"] == "cpu"
    assert 0 < rows["full", "device"]["mean_abs_diff"] <= 0.25 and rows["full", "device"]["max_abs_diff"] == 1
    assert rows["resized", "device"]["max_abs_diff"] == 0        # nothing left to resize: the decoder's pixels
    assert "decode throughput to 32 px" in proc.stdout
