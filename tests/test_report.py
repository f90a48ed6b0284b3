"""The run report: report.md with the results table and readable figures, from a finished tiny run."""
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT

TINY = ["data.source=digits", "teacher.epochs=3", "distill.iterations=20", "ccfs.ipc=6", "ccfs.alpha=0.34",
        "ccfs.phases=2", "train.epochs=3", "eval.runs=1", "model.width=16", "ccfs.difficulty=forgetting",
        "scores.runs=1", "scores.epochs=3"]


def run(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished run, made in this process (the entry script itself is tested in test_run.py)."""
    from ccfs_dist import cli
    out = str(tmp_path_factory.mktemp("report") / "run")
    assert cli.main(["run", "--out", out] + TINY) == 0
    return out


def has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_ccfs_report_writes_table_and_figures(tiny_run):
    proc = run(["-m", "ccfs_dist.cli", "report", tiny_run])
    assert proc.returncode == 0, proc.stderr[-4000:]
    path = os.path.join(tiny_run, "report.md")
    assert proc.stdout.strip() == path
    text = open(path).read()
    for words in ("| CCFS (distilled + selected real) |", "| distilled + random real |", "| random real only |",
                  "| full data (teacher) |", "IPC 6", "## Phases", "![Selected real images per phase]"
                  "(selected_per_phase.png)", "![Distilled images](distilled.png)", "official protocol* %",
                  "Selected real images from the fallback tiers: "):
        assert words in text
    assert " ± " in text and "ordered by forgetting score" in text      # the scores the run computed
    # 2 phases x 2 selected images per class of 8x8 digits upscaled to 48 px, 10 class rows
    with Image.open(os.path.join(tiny_run, "selected_per_phase.png")) as im:
        assert im.width >= 2 * 2 * 48 and im.height >= 10 * 48 and im.width < 1000
    with Image.open(os.path.join(tiny_run, "distilled.png")) as im:    # 2 distilled images per class
        assert im.width >= 2 * 48 and im.height >= 10 * 48
    if has_matplotlib():
        assert "![Per-phase filter and selection](phases.png)" in text
        with Image.open(os.path.join(tiny_run, "phases.png")) as im:
            assert im.width >= 600 and im.height >= 200
    else:
        assert "plots skipped" in text


def test_report_without_matplotlib_and_unfinished_run(tiny_run, tmp_path, monkeypatch):
    from ccfs_dist.report import write_report
    half = tmp_path / "half"
    shutil.copytree(tiny_run, half)
    for name in ("summary.json", "phases.png", "report.md"):
        if os.path.exists(half / name):
            os.remove(half / name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)           # import matplotlib -> ImportError
    text = open(write_report(str(half))).read()
    assert "has not finished" in text and "plots skipped" in text and "## Phases" in text
    assert not (half / "phases.png").exists() and (half / "selected_per_phase.png").exists()


def test_report_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    from ccfs_dist.cli import main
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_column_names_wider_than_their_images_are_not_cut(tmp_path):
    import torch
    from PIL import ImageDraw
    from ccfs_dist import report
    name = "distilled (2 per class, first 2 shown)"
    path = str(tmp_path / "grid.png")
    report._labelled([torch.zeros(3, 20, 10), torch.zeros(3, 20, 10)], ["0", "1"], [name, "x"], path)
    with Image.open(path) as im:
        text = ImageDraw.Draw(im).textlength(name)
        assert im.width >= 8 + 7 + text + 12 + 10     # left margin, the long name, the gap, the second column
