"""Pins of the answers: what a run selects and how it trains, against independent computations.

The whole-run tests read the session's pinned run (conftest.pinned_run: a tiny digits run in this
process, with the pieces it wires observed) and recompute its selection with tests/selection_check.py;
the unit pins compare the engine's recipe functions with formulas written out here.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import PINNED
from selection_check import recheck_run
from ccfs_dist.runtime import seeds
from ccfs_dist.config import load_config
from ccfs_dist.data.pool import Norm
from ccfs_dist.runtime.plan import make_plan
from ccfs_dist.ccfs.selection import phase_budgets, run_budgets
from ccfs_dist.data.sources import load_real
from ccfs_dist.training.train import Recipe, kd_loss, lr_lambda, train_step

N_DIGITS, CLASSES = 1437, 10


def setting(key):
    return next(float(a.split("=")[1]) for a in PINNED if a.startswith(key + "="))


# --------------------------------------------------------------------------- the pinned run: what it selected

def test_every_phase_selects_what_the_rule_selects(pinned_run):
    """Each phase's selection equals the paper's rule recomputed from the run's own predictions, teacher
    predictions and difficulty (misclassified + teacher-correct, easiest first, ties by index, k_j per class)."""
    out, _ = pinned_run
    phases = recheck_run(out, CLASSES, N_DIGITS)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["difficulty"] == "logits" and summary["budgets"] == [2, 2, 2] and [len(p) for p in phases] == [20, 20, 20]
    labels = load_real({"source": "digits"}).train.labels.numpy()
    for p in phases:
        assert np.bincount(labels[p], minlength=CLASSES).tolist() == [2] * CLASSES


def test_each_filter_trains_on_the_previous_set_with_kd(pinned_run):
    """Filter j trains on S_{j-1} = S_{j-2} + phase j-1's selected real images (S_0 the distilled set), with
    the teacher (KD); the CCFS evaluation models on S_J."""
    out, calls = pinned_run
    data = load_real({"source": "digits"}).train
    filters = [c for c in calls["train"] if c["desc"].startswith("phase ")]
    evals = [c for c in calls["train"] if c["desc"].startswith("eval ccfs")]
    assert [c["desc"] for c in filters] == [f"phase {j} filter" for j in (1, 2, 3)] and len(evals) == 2
    s0 = filters[0]
    assert len(s0["images"]) == 1 * CLASSES and s0["labels"].tolist() == list(range(CLASSES))
    from PIL import Image
    for c in range(CLASSES):                              # S_0 is the distilled set the run saved
        png = np.array(Image.open(os.path.join(out, "distilled", f"new{c:03d}", f"class{c:03d}_id000.png")))
        assert np.array_equal(s0["images"][c, 0].numpy(), png)
    for j, (prev, now) in enumerate(zip(filters, filters[1:] + evals[:1]), 1):
        sel = torch.from_numpy(np.load(os.path.join(out, f"phase_{j}", "selected.npy")))
        assert torch.equal(now["images"], torch.cat([prev["images"], data.images[sel]])), f"S_{j} != S_{j-1} + selected"
        assert torch.equal(now["labels"], torch.cat([prev["labels"], data.labels[sel]]))
    assert torch.equal(evals[0]["images"], evals[1]["images"])
    assert all(c["teacher"] for c in filters + evals)
    assert not [c for c in calls["train"] if c["desc"] == "teacher"][0]["teacher"]


def test_the_run_wires_the_recipe(pinned_run):
    """KD at the configured temperature, the configured augmentation, warm-up + cosine per step, the
    distiller's BN weight, and a distinct seed per evaluation model."""
    out, calls = pinned_run
    assert calls["kd"] and set(calls["kd"]) == {setting("train.temperature")}
    filters_and_evals = [c for c in calls["train"] if c["desc"] != "teacher"]
    for c in filters_and_evals:
        r = c["recipe"]
        assert (r.epochs, r.temperature, r.flip, r.scale_min, r.warmup_epochs) == (3, 4.0, False, 0.5, 1)
        spe = c["steps"] // r.epochs                       # (i + 1) / W ramp over the first epoch's steps, then cosine
        want = []
        for e in range(r.epochs):
            i, total, warm = e * spe, r.epochs * spe, spe
            f = (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / (total - warm)))
            want.append(setting("train.lr") * f)
        np.testing.assert_allclose(c["lrs"], want, rtol=1e-12)
    assert len(calls["augment"]) == len(calls["train"])      # (difficulty logits: no score runs)
    for kw in calls["augment"]:
        assert kw["flip"] is False and kw["scale_min"] == 0.5
    assert calls["recover"] and all(kw["r_bn"] == setting("distill.r_bn") for kw in calls["recover"])
    eval_seeds = [c["seed"] for c in calls["train"] if c["desc"].startswith("eval")]
    filter_seeds = [c["seed"] for c in calls["train"] if c["desc"].startswith("phase")]
    assert len(set(eval_seeds)) == len(eval_seeds) == 2 and not set(eval_seeds) & set(filter_seeds)
    assert len(set(filter_seeds)) == 3
    ev = json.load(open(os.path.join(out, "eval_ccfs.json")))
    runs = [json.load(open(os.path.join(out, "eval", f"ccfs_run{r}.json"))) for r in range(2)]
    assert ev["final"] == [r["final"] for r in runs] and ev["mean"] == pytest.approx(np.mean(ev["final"]))


