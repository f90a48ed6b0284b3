"""The ablation runner on a tiny grid: tables in the paper's layout, and resuming cell by cell."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

from ccfs_dist.errors import CCFSError

TINY = ["data.source=digits", "teacher.epochs=3", "distill.iterations=20", "ccfs.ipc=6", "ccfs.alpha=0.34",
        "ccfs.phases=2", "train.epochs=3", "eval.runs=1", "model.width=16", "ccfs.difficulty=logits"]
SCRIPT = os.path.join(ROOT, "launch", "ablate.py")


def ablate(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, SCRIPT] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_tiny_grid_tables_and_resume(tmp_path):
    out = tmp_path / "abl"
    grid = ["--out", str(out), "--combos", "misclassified-simple,correct-random", "--phases", "2", "--scores",
            "logits", "--seeds", "0"] + TINY
    proc = ablate(grid)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cells = sorted(os.listdir(out / "cells"))
    assert cells == ["ipc6-a0.34-correct-random-J2-logits-s0", "ipc6-a0.34-misclassified-simple-J2-logits-s0-baselines"]
    for c in cells:
        assert (out / "cells" / c / "summary.json").exists()
    centre = json.load(open(out / "cells" / cells[1] / "summary.json"))
    assert set(centre["evaluation"]) == {"ccfs", "distilled+random", "random"}      # baselines: centre only
    other = json.load(open(out / "cells" / cells[0] / "summary.json"))
    assert set(other["evaluation"]) == {"ccfs"}
    assert other["teacher"]["source"] == str(out.resolve() / "base" / "teacher.pt")  # one teacher for all

    md = open(out / "ablation.md").read()
    for words in ("## IPC 6", "| coarse \\ fine | simple | hard | random |", "| misclassified |", "| correct |",
                  "| phases | 2 |", "| distilled + random real |", "| random real only |", "| full data (teacher) |",
                  "| vs the centre, same seed |", "| coarse correct, fine random | "):
        assert words in md
    table = json.load(open(out / "ablation.json"))
    assert len(table["cells"]) == 2
    t = table["tables"]["6"]
    assert t["coarse_x_fine"]["misclassified"]["simple"]["n"] == 1
    assert t["coarse_x_fine"]["correct"]["random"]["n"] == 1 and t["coarse_x_fine"]["correct"]["hard"]["n"] == 0
    assert 0 <= t["baselines"]["random"]["mean"] <= 1

    before = {c: os.path.getmtime(out / "cells" / c / "summary.json") for c in cells}
    again = ablate(grid)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("done, skipped") == 2 and "base run" not in again.stdout
    assert before == {c: os.path.getmtime(out / "cells" / c / "summary.json") for c in cells}
    assert json.load(open(out / "ablation.json"))["cells"] == table["cells"]
    assert "evaluation models trained with KD from the teacher" in md and "tables_hard" not in table

    # eval.labels=both: every cell resumes to add its hard-label evaluations; the KD ones are reused as they are
    kd_bytes = {c: (out / "cells" / c / "eval" / "ccfs_run0.json").read_bytes() for c in cells}
    both = ablate(grid + ["eval.labels=both"])
    assert both.returncode == 0, both.stderr[-4000:]
    assert "done, skipped" not in both.stdout and "base run" not in both.stdout
    assert kd_bytes == {c: (out / "cells" / c / "eval" / "ccfs_run0.json").read_bytes() for c in cells}
    md = open(out / "ablation.md").read()
    assert md.count("## IPC 6, evaluation models trained with KD from the teacher") == 1
    assert md.count("## IPC 6, evaluation models trained with hard labels (cross-entropy)") == 1
    assert "| cell | CCFS acc %, KD from the teacher | CCFS acc %, hard labels (cross-entropy) |" in md
    table = json.load(open(out / "ablation.json"))
    centre = json.load(open(out / "cells" / cells[1] / "summary.json"))
    for r in table["cells"]:                     # each cell's figures, per regime, as its summary says
        summary = json.load(open(out / "cells" / r["name"] / "summary.json"))
        assert r["ccfs"] == summary["evaluation"]["ccfs"]["mean"]
        assert r["ccfs_hard"] == summary["evaluation_hard"]["ccfs"]["mean"]
    assert table["tables_hard"]["6"]["baselines"]["random"]["values"] == [centre["evaluation_hard"]["random"]["mean"]]
    assert table["tables"]["6"]["baselines"]["random"]["values"] == [centre["evaluation"]["random"]["mean"]]


def load_ablate():
    spec = importlib.util.spec_from_file_location("ablate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_and_bad_grid(tmp_path, capsys):
    ablate_main = load_ablate().main
    with pytest.raises(SystemExit) as exit_info:
        ablate_main(["--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--combos" in help_text and "resum" in help_text
    with pytest.raises(CCFSError, match="--combos"):          # checked before any work starts
        ablate_main(["--out", str(tmp_path / "x"), "--combos", "wrong-simple", "--scores", "logits"] + TINY)
    assert not (tmp_path / "x").exists()


def test_cells_dealt_to_two_processes_give_the_one_process_tables(tmp_path, launch):
    """Under accelerate launch the cells run whole, one per rank at a time: the same cells and tables."""
    grid = ["--combos", "misclassified-simple,correct-random", "--phases", "2", "--scores", "logits", "--seeds",
            "0"] + TINY
    one, two = tmp_path / "one", tmp_path / "two"
    assert ablate(["--out", str(one)] + grid).returncode == 0
    proc = launch([SCRIPT, "--out", str(two)] + grid, processes=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "running on rank 1" in proc.stdout
    cells = sorted(os.listdir(one / "cells"))
    assert sorted(os.listdir(two / "cells")) == cells
    for c in cells:
        for name in ("selected_indices.json", "eval_ccfs.json"):
            assert (one / "cells" / c / name).read_bytes() == (two / "cells" / c / name).read_bytes(), (c, name)
    assert json.load(open(two / "ablation.json")) == json.load(open(one / "ablation.json"))


def test_a_cells_difficulty_overrides_keep_the_method_with_the_configs_own_file_only():
    """A cell reads a score file as ccfs.difficulty=file; the config's ccfs.difficulty_file_method stays with the
    config's own file, and any other file (computed ones carry a JSON naming their method) is read by its own rule."""
    from ccfs_dist.config import load_config
    overrides = load_ablate().difficulty_overrides
    base = ["ccfs.difficulty=file", "ccfs.difficulty_file=own.npy", "ccfs.difficulty_file_method=margin"]
    cfg = load_config(None, base)
    cells = {r: load_config(None, base + overrides(r, cfg))["ccfs"] for r in ("logits", "own.npy", "/x/other.npy")}
    assert (cells["logits"]["difficulty"], cells["logits"]["difficulty_file"]) == ("logits", None)
    assert (cells["own.npy"]["difficulty_file"], cells["own.npy"]["difficulty_file_method"]) == ("own.npy", "margin")
    assert (cells["/x/other.npy"]["difficulty"], cells["/x/other.npy"]["difficulty_file"],
            cells["/x/other.npy"]["difficulty_file_method"]) == ("file", "/x/other.npy", None)
