"""Evaluation regimes (eval.labels): KD from the teacher (the paper's protocol, today's artifact names) and
hard labels (cross-entropy on the true labels, without the teacher; names and keys with "hard")."""
import copy
import hashlib
import json
import os

import pytest
import torch

from ccfs_dist.config import load_config
from conftest import run_here

# the tiny whole run of test_run.py, with enough evaluation epochs that a model learns from its labels
TINY = ["data.source=digits", "teacher.epochs=3", "distill.iterations=20", "ccfs.ipc=6", "ccfs.alpha=0.34",
        "ccfs.phases=2", "train.epochs=8", "eval.runs=1", "model.width=16", "ccfs.difficulty=logits",
        "aug.scale_min=0.5", "aug.flip=false"]


def wrong(teacher):
    """The teacher with its classifier's rows rolled by one class: every prediction is the wrong class."""
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.classifier.weight.copy_(teacher.classifier.weight.roll(1, 0))
        other.classifier.bias.copy_(teacher.classifier.bias.roll(1, 0))
    return other


def test_hard_regime_trains_without_the_teacher():
    """For a fixed set and seed, the hard regime gives the same model whatever the teacher predicts (the
    right teacher, or one whose every prediction is wrong); the KD regime follows the teacher."""
    from ccfs_dist.runtime.dist import OneRankAccelerator, make_accelerator
    from ccfs_dist.training.evaluate import evaluate_in_regime
    from ccfs_dist.training.models import build_model
    from ccfs_dist.training.predict import accuracy
    from ccfs_dist.ccfs.selection import random_per_class
    from ccfs_dist.data.sources import load_real
    from ccfs_dist.training.train import Recipe, train_model
    cfg = load_config(None, TINY)
    data = load_real(cfg["data"])
    acc = OneRankAccelerator(make_accelerator())
    torch.manual_seed(0)
    teacher = build_model(cfg["model"], data.num_classes, data.channels, data.image_size)
    teacher, _ = train_model(acc, teacher, data.train.images, data.train.labels, Recipe(epochs=5, batch_size=64, lr=0.1, scale_min=0.5, flip=False),
                             norm=data.norm, seed=1)
    bad = wrong(teacher)
    assert accuracy(acc, teacher, data.test, norm=data.norm) > 0.8
    assert accuracy(acc, bad, data.test, norm=data.norm) < 0.1
    rows = random_per_class(data.train.labels.numpy(), 6, 5)
    images, labels = data.train.images[rows], data.train.labels[rows]
    kw = dict(data=data, model_cfg=cfg["model"], recipe=Recipe(epochs=10, batch_size=20, lr=0.05, scale_min=0.5, flip=False), seed=7, desc="eval")
    got = {(regime, name): evaluate_in_regime(acc, images, labels, regime=regime, teacher=t, **kw)
           for regime in ("kd", "hard") for name, t in (("right", teacher), ("wrong", bad))}
    assert got["hard", "right"] == got["hard", "wrong"] and got["hard", "right"]["regime"] == "hard"
    assert got["hard", "right"]["final"] > 0.4                         # it learned from the true labels
    assert got["kd", "right"]["final"] > 0.3 and got["kd", "wrong"]["final"] < 0.1   # KD learns what the teacher says
    # the hard regime is cross-entropy on the labels: wrong labels give a different model
    assert evaluate_in_regime(acc, images, (labels + 1) % 10, regime="hard", teacher=teacher, **kw) != got["hard", "right"]


