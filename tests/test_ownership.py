"""Nothing the user owns is written: every output of a command (the run directory, `ccfs scores --out` and
its sidecar, `ccfs shards --out`, a report) is refused where it is, contains or lies inside one of the
command's inputs, symlinks resolved; --overwrite replaces only a ccfs run (its marker file) or a score file
`ccfs scores` wrote; a --resume writes nothing before its checks pass; `ccfs report` opens no data.

Each case: exit 2, one `error:` line, and every file and link it was given byte for byte as before. The
refusals come before any training, so each case takes well under a second (in-process `cli.main`)."""
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from ccfs_dist.cli import DEFAULT_CONFIG, main
from ccfs_dist.config import dump_config, load_config
from ccfs_dist.runtime.rundir import MARKER

from test_bad_input import TINY, digit_shards, distilled_folder  # noqa: F401  (fixtures)


def tree(*roots):
    """Every entry below `roots` (links not followed): file content hashes, link targets, folders."""
    out = {}
    for root in map(str, roots):
        if os.path.islink(root) or os.path.isfile(root):
            out[root] = os.readlink(root) if os.path.islink(root) else hashlib.sha256(open(root, "rb").read()).hexdigest()
            continue
        for folder, dirs, files in os.walk(root):
            out[folder] = "dir"
            for name in dirs + files:
                p = os.path.join(folder, name)
                if os.path.islink(p):
                    out[p] = "-> " + os.readlink(p)
                elif os.path.isfile(p):
                    out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def refused(argv, capsys, words, *given):
    before = tree(*given)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert tree(*given) == before
    return err


def image_folder(root, classes=("a", "b"), n=2, size=8):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


IMAGES = ["data.source=imagefolder", "model.width=8", "ccfs.ipc=1", "ccfs.alpha=0", "ccfs.phases=1"]


@pytest.fixture
def data(tmp_path):
    return image_folder(tmp_path / "data")


# ----------------------------------------------------------------------------------------- ccfs run

@pytest.mark.parametrize("where, words", [
    (lambda d: d, "is data.root"),                                    # --out = the data set
    (lambda d: d.parent, "contains data.root"),                       # a parent of it
    (lambda d: d / "train" / "c", "lies inside data.root"),           # a new class of it
    (lambda d: d / "val", "lies inside data.root"),                   # one of its splits
])
def test_run_out_overlapping_the_data_is_refused_also_with_overwrite(data, tmp_path, capsys, where, words):
    out = where(data)
    for flags in ([], ["--overwrite"], ["--resume"]):
        refused(["run", "--out", str(out)] + flags + IMAGES + [f"data.root={data}"], capsys, words, tmp_path)
    assert not (data / "train" / "c").exists()


