"""The official recipes (issue 14): the paper configs' batch / epoch / schedule values against the
official scripts (CYDaaa30/CCFS scripts/ccfs_*.sh and curriculum_train in ccfs_*.py), the warm-up +
cosine schedule against torch's own schedulers, the teacher's RandomCrop against torchvision, and the
official accuracy protocol."""
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from conftest import ROOT
from ccfs_dist.training.augment import Augment, pad_boxes, pad_crop
from ccfs_dist.config import load_config
from ccfs_dist.data.pool import Norm
from ccfs_dist.ccfs.selection import phase_budgets
from ccfs_dist.training.train import Recipe, lr_lambda, train_model

# (config, classes, images per class): --epochs and --alpha of each command in scripts/ccfs_*.sh
OFFICIAL = {
    "cifar10_ipc250": (10, 5000, 500, 0.2), "cifar10_ipc500": (10, 5000, 500, 0.1),
    "cifar10_ipc1000": (10, 5000, 250, 0.3), "cifar10_ipc1500": (10, 5000, 200, 0.3),
    "cifar100_ipc25": (100, 500, 500, 0.2), "cifar100_ipc50": (100, 500, 500, 0.1),
    "cifar100_ipc100": (100, 500, 250, 0.1), "cifar100_ipc150": (100, 500, 200, 0.2),
    "tiny_ipc50": (200, 500, 100, 0.2), "tiny_ipc100": (200, 500, 100, 0.2),
}


def official_batch(name, set_size, num_classes):
    """curriculum_train: ccfs_cifar10.py thresholds 500 / 1000 per class, ccfs_cifar100.py 50 / 100;
    ccfs_tiny.py has no rule and runs with --batch-size 64."""
    if name.startswith("tiny"):
        return 64
    low, high = (500, 1000) if name.startswith("cifar10_") else (50, 100)
    if set_size < low * num_classes:
        return 32
    if low * num_classes <= set_size < high * num_classes:
        return 64
    return 128


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_paper_configs_give_the_official_recipe(name):
    num_classes, class_size, epochs, alpha = OFFICIAL[name]
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
    c = cfg["ccfs"]
    assert c["alpha"] == alpha and c["phases"] == 3 and c["compat"] == "none"
    budgets = phase_budgets(c["ipc"], c["alpha"], c["phases"])
    assert budgets == phase_budgets(c["ipc"], c["alpha"], c["phases"], official=True)   # int(ipc * alpha) agrees
    sizes = [c["ipc"] - sum(budgets) + sum(budgets[:j]) for j in range(3)] + [c["ipc"]]   # phases 1-3, then eval
    for per_class in sizes:
        rec = Recipe.for_phase(cfg, ipc=c["ipc"], class_size=class_size, per_class=per_class)
        assert rec.epochs == epochs, (name, per_class)
        assert rec.batch_size == official_batch(name, per_class * num_classes, num_classes), (name, per_class)
        assert (rec.lr, rec.momentum, rec.weight_decay) == (0.2, 0.9, 1e-4)
        assert (rec.warmup_epochs, rec.warmup_start, rec.schedule_step) == (5, 0.01, "epoch")
        assert (rec.scale_min, rec.flip, rec.temperature) == (0.08, True, 20.0)
    assert cfg["eval"]["runs"] == 5 and cfg["eval"]["best_after"] == 0.8
    mean, std = ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)) if name.startswith("tiny") else \
        ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert tuple(cfg["data"]["mean"]) == mean and tuple(cfg["data"]["std"]) == std
    teacher = Recipe.for_teacher(cfg)
    assert (teacher.epochs, teacher.batch_size, teacher.lr, teacher.weight_decay) == (200, 128, 0.1, 5e-4)
    if not name.startswith("tiny"):
        assert (teacher.crop, teacher.padding, teacher.flip) == ("pad", 4, True)   # SRe2L squeeze


def test_batch_rule_is_the_ratio_of_the_current_set():
    cfg = load_config(None)
    batch = lambda per_class, class_size: Recipe.for_phase(cfg, ipc=10, class_size=class_size, per_class=per_class).batch_size  # noqa: E731
    assert [batch(p, 5000) for p in (499, 500, 999, 1000)] == [32, 64, 64, 128]      # CIFAR-10
    assert [batch(p, 500) for p in (49, 50, 99, 100)] == [32, 64, 64, 128]           # CIFAR-100 (was 32 for all)
    assert batch(20, 143.7) == 64                                                    # digits IPC 20: 13.9 %


