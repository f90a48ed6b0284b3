"""ccfs_dist.training.distill: SRe2L/CDA recovery against a BatchNorm teacher trained on sklearn's digits."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccfs_dist.data.pool import Norm
from ccfs_dist.training.augment import normalize
from ccfs_dist.training.distill import cda_min_scale, recover
from ccfs_dist.errors import ConfigError
from ccfs_dist.training.models import build_model

MODEL = {"name": "convnet", "width": 32, "depth": 2, "norm": "batchnorm"}
# recover hyper-parameters that work on 8x8 digits
HP = dict(image_size=8, channels=1, iterations=300, lr=0.1, r_bn=0.05, jitter=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # small CPU-bound models: one thread is fastest and keeps shared machines responsive
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(np.round(d.images * 255.0 / 16.0), dtype=torch.uint8).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    mean = [x[tr].float().mean().item() / 255.0]
    std = [x[tr].float().std().item() / 255.0]
    return {"xtr": x[tr], "ytr": y[tr], "xte": x[te], "yte": y[te], "mean": mean, "std": std}


def train(x_uint8, y, mean, std, *, epochs, batch_size, seed, lr=1e-2, norm="batchnorm"):
    torch.manual_seed(seed)
    model = build_model(dict(MODEL, norm=norm), 10, 1, 8)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xn = normalize(x_uint8, mean, std)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(xn[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x_uint8, y, mean, std):
    model.eval()
    return (model(normalize(x_uint8, mean, std)).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def teacher(digits):
    model = train(digits["xtr"], digits["ytr"], digits["mean"], digits["std"], epochs=8, batch_size=128, seed=0)
    acc = accuracy(model, digits["xte"], digits["yte"], digits["mean"], digits["std"])
    assert acc > 0.9, f"teacher reached only {acc:.3f}"
    return model


def test_cda_schedule():
    assert cda_min_scale(0, 100) == pytest.approx(1.0)
    assert cda_min_scale(99, 100) == pytest.approx(0.08)
    values = [cda_min_scale(s, 100) for s in range(100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("cda", [True, False])
def test_recovered_images_are_recognised_and_teach(digits, teacher, cda):
    mean, std = digits["mean"], digits["std"]
    gen = torch.Generator().manual_seed(0)
    batches = [recover(teacher, torch.arange(10), norm=Norm(mean, std), cda=cda, generator=gen, **HP)
               for _ in range(3)]
    synth = torch.cat(batches)
    labels = torch.arange(10).repeat(3)
    assert synth.dtype == torch.uint8 and synth.shape == (30, 1, 8, 8)
    assert not torch.equal(batches[0], batches[1])
    assert accuracy(teacher, synth, labels, mean, std) >= 0.9

    if not cda:
        return  # the student comparison runs once (CDA, the default) to keep the test fast
    noise = torch.randint(0, 256, synth.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    student, control = [], []
    for seed in (0, 1):
        s = train(synth, labels, mean, std, epochs=100, batch_size=30, seed=seed)
        n = train(noise, labels, mean, std, epochs=100, batch_size=30, seed=seed)
        student.append(accuracy(s, digits["xte"], digits["yte"], mean, std))
        control.append(accuracy(n, digits["xte"], digits["yte"], mean, std))
    assert np.mean(student) > np.mean(control) + 0.1, (student, control)
    assert np.mean(student) > 0.2, student


def test_recover_restores_teacher_and_is_reproducible(teacher):
    teacher.train()
    teacher.classifier.weight.requires_grad_(False)  # a flag the caller set must survive
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kw = dict(norm=Norm([0.3], [0.37]), image_size=8, channels=1, iterations=20, lr=0.1, r_bn=0.05, jitter=1)
    a = recover(teacher, torch.tensor([3, 1, 4]), generator=torch.Generator().manual_seed(5), **kw)
    b = recover(teacher, torch.tensor([3, 1, 4]), generator=torch.Generator().manual_seed(5), **kw)
    c = recover(teacher, torch.tensor([3, 1, 4]), generator=torch.Generator().manual_seed(6), **kw)
    assert a.shape == (3, 1, 8, 8) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert teacher.training
    assert not teacher.classifier.weight.requires_grad
    assert all(p.requires_grad for n, p in teacher.named_parameters() if n != "classifier.weight")
    teacher.classifier.weight.requires_grad_(True)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and running statistics untouched
    assert all(not m._forward_hooks for m in teacher.modules())
    teacher.eval()


def test_recover_from_init_images(teacher):
    init = torch.full((2, 1, 8, 8), 128, dtype=torch.uint8)
    out = recover(teacher, torch.tensor([0, 7]), norm=Norm([0.3], [0.37]), image_size=8, channels=1,
                  iterations=1, lr=1e-6, r_bn=0.05, jitter=0, init_images=init,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, init)  # a negligible step leaves the start image


def test_recover_needs_batchnorm_teacher():
    model = build_model(dict(MODEL, norm="instancenorm"), 10, 1, 8)
    with pytest.raises(ConfigError, match="BatchNorm.*model.norm: batchnorm.*data.distilled"):
        recover(model, torch.arange(10), norm=Norm([0.3], [0.37]), **HP)