def starts_fresh(call, seed):
    """Whether a training call began from the pinned run's model freshly built under torch.manual_seed(seed)."""
    from ccfs_dist.training.models import build_model
    torch.manual_seed(seed)
    fresh = build_model({"name": "convnet", "width": 8, "depth": 3, "norm": "batchnorm"}, CLASSES, 1, 8)
    return all(torch.equal(call["init"][key], value) for key, value in fresh.state_dict().items())


def test_each_filter_starts_from_fresh_weights_of_its_own_seed(pinned_run):
    """ccfs.warm_start off (the default): filter j starts from a fresh model seeded seeds.filter_model(seed, j)."""
    _, calls = pinned_run
    filters = [c for c in calls["train"] if c["desc"].startswith("phase ")]
    for j, c in enumerate(filters, 1):
        assert starts_fresh(c, seeds.filter_model(0, j)), j


def test_each_evaluation_model_starts_from_fresh_weights_of_its_own_seed(pinned_run):
    """Evaluation model r (desc "eval ccfs r+1/R") starts from a fresh model seeded seeds.eval_run(seed, r): the
    runs differ in their initial weights, not only in their batch order."""
    _, calls = pinned_run
    evals = [c for c in calls["train"] if c["desc"].startswith("eval ccfs")]
    assert [c["desc"] for c in evals] == ["eval ccfs 1/2", "eval ccfs 2/2"]
    for r, c in enumerate(evals):
        assert starts_fresh(c, seeds.eval_run(0, r)), r
    assert not starts_fresh(evals[1], seeds.eval_run(0, 0))


# --------------------------------------------------------------------------- one owner of the phase budgets

def test_plan_and_run_take_the_same_budgets_in_official_mode():
    """ccfs.compat: official takes int(ipc * alpha) distilled images: at IPC 100, alpha 0.29 the run selects
    [24, 24, 24] and the plan must size the filters' trainings for the same sets (28, 52, 76 per class)."""
    cfg = load_config(None, ["ccfs.ipc=100", "ccfs.alpha=0.29", "ccfs.phases=3", "ccfs.compat=official",
                             "train.epochs=2", "eval.baselines=false"])
    assert run_budgets(cfg["ccfs"]) == [24, 24, 24] != phase_budgets(100, 0.29, 3)
    assert run_budgets(load_config(None, ["ccfs.ipc=100", "ccfs.alpha=0.29"])["ccfs"]) == [24, 24, 23]
    stages = make_plan(cfg, 1, n_train=50000, num_classes=100, class_size=500.0)
    filters = [job for s in stages for jobs in s.local for job in jobs if job.kind == "filter"]
    for job, per_class in zip(filters, (28, 52, 76)):
        rec = Recipe.for_phase(cfg, ipc=100, class_size=500.0, per_class=per_class)
        n = per_class * 100
        assert job.cost == pytest.approx(rec.epochs * math.ceil(n / rec.batch_size) * rec.batch_size * 4 / 3)


# --------------------------------------------------------------------------- unit pins of the recipes

def kl_t2(student, teacher, t):
    """KL(softmax(teacher / t) || softmax(student / t)) * t^2, mean over the batch, in float64 numpy."""
    s, q = student.astype(np.float64) / t, teacher.astype(np.float64) / t
    log_p = s - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True)) - s.max(1, keepdims=True)
    log_q = q - np.log(np.exp(q - q.max(1, keepdims=True)).sum(1, keepdims=True)) - q.max(1, keepdims=True)
    return float((np.exp(log_q) * (log_q - log_p)).sum(1).mean() * t * t)


@pytest.mark.parametrize("t", [1.0, 4.0, 20.0])
def test_kd_loss_is_kl_times_t_squared(t):
    g = np.random.default_rng(0)
    student, teacher = g.normal(size=(5, 7)) * 3, g.normal(size=(5, 7)) * 3
    got = kd_loss(torch.tensor(student), torch.tensor(teacher), t).item()
    assert got == pytest.approx(kl_t2(student, teacher, t), rel=1e-5)


class Backward:
    def backward(self, loss):
        loss.backward()