def torch_chain(epochs, warmup, lr=0.2):
    """The official scheduler: SequentialLR(LinearLR(0.01, warmup), CosineAnnealingLR(epochs - warmup))."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warmup)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs - warmup, eta_min=0.0)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, schedulers=[warm, cos], milestones=[warmup])
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("epochs", [500, 250, 200, 100])
def test_epoch_schedule_matches_torch_linear_then_cosine(epochs):
    factor = lr_lambda(epochs, 5, warmup_start=0.01)
    ours = [0.2 * factor(e) for e in range(epochs)]
    np.testing.assert_allclose(ours, torch_chain(epochs, 5), rtol=1e-6, atol=1e-12)


def test_train_model_steps_the_schedule_once_per_epoch():
    from ccfs_dist.runtime.dist import make_accelerator
    from ccfs_dist.training.models import build_model
    acc = make_accelerator()
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(40) % 4
    common = dict(norm=Norm((0.5,), (0.25,)))
    rec = Recipe(epochs=8, batch_size=8, lr=0.2, warmup_epochs=2, scale_min=0.5)
    torch.manual_seed(0)
    model = build_model({"name": "convnet", "width": 4, "depth": 1}, 4, 1, 8)
    _, stats = train_model(acc, model, images, labels, rec.replace(warmup_start=0.01, schedule_step="epoch"), **common)
    np.testing.assert_allclose(stats["lrs"], torch_chain(8, 2), rtol=1e-6)
    # per batch (the default): the factor advances every optimizer step, 5 steps per epoch here
    model = build_model({"name": "convnet", "width": 4, "depth": 1}, 4, 1, 8)
    _, stats = train_model(acc, model, images, labels, rec, **common)
    factor = lr_lambda(8 * 5, 2 * 5)
    np.testing.assert_allclose(stats["lrs"], [0.2 * factor(5 * e) for e in range(8)], rtol=1e-6)


def test_teacher_random_crop_is_torchvisions_random_crop():
    """pad_crop equals torchvision's pad(4) + crop + hflip of the same offsets, black outside the image,
    and the offsets cover -4..4 evenly."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    boxes, flips = pad_boxes(64, 32, 32, 4, generator=gen, flip=True)
    out = pad_crop(x, boxes, 4, flips)
    for i in range(64):
        left, top = int(boxes[i, 0]) + 4, int(boxes[i, 1]) + 4
        ref = TF.crop(TF.pad(x[i], [4]), top, left, 32, 32)
        ref = TF.hflip(ref) if flips[i] else ref
        assert torch.equal(out[i], ref), i
    many, _ = pad_boxes(90000, 32, 32, 4, generator=gen)
    counts = np.bincount((many[:, :2].numpy().ravel() + 4).astype(int), minlength=9)
    assert len(counts) == 9 and counts.min() > 0.9 * counts.mean() and many[:, 2:].eq(32).all()
    aug = Augment(Norm((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), 32, crop="pad", padding=4)
    views = aug(x[:4], generator=torch.Generator().manual_seed(1))
    assert views.shape == (4, 3, 32, 32) and views.dtype == torch.float32
    assert torch.isclose(views.min(), torch.tensor(-2.0))                 # padded black: (0 - 0.5) / 0.25
    with pytest.raises(TypeError):
        aug(x[:4].float())                                                # black is unknown once normalised


def test_official_protocol_counts_the_epochs_after_80_percent():
    from ccfs_dist.data.sources import load_real
    from ccfs_dist.runtime.dist import make_accelerator
    from ccfs_dist.training.evaluate import evaluate_run, summarize
    acc = make_accelerator()
    data = load_real({"source": "digits"})
    x, y = data.train.fetch(np.arange(0, 1437, 10))
    rec = Recipe.for_phase(load_config(None, ["train.epochs=10", "aug.scale_min=0.5", "aug.flip=false"]), ipc=10,
                           class_size=143.7, per_class=10)
    model_cfg = {"name": "convnet", "width": 8, "depth": 2}
    runs = [evaluate_run(acc, x, y, data=data, model_cfg=model_cfg, recipe=rec, teacher=None, seed=s, desc="e",
                         best_after=after) for s, after in ((0, 0.8), (0, 0.5))]
    assert runs[0]["official_epochs"] == 1 and runs[1]["official_epochs"] == 4     # e > 8: 9;  e > 5: 6..9
    assert runs[0]["final"] == runs[1]["final"] == runs[0]["official"] <= runs[1]["official"]
    assert runs[0]["recipe"] == {key: getattr(rec, key) for key in runs[0]["recipe"]} and runs[0]["recipe"]["epochs"] == 10
    s = summarize(runs)
    assert s["official_mean"] == pytest.approx(np.mean([r["official"] for r in runs]))
    assert s["official_std"] == pytest.approx(np.std([r["official"] for r in runs]))
    old = summarize([{"final": 0.5, "best_epoch": 0.6}, runs[0]])   # a run JSON written before the official figure
    assert old["mean"] == pytest.approx((0.5 + runs[0]["final"]) / 2) and old["official_mean"] is None