def test_run_out_through_a_symlink_or_onto_a_symlinked_class(data, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(data)
    refused(["run", "--out", str(link), "--overwrite"] + IMAGES + [f"data.root={data}"], capsys,
            "is data.root", tmp_path)
    elsewhere = tmp_path / "elsewhere"                 # a class folder that lives elsewhere, linked in
    os.rename(data / "train" / "b", elsewhere)
    (data / "train" / "b").symlink_to(elsewhere)
    refused(["run", "--out", str(elsewhere), "--overwrite"] + IMAGES + [f"data.root={data}"], capsys,
            "is data.root", tmp_path)


def test_run_out_onto_distilled_shards_or_checkpoint_is_refused(tmp_path, digit_shards, capsys):  # noqa: F811
    distilled = distilled_folder(tmp_path)
    refused(["run", "--out", distilled, "--overwrite"] + TINY + [f"data.distilled={distilled}"], capsys,
            "is data.distilled", tmp_path)
    shards = ["data.source=webdataset", f"data.root={digit_shards}/train.json",
              f"data.test_root={digit_shards}/test.json"]
    refused(["run", "--out", str(digit_shards), "--overwrite"] + TINY + shards, capsys, "contains data.root",
            digit_shards)
    teacher = tmp_path / "models" / "teacher.pt"
    teacher.parent.mkdir()
    teacher.write_bytes(b"weights")
    refused(["run", "--out", str(teacher.parent), "--overwrite"] + TINY + [f"teacher.checkpoint={teacher}"],
            capsys, "contains teacher.checkpoint", tmp_path)


def test_a_folder_that_holds_no_run_is_never_replaced_resumed_or_cleaned(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ".notes.txt.tmp").write_text("the leftover pattern of a run, but mine")
    (mine / "thesis.tex").write_text("mine")
    for flags in ([], ["--overwrite"], ["--resume"]):
        refused(["run", "--out", str(mine)] + flags + TINY, capsys, "holds no ccfs run", tmp_path)
    assert not [n for n in os.listdir(tmp_path) if ".ccfs-" in n]        # no lock file left beside it


def test_a_lock_file_that_is_a_symlink_is_never_followed(tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's file, where a run's lock file would be")
    (tmp_path / ".run.ccfs-lock").symlink_to(precious)
    refused(["run", "--out", str(tmp_path / "run")] + TINY, capsys, "cannot create the lock file", tmp_path)


def fake_run(folder, overrides):
    """A run directory as `ccfs run` leaves it (marker, config) with a partial phase: enough for --resume."""
    folder.mkdir()
    (folder / MARKER).write_text("run\n")
    (folder / "config.yaml").write_text(dump_config(load_config(DEFAULT_CONFIG, overrides)))
    (folder / "phase_1").mkdir()
    (folder / "phase_1" / "steps.json").write_text("{}")
    return folder


def test_resume_writes_nothing_before_its_checks(tmp_path, capsys):
    run = fake_run(tmp_path / "run", TINY)
    refused(["run", "--out", str(run), "--resume"] + TINY + ["seed=1"], capsys, "seed: 0 -> 1", tmp_path)
    os.remove(run / "config.yaml")                  # nothing to compare with: refused, not silently re-made
    refused(["run", "--out", str(run), "--resume"] + TINY + ["seed=1"], capsys, "has no config.yaml", tmp_path)
    assert not (run / "config.yaml").exists()


def test_resume_with_a_config_nested_too_deep(tmp_path, capsys):
    run = fake_run(tmp_path / "run", TINY)
    (run / "config.yaml").write_text("a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    refused(["run", "--out", str(run), "--resume"] + TINY, capsys, "nests more than 64 levels", tmp_path)


def test_overwrite_through_a_symlink_replaces_the_run_not_the_link(tmp_path):
    """The run directory's whole life (check, open into the staged sibling, commit) through a symlink to a
    run, on one process: the run is replaced, the link stays a link (never `rmtree` on it)."""
    from types import SimpleNamespace

    from ccfs_dist.runtime import io
    from ccfs_dist.runtime.rundir import Run
    real = fake_run(tmp_path / "real", TINY)
    link = tmp_path / "link"
    link.symlink_to(real)
    acc = SimpleNamespace(num_processes=1, is_main_process=True, wait_for_everyone=lambda: None)
    cfg = load_config(DEFAULT_CONFIG, TINY + ["seed=3"])
    run = Run(acc, link, resume=False)
    run.check(cfg, overwrite=True)
    run.open(cfg, overwrite=True)
    assert run.dir == str(tmp_path / ".real.ccfs-new")          # staged beside the run, not beside the link
    io.write_json(run.summary(), {})
    run.commit()
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert "seed: 3" in (real / "config.yaml").read_text() and (real / MARKER).is_file()
    assert not (real / "phase_1").exists() and sorted(os.listdir(tmp_path)) == ["link", "real"]


# -------------------------------------------------------------------------------------- ccfs scores

def test_scores_out_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    results = tmp_path / "results.npy"
    sidecar = tmp_path / "results.json"
    sidecar.write_text('{"my": "own results"}\n')
    args = ["scores", "--method", "margin", "--out", str(results), "model.width=8"]
    refused(args, capsys, "already exist", tmp_path)
    refused(args + ["--overwrite"], capsys, "not written by `ccfs scores`", tmp_path)
    os.remove(sidecar)
    np.save(results, np.zeros(3))                    # an .npy without the sidecar `ccfs scores` writes
    refused(args + ["--overwrite"], capsys, "not written by `ccfs scores`", tmp_path)


def test_scores_out_inside_the_data_or_onto_the_checkpoint(data, tmp_path, capsys):
    refused(["scores", "--method", "margin", "--out", str(data / "train" / "s.npy")] + IMAGES
            + [f"data.root={data}"], capsys, "lies inside data.root", tmp_path)
    ckpt = tmp_path / "m.npy"
    ckpt.write_bytes(b"weights")
    refused(["scores", "--method", "margin", "--out", str(ckpt), "--overwrite", f"scores.checkpoint={ckpt}"],
            capsys, "is scores.checkpoint", tmp_path)


# -------------------------------------------------------------------------------------- ccfs shards

def test_shards_out_inside_the_data_or_over_foreign_files(data, tmp_path, capsys):
    refused(["shards", "--out", str(data / "shards")] + IMAGES + [f"data.root={data}"], capsys,
            "lies inside data.root", tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.json").write_text('{"mine": 1}')
    refused(["shards", "--out", str(other), "--overwrite", "--split", "train"], capsys,
            "is not a ccfs shard index", tmp_path)
    os.remove(other / "train.json")
    (other / "train-000000.tar").write_bytes(b"mine")
    refused(["shards", "--out", str(other), "--overwrite", "--split", "train"], capsys,
            "no train.json written by `ccfs shards`", tmp_path)
    # a progress manifest makes the shards beside it ccfs's only if it is one (format ccfs-shards-progress/1)
    (other / "train.progress.json").write_text('{"mine": 1}')
    refused(["shards", "--out", str(other), "--overwrite", "--split", "train"], capsys,
            "is not a ccfs shard progress manifest", tmp_path)
    assert (other / "train-000000.tar").read_bytes() == b"mine"


# -------------------------------------------------------------------------------------- ccfs report

def test_report_opens_no_data_and_writes_only_into_a_run(finished, tmp_path, capsys):  # noqa: F811
    import shutil
    pwned = tmp_path / "pwned"
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    import yaml
    cfg = yaml.safe_load((run / "config.yaml").read_text())     # a config found on disk that runs a command
    cfg["data"].update(source="webdataset", allow_urls=True, root=f"pipe:touch {pwned}",
                       test_root=f"pipe:touch {pwned}")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    assert not pwned.exists()
    assert "reads the run's own artifacts only" in (run / "report.md").read_text()
    os.remove(run / MARKER)                                                         # not a run: not written
    refused(["report", str(run)], capsys, "is not a run directory", run)
    (run / MARKER).write_text("run\n")
    (run / "summary.json").write_text('{"phases": [')                                # truncated
    refused(["report", str(run)], capsys, "summary.json is not valid JSON", run)
    (run / "summary.json").write_text('{"phases": [{}]}')                            # keys missing
    refused(["report", str(run)], capsys, "summary.json has no 'distilled_per_class' entry", run)


# ------------------------------------------------------------------ streamed resume, other process count

def test_streamed_resume_with_another_process_count(tmp_path, digit_shards, capsys):  # noqa: F811
    import json
    from types import SimpleNamespace

    from ccfs_dist.runtime.rundir import Run
    stream = TINY + ["data.source=webdataset", f"data.root={digit_shards}/train.json",
                     f"data.test_root={digit_shards}/test.json"]
    run = fake_run(tmp_path / "run", stream)
    (run / MARKER).write_text(json.dumps({"ccfs_run": "...", "processes": 2, "streamed": True}))
    refused(["run", "--out", str(run), "--resume"] + stream, capsys, "was started with 2 process(es), this "
            "resume has 1", tmp_path)
    # allowed by the one key a resume may change: a warning, and the check passes (the run would go on)
    acc = SimpleNamespace(num_processes=1, is_main_process=True, wait_for_everyone=lambda: None)
    cfg = load_config(DEFAULT_CONFIG, stream + ["stream.resume_other_processes=true"])
    Run(acc, run, resume=True)._check(cfg, overwrite=False)
    assert "warning: resuming a streamed run started with 2 process(es) on 1" in capsys.readouterr().out
    # an in-memory pool resumes on any count
    digits = fake_run(tmp_path / "digits", TINY)
    (digits / MARKER).write_text(json.dumps({"processes": 2}))
    Run(acc, digits, resume=True)._check(load_config(DEFAULT_CONFIG, TINY), overwrite=False)