def test_a_training_step_with_a_teacher_descends_the_kd_loss_at_its_temperature():
    """train_step's gradient is that of KL * T^2 at the given temperature (not cross-entropy, not T = 1)."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 4), nn.Linear(6, 4)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    train_step(Backward(), opt, None, student, x, y, teacher_forward=teacher, temperature=3.0)
    got = student.weight.grad.clone()
    w = student.weight.detach().clone().requires_grad_(True)
    s = (x @ w.T + student.bias.detach()).double() / 3.0
    q = torch.softmax(teacher(x).detach().double() / 3.0, 1)
    loss = (q * (q.log() - torch.log_softmax(s, 1))).sum(1).mean() * 9.0
    loss.backward()
    torch.testing.assert_close(got, w.grad.float(), rtol=1e-4, atol=1e-6)
    train_step(Backward(), opt, None, student, x, y, temperature=3.0)               # no teacher: cross-entropy
    w2 = student.weight.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(x @ w2.T + student.bias.detach(), y).backward()
    torch.testing.assert_close(student.weight.grad, w2.grad)


def test_schedule_values_per_step():
    f = lr_lambda(total=10, warmup=2)
    assert [f(i) for i in range(3)] == [0.5, 1.0, 1.0]
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    g = lr_lambda(total=10, warmup=4, warmup_start=0.01)
    assert [g(i) for i in range(5)] == pytest.approx([0.01, 0.2575, 0.505, 0.7525, 1.0])
    assert g(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))


def test_augmentation_on_and_off():
    from ccfs_dist.training.augment import Augment
    gen = torch.Generator().manual_seed(0)
    boxes, flips = Augment(Norm((0.5,), (0.5,)), 8, scale_min=0.5, flip=False).draw(400, 8, 8, gen, "cpu")
    assert not flips.any()
    area = boxes[:, 2] * boxes[:, 3] / 64
    assert area.min() >= 0.5 - 1e-6 and area.max() <= 1 + 1e-6 and area.min() < 0.6
    boxes, flips = Augment(Norm((0.5,), (0.5,)), 8, scale_min=0.5, flip=True).draw(400, 8, 8, gen, "cpu")
    assert 0.4 < flips.float().mean() < 0.6


def test_evaluation_reports_the_final_epoch_and_the_official_best(monkeypatch):
    """`final` is the accuracy after the last epoch (not the best epoch); `official` the best after 80 %."""
    import ccfs_dist.training.evaluate as evaluate
    from ccfs_dist.runtime.dist import OneRankAccelerator, make_accelerator
    data = load_real({"source": "digits"})
    told = iter([0.9, 0.3, 0.2])                           # epochs 3 and 4 (0-based, e > 0.5 * 5), then the final model
    monkeypatch.setattr(evaluate, "accuracy", lambda *a, **k: next(told))
    rec = Recipe(epochs=5, batch_size=16, lr=0.01)
    result = evaluate.evaluate_run(OneRankAccelerator(make_accelerator()), data.train.images[:20], data.train.labels[:20],
                                   data=data, model_cfg={"name": "convnet", "width": 4, "depth": 1, "norm": "batchnorm"},
                                   recipe=rec, teacher=None, seed=0, desc="pin", best_after=0.5)
    assert result["final"] == 0.2 and result["official"] == 0.9 and result["official_epochs"] == 2


def test_every_evaluation_model_has_its_own_seed():
    runs = [seeds.eval_run(0, r) for r in range(5)]
    assert len(set(runs)) == 5
    assert not set(runs) & ({seeds.filter_model(0, j) for j in (1, 2, 3)} | {seeds.teacher(0)})


def test_bn_matching_term_value_and_effect():
    """The distiller's loss adds r_bn * sum over BN layers of ||mu_batch - mu_run||_2 + ||var_batch - var_run||_2."""
    from ccfs_dist.training.distill import _BNStatsLoss, recover
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(3, 2))
    net[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
    net[1].running_var.copy_(torch.tensor([1.5, 0.5, 2.0]))
    net.eval()
    x = torch.randn(4, 1, 5, 5)
    hooks = _BNStatsLoss(net)
    net(x)
    got = hooks.pop().item()
    hooks.remove()
    a = net[0](x).detach().double().numpy()
    mu, var = a.mean(axis=(0, 2, 3)), a.var(axis=(0, 2, 3))
    want = np.linalg.norm(mu - [0.1, -0.2, 0.3]) + np.linalg.norm(var - [1.5, 0.5, 2.0])
    assert got == pytest.approx(want, rel=1e-5)

    def run(r_bn):
        return recover(net, [0, 1], norm=Norm((0.5,), (0.5,)), image_size=5, channels=1, iterations=3, lr=0.1,
                       r_bn=r_bn, jitter=0, cda=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(0.5), run(0.5)) and not torch.equal(run(0.0), run(0.5))