def digests(folder):
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_adds_the_hard_regime_and_a_wrong_teacher_leaves_it_unchanged(tmp_path, capsys):
    """A KD run resumed with eval.labels=both trains only the hard-label evaluations: every earlier artifact
    stays byte for byte (no KD evaluation retrained), both regimes are in summary.json, the printed table and
    report.md. Then a run given a teacher whose every prediction is wrong: the random baseline (a set that
    does not depend on the teacher) scores the same under hard labels, byte for byte, and not under KD."""
    a = tmp_path / "a"
    proc = run_here(capsys, ["--out", str(a)] + TINY)
    assert proc.returncode == 0, proc.stderr[-4000:]
    before = digests(a)
    kd = sorted(p for p in before if p.startswith("eval"))
    assert kd == ["eval/ccfs_run0.json", "eval/distilled_random_run0.json", "eval/random_run0.json",
                  "eval_ccfs.json", "eval_distilled_random.json", "eval_random.json"]
    first = json.load(open(a / "summary.json"))
    assert "evaluation_hard" not in first and set(first["ccfs_lead"]) == {"distilled+random", "random"}
    assert json.load(open(a / "eval" / "ccfs_run0.json"))["regime"] == "kd"
    mtimes = {p: os.path.getmtime(a / p) for p in kd}

    proc = run_here(capsys, ["--out", str(a), "--resume"] + TINY + ["eval.labels=both"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    for job in ("eval ccfs 0", "eval distilled+random 0", "eval random 0", "filter 1", "filter 2", "teacher"):
        assert f"{job}: resumed" in proc.stdout, job
    assert "eval ccfs 0 hard: resumed" not in proc.stdout
    after = digests(a)
    rewritten = {"config.yaml", "summary.json", "report.md", "phases.png"}   # phases.png: matplotlib's own bytes
    assert {p: h for p, h in before.items() if p not in rewritten} == \
        {p: after[p] for p in before if p not in rewritten}
    assert mtimes == {p: os.path.getmtime(a / p) for p in kd}
    hard = sorted(p for p in set(after) - set(before))
    assert hard == ["eval/ccfs_hard_run0.json", "eval/distilled_random_hard_run0.json", "eval/random_hard_run0.json",
                    "eval_ccfs_hard.json", "eval_distilled_random_hard.json", "eval_random_hard.json"]
    summary = json.load(open(a / "summary.json"))
    assert summary["evaluation"] == first["evaluation"] and summary["ccfs_lead"] == first["ccfs_lead"]
    ev = summary["evaluation_hard"]
    assert set(ev) == {"ccfs", "distilled+random", "random"} and all(r["regime"] == "hard" for r in ev.values())
    assert ev["random"]["final"] == [json.load(open(a / "eval" / "random_hard_run0.json"))["final"]]
    lead = summary["ccfs_lead_hard"]["random"]
    assert lead["mean"] == pytest.approx(100 * (ev["ccfs"]["mean"] - ev["random"]["mean"]))
    assert "evaluation models trained with hard labels (cross-entropy) (summary.json: evaluation_hard)" in proc.stdout
    assert "evaluation models trained with KD from the teacher (summary.json: evaluation)" in proc.stdout
    report = open(a / "report.md").read()
    for words in ("**Evaluation models trained with KD from the teacher** (summary.json: `evaluation`)",
                  "**Evaluation models trained with hard labels (cross-entropy)** (summary.json: `evaluation_hard`)",
                  "**The regimes side by side**",
                  f"| random real only | {100 * summary['evaluation']['random']['mean']:.2f} ± 0.00 | "
                  f"{100 * ev['random']['mean']:.2f} ± 0.00 | "):
        assert words in report, words

    # a regime is only ever added: going back to KD alone is refused before anything is touched
    refused = run_here(capsys, ["--out", str(a), "--resume"] + TINY + ["eval.labels=kd"])
    assert refused.returncode == 2 and "eval.labels: 'both' -> 'kd'" in refused.stderr

    from ccfs_dist.training.models import build_model
    from ccfs_dist.runtime.rundir import Layout
    cfg = load_config(None, TINY)
    teacher = Layout.load_model(str(a / "teacher.pt"), lambda: build_model(cfg["model"], 10, 1, 8))
    torch.save(wrong(teacher).state_dict(), tmp_path / "wrong.pt")
    b = tmp_path / "b"
    proc = run_here(capsys, ["--out", str(b)] + TINY + ["eval.labels=both", f"teacher.checkpoint={tmp_path / 'wrong.pt'}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.load(open(b / "summary.json"))["teacher_test_acc"] < 0.1
    assert (b / "eval" / "random_hard_run0.json").read_bytes() == (a / "eval" / "random_hard_run0.json").read_bytes()
    assert (b / "eval" / "random_run0.json").read_bytes() != (a / "eval" / "random_run0.json").read_bytes()


@pytest.mark.parametrize("labels", ["kd", "hard", "both"])
def test_plan_deals_each_regimes_evaluations_once(labels):
    """eval.labels: every set's evaluation runs in each regime, once; CCFS's in the final stage (its set
    exists only then); a hard-label run is costed without the teacher's forward pass."""
    from ccfs_dist.runtime.plan import KD_COST, make_plan
    cfg = load_config(None, ["ccfs.difficulty=logits", f"eval.labels={labels}"])
    for world in (1, 2):
        stages = make_plan(cfg, world, n_train=1437, num_classes=10, class_size=143.7)
        evals = {job.name: (stage.name, job) for stage in stages for jobs in stage.local for job in jobs
                 if job.kind == "eval"}
        wanted = {"kd": [""], "hard": [" hard"], "both": ["", " hard"]}[labels]
        assert sorted(evals) == sorted(f"eval {s} {r}{x}" for x in wanted for s in ("ccfs", "distilled+random", "random")
                                       for r in range(3))
        assert all(stage == "final" for name, (stage, _) in evals.items() if name.startswith("eval ccfs"))
        if labels == "both":
            assert evals["eval random 1"][1].cost == pytest.approx(KD_COST * evals["eval random 1 hard"][1].cost)
            assert evals["eval random 1 hard"][1].key == ("random", 1, "hard")
