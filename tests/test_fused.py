"""Fused trainings (issue 23): each model of a fused training against the same training run alone by
train.train_model (parameters and BatchNorm statistics after N steps, per-sample predictions, accuracy),
with and without KD, for ConvNet (BatchNorm) and ResNet-18, on tiny images; each model's own seed streams;
the group's state files at every kill point."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from ccfs_dist.runtime.dist import OneRankAccelerator, make_accelerator
from ccfs_dist.errors import DataError
from ccfs_dist.data.pool import Norm
from ccfs_dist.training.fused import train_fused
from ccfs_dist.training.models import build_model
from ccfs_dist.training.train import Recipe, train_model

NORM = Norm((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
CONVNET = {"name": "convnet", "width": 8, "depth": 2, "norm": "batchnorm"}
RESNET = {"name": "resnet18"}


@pytest.fixture(scope="module")
def local():
    torch.set_num_threads(1)
    return OneRankAccelerator(make_accelerator())


def tiny_set(seed, n=24, size=8, classes=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
            torch.randint(0, classes, (n,), generator=g))


class Float64(nn.Module):
    """A model computing in float64: ResNet-18's float32 difference, alone vs fused, is float order amplified
    by training (one step: ~3e-7; six steps at lr 0.01: up to 4e-2 in a 1x1-pixel BatchNorm's running
    variance of 8 samples), in float64 it is ~1e-14 (the same training, exactly; the loss stays float32)."""

    def __init__(self, model):
        super().__init__()
        self.m = model.double()

    def forward(self, x):
        return self.m(x.double())


def fresh(cfg, seed, size=8, classes=4):
    torch.manual_seed(seed)
    model = build_model(cfg, classes, 3, size)
    return Float64(model) if cfg is RESNET else model


def alone_and_fused(local, cfg, recipe, seeds, sets, teacher=None, **kw):
    alone = [train_model(local, fresh(cfg, s), *data, recipe, norm=NORM, seed=s, teacher=teacher)
             for s, data in zip(seeds, sets)]
    fused = train_fused(local, [fresh(cfg, s) for s in seeds], sets, recipe, norm=NORM, seeds=seeds,
                        teacher=teacher, **kw)
    return alone, fused


def close(a, b, tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        if sa[key].is_floating_point():
            assert torch.allclose(sa[key], sb[key], rtol=tol, atol=tol), (key, (sa[key] - sb[key]).abs().max())
        else:
            assert torch.equal(sa[key], sb[key]), key        # BatchNorm's num_batches_tracked


def predictions(model, images):
    from ccfs_dist.training.augment import normalize
    with torch.no_grad():
        return model.eval()(normalize(images, *NORM))


@pytest.mark.parametrize("cfg,kd", [(CONVNET, False), (CONVNET, True), (RESNET, False), (RESNET, True)],
                         ids=["convnet-ce", "convnet-kd", "resnet18-ce", "resnet18-kd"])
def test_each_fused_model_trains_as_it_would_alone(local, cfg, kd):
    """Three models (ResNet-18: two) on their sets (one also the set of another), 2 epochs of 3 steps
    (ResNet-18: 1 of 2; the last batch wraps around), the lr schedule with warm-up: each fused model ends with the weights, BatchNorm statistics,
    predictions and accuracy of its training alone, up to float summation order (ResNet-18 in float64:
    Float64)."""
    recipe = Recipe(epochs=1 if cfg is RESNET else 2, batch_size=8, lr=0.05, warmup_epochs=1)
    n = 12 if cfg is RESNET else 20                     # 2 or 3 steps an epoch, the last wrapping around
    sets = [tiny_set(1, n=n), tiny_set(2, n=n), tiny_set(1, n=n)][:2 if cfg is RESNET else 3]
    seeds = [3, 4, 5][:len(sets)]
    teacher = fresh(CONVNET, 99).eval() if kd else None
    alone, fused = alone_and_fused(local, cfg, recipe, seeds, sets, teacher=teacher)
    test_x, test_y = tiny_set(7, n=32)
    tol = 1e-9 if cfg is RESNET else 2e-5
    for (a, sa), (f, sf) in zip(alone, fused):
        close(a, f, tol)
        pa, pf = predictions(a, test_x), predictions(f, test_x)
        assert torch.allclose(pa, pf, rtol=tol, atol=tol)
        assert torch.equal(pa.argmax(1), pf.argmax(1))
        assert (pa.argmax(1) == test_y).float().mean() == (pf.argmax(1) == test_y).float().mean()
        assert sa["lrs"] == sf["lrs"] and sa["steps"] == sf["steps"] == -(-n // 8) * recipe.epochs
    # the models did train, and differently: a test that cannot fail otherwise
    moved = [(f.state_dict()["classifier.weight" if cfg is CONVNET else "m.fc.weight"]) for f, _ in fused]
    assert not torch.allclose(moved[0], moved[1])


def test_fused_models_keep_their_own_seed_streams(local):
    """Two fused models with the same initial weights on the same set but different seeds end apart (their own
    order and augmentation); with the same seed they end equal (the stream depends on the seed alone, not on
    the model's place in the group); and model 1 of a group equals a group of it alone."""
    recipe = Recipe(epochs=1, batch_size=8, lr=0.05)
    data = tiny_set(1, n=16)
    same_init = [fresh(CONVNET, 0) for _ in range(3)]
    out = train_fused(local, same_init, [data] * 3, recipe, norm=NORM, seeds=[10, 11, 10])
    w = [m.state_dict()["classifier.weight"] for m, _ in out]
    assert not torch.allclose(w[0], w[1], atol=1e-4)
    assert torch.allclose(w[0], w[2], atol=1e-6)
    (single, _), = train_fused(local, [fresh(CONVNET, 0)], [data], recipe, norm=NORM, seeds=[11])
    close(single, out[1][0], 2e-5)


def test_hooks_see_each_model_and_its_rows(local):
    """on_epoch_end gets each model's live weights; on_batch each model's own rows and logits."""
    recipe = Recipe(epochs=2, batch_size=8, lr=0.05)
    sets, seeds = [tiny_set(1, n=16), tiny_set(2, n=16)], [3, 4]
    rows = [[], []]
    ends = [[], []]
    alone_rows = []
    train_model(local, fresh(CONVNET, 4), *sets[1], recipe, norm=NORM, seed=4,
                on_batch=lambda idx, logits: alone_rows.append(idx.clone()))
    out = train_fused(local, [fresh(CONVNET, s) for s in seeds], sets, recipe, norm=NORM, seeds=seeds,
                      on_batch=[lambda idx, lg, k=k: rows[k].append((idx.clone(), lg.shape)) for k in range(2)],
                      on_epoch_end=[lambda e, m, k=k: ends[k].append((e, m.state_dict()["classifier.bias"].clone()))
                                    for k in range(2)])
    assert [torch.equal(a, b) for a, (b, _) in zip(alone_rows, rows[1])] == [True] * 4
    assert all(shape == (8, 4) for _, shape in rows[0])
    assert [e for e, _ in ends[0]] == [0, 1]
    assert torch.equal(ends[1][-1][1], out[1][0].state_dict()["classifier.bias"])


def test_a_killed_fused_training_resumes_to_the_same_result(local, tmp_path, monkeypatch):
    """Killed after an epoch's states were saved (between two epochs, and in the middle of the group's write:
    some `.next` files written, or some renamed), the group resumes to the uninterrupted result exactly; the
    per-model states are train_model's format (an unfused training resumes from them to its result)."""
    recipe = Recipe(epochs=3, batch_size=8, lr=0.05, checkpoint_every=1)
    sets, seeds = [tiny_set(1, n=16), tiny_set(2, n=16)], [3, 4]
    paths = [str(tmp_path / f"run{k}_state.pt") for k in range(2)]

    def run(**kw):
        return train_fused(local, [fresh(CONVNET, s) for s in seeds], sets, recipe, norm=NORM,
                           seeds=seeds, checkpoints=paths, **kw)

    whole = [m.state_dict() for m, _ in run()]
    assert not any(os.path.exists(p) for p in paths)

    class Kill(Exception):
        pass

    def kill_after(epoch):
        def hook(e, model):
            if e == epoch:
                raise Kill
        return [hook, None]

    for interrupt in ("between", "written", "renamed"):
        with pytest.raises(Kill):              # "renamed": epoch 1's states saved, else epoch 0's
            run(on_epoch_end=kill_after(2 if interrupt == "renamed" else 1))
        states = [torch.load(p, weights_only=True) for p in paths]
        if interrupt == "written":             # epoch 1's group write cut short: model 0's .next alone
            torch.save(dict(states[0], epoch=1), paths[0] + ".next")
        if interrupt == "renamed":             # cut short after renaming model 0's: model 1's still .next
            os.replace(paths[1], paths[1] + ".next")
            torch.save(epoch0[1], paths[1])
        else:
            assert [s["epoch"] for s in states] == [0, 0]
            epoch0 = states
        out = run()
        assert [len(stats["lrs"]) for _, stats in out] == [1 if interrupt == "renamed" else 2] * 2   # resumed
        resumed = [m.state_dict() for m, _ in out]
        for a, b in zip(whole, resumed):
            assert all(torch.equal(a[key], b[key]) for key in a), interrupt
        assert not any(os.path.exists(p) or os.path.exists(p + ".next") for p in paths)

    with pytest.raises(Kill):
        run(on_epoch_end=kill_after(1))
    alone, _ = train_model(local, fresh(CONVNET, 4), *sets[1], recipe, norm=NORM, seed=4,
                           checkpoint=paths[1])
    close(alone, train_model(local, fresh(CONVNET, 4), *sets[1], recipe, norm=NORM, seed=4)[0], 2e-5)
    os.remove(paths[0])
    torch.save({"epoch": 0}, paths[1])
    with pytest.raises(DataError, match="another grouping"):
        run()


# --------------------------------------------------------------------------- the plan's fused groups

SIZES = {"n_train": 1437, "num_classes": 10, "class_size": 143.7}


def placed(stages):
    return [job for s in stages for jobs in [s.split, *s.local] for job in jobs]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_plan_fuses_evaluation_runs_by_the_config_alone(world):
    """plan.fuse=2: every evaluation run is in exactly one job; the groups (CCFS's among themselves, the
    baselines' across sets, one regime each, at most 2) are the same with any process count; fuse=1 and an
    fp16 run fuse nothing."""
    from ccfs_dist.config import load_config
    from ccfs_dist.runtime.plan import make_plan
    cfg = load_config(None, ["plan.fuse=2", "eval.labels=both"])
    jobs = placed(make_plan(cfg, world, **SIZES))
    groups = sorted(job.name for job in jobs if job.kind == "fused")
    assert groups == sorted(job.name for job in placed(make_plan(cfg, 1, **SIZES)) if job.kind == "fused")
    assert "fused[eval ccfs 0, eval ccfs 1]" in groups and "fused[eval distilled+random 2, eval random 0]" in groups
    assert "fused[eval ccfs 0 hard, eval ccfs 1 hard]" in groups and len(groups) == 8
    runs = [m for job in jobs for m in (job.key if job.kind == "fused" else [job]) if m.kind == "eval"]
    assert sorted(m.name for m in runs) == sorted({m.name for m in runs}) and len(runs) == 18
    for job in jobs:
        if job.kind == "fused":
            members = job.key
            assert 2 == len(members) and len({m.key[2:] for m in members}) == 1
            assert len({m.key[0] == "ccfs" for m in members}) == 1
            assert job.cost == sum(m.cost for m in members)
    for off in (["plan.fuse=1"], ["plan.fuse=2", "train.mixed_precision=fp16"]):
        assert not [j for j in placed(make_plan(load_config(None, off), world, **SIZES)) if j.kind == "fused"]
    scores = ["plan.fuse=2", "ccfs.difficulty=forgetting", "eval.baselines=false", "eval.runs=1"]
    start = make_plan(load_config(None, scores), world, **SIZES)[0]
    assert sorted(j.name for j in placed([start])) == ["fused[score_run 0, score_run 1]", "score_run 2", "teacher"]


def test_a_fused_group_is_done_only_when_all_its_runs_are(tmp_path):
    """Resume: a group with one run's JSON written trains again whole (its floats depend on the group)."""
    from ccfs_dist.runtime.jobs import done
    from ccfs_dist.runtime.plan import Job

    class Run:
        def eval_run(self, name, r, state=False, regime="kd"):
            return str(tmp_path / f"{name}_run{r}.json")

        def done(self, path):
            return os.path.exists(path)

    group = Job("fused", (Job("eval", ("ccfs", 0), 1.0), Job("eval", ("ccfs", 1), 1.0)), 2.0)
    open(tmp_path / "ccfs_run0.json", "w").close()
    assert done(Run(), {}, group.key[0]) and not done(Run(), {}, group)
    open(tmp_path / "ccfs_run1.json", "w").close()
    assert done(Run(), {}, group)


# --------------------------------------------------------------------------- 1 and 2 processes: the same bytes

FUSED_RUN = ["data.source=digits", "teacher.epochs=3", "distill.iterations=10", "ccfs.ipc=6", "ccfs.alpha=0.34",
             "ccfs.phases=2", "train.epochs=6", "train.checkpoint_every=2", "eval.runs=2", "model.width=8",
             "plan.fuse=3", "scores.runs=2", "scores.epochs=2"]


def test_fused_runs_are_byte_identical_with_one_and_two_processes_and_after_a_kill(tmp_path, capsys):
    """plan.fuse=3 on a tiny run (configs/default.yaml: forgetting scores): the 2 score runs fused, CCFS's 2
    evaluation runs fused, the baselines' (distilled+random 0, 1, random 0) fused, random 1 alone; 1 process
    and 2 processes write the same score-run and evaluation bytes, and no state file is left. A 1-process run
    SIGKILLed in the 4th epoch of the fused CCFS evaluations (their states of epoch 2 saved) and resumed with
    2 processes writes the same bytes too."""
    import subprocess
    import sys
    from conftest import ROOT, accelerate_launch, run_here
    script = os.path.join(ROOT, "launch", "ccfs.py")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # the 1-process run in this process, on one thread as a launched rank
    try:
        one = run_here(capsys, ["--out", str(tmp_path / "one"), *FUSED_RUN])
    finally:
        torch.set_num_threads(threads)
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch([script, "--out", str(tmp_path / "two"), *FUSED_RUN], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    plan = [line for line in one.stdout.splitlines() if "plan:" in line]
    assert any("fused[eval ccfs 0, eval ccfs 1]" in line for line in plan), plan
    assert any("fused[eval distilled+random 0, eval distilled+random 1, eval random 0]" in line for line in plan)
    assert any("fused[score_run 0, score_run 1]" in line for line in plan), plan
    for name in ("run0.npz", "run1.npz"):         # the same scores (info[0], the run's seconds, differs)
        one_run, two_run = (np.load(tmp_path / side / "scores_runs" / name) for side in ("one", "two"))
        assert all(np.array_equal(one_run[key], two_run[key]) for key in ("forgetting", "loss", "el2n")), name
        assert one_run["info"][1] == two_run["info"][1]
    names = sorted(p.name for p in (tmp_path / "one" / "eval").iterdir())
    assert names == sorted(f"{s}_run{r}.json" for s in ("ccfs", "distilled_random", "random") for r in (0, 1)), names
    killed = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "kill_worker.py"), "fused",
                             "--out", str(tmp_path / "killed"), *FUSED_RUN], cwd=ROOT, env=dict(
                                 os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT), capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode != 0
    states = sorted(p.name for p in (tmp_path / "killed" / "eval").glob("*_state.pt"))
    assert states == ["ccfs_run0_state.pt", "ccfs_run1_state.pt"], states
    resumed = accelerate_launch([script, "--out", str(tmp_path / "killed"), "--resume", *FUSED_RUN], processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in names + ["../eval_ccfs.json", "../eval_random.json"]:
        for other in ("two", "killed"):
            assert (tmp_path / "one" / "eval" / name).read_bytes() == (tmp_path / other / "eval" / name).read_bytes(), \
                (other, name)
    assert not [p for p in tmp_path.rglob("*_state.pt*")]


def test_fused_score_runs_give_the_dynamics_of_the_runs_alone(local):
    """Two forgetting / loss / EL2N score runs fused (scores.dynamics_runs_fused) against scores.dynamics_run
    of each alone, on the digits pool: the same forgetting counts and learned samples, loss and EL2N to float
    tolerance."""
    from ccfs_dist.config import load_config
    from ccfs_dist.training.scores import dynamics_run, dynamics_runs_fused
    from ccfs_dist.data.sources import load_real
    cfg = load_config(None, ["scores.epochs=3", "scores.batch_size=256", "model.width=8", "model.depth=2"])
    data = load_real(cfg["data"])
    alone = [dynamics_run(local, cfg, data, r) for r in (0, 1)]
    fused = dynamics_runs_fused(local, cfg, data, [0, 1], checkpoints=None)
    for (a, ai), (f, fi) in zip(alone, fused):
        assert np.array_equal(a["forgetting"], f["forgetting"]) and ai["accuracy"] == fi["accuracy"]
        assert np.allclose(a["loss"], f["loss"], rtol=1e-4, atol=1e-5)
        assert np.allclose(a["el2n"], f["el2n"], rtol=1e-4, atol=1e-5)
    assert not np.array_equal(fused[0][0]["loss"], fused[1][0]["loss"])


def test_a_set_held_in_a_shared_file_trains_as_a_resident_one(local, tmp_path):
    """train.synthetic=shared hands a set as a read-only numpy memmap: the same result as the tensor."""
    recipe = Recipe(epochs=1, batch_size=8, lr=0.05)
    images, labels = tiny_set(1, n=16)
    np.save(tmp_path / "set.npy", images.numpy())
    mapped = np.load(tmp_path / "set.npy", mmap_mode="r")
    resident, shared = (train_fused(local, [fresh(CONVNET, s) for s in (3, 4)], [(x, labels)] * 2, recipe, norm=NORM, seeds=[3, 4]) for x in (images, mapped))
    for (a, _), (b, _) in zip(resident, shared):
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_a_damaged_state_file_is_refused_with_one_error(local, tmp_path):
    """A state file that does not load (damaged or foreign) stops the group with the message a training
    alone gives, naming the file, before any model trains."""
    recipe = Recipe(epochs=2, batch_size=8, lr=0.05, checkpoint_every=1)
    paths = [str(tmp_path / f"run{k}_state.pt") for k in range(2)]
    for p in paths:
        with open(p, "wb") as f:
            f.write(b"not a torch file")
    with pytest.raises(DataError, match=f"training state {paths[0]} cannot be resumed"):
        train_fused(local, [fresh(CONVNET, s) for s in (3, 4)], [tiny_set(1, n=16), tiny_set(2, n=16)], recipe,
                    norm=NORM, seeds=[3, 4], checkpoints=paths)
