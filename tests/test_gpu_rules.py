"""What makes a CUDA run give the CPU's answer, checked on the CPU: the deterministic settings, draws on CPU
generators, one fp16 loss scaler per training saved in its checkpoints, rank 0 deciding a split job's
state, and one GPU per rank."""
import os
from types import SimpleNamespace

import pytest
import torch

from ccfs_dist.runtime import dist, jobs
from ccfs_dist.training.augment import Augment, _rand, randn_cpu
from ccfs_dist.runtime.dist import OneRankAccelerator, make_accelerator, one_gpu_per_rank, set_determinism
from ccfs_dist.errors import CCFSError
from ccfs_dist.data.pool import Norm
from ccfs_dist.training.models import build_model
from ccfs_dist.runtime.plan import Job
from ccfs_dist.training.train import Recipe, train_model


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, torch.utils.deterministic.fill_uninitialized_memory)
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
    torch.utils.deterministic.fill_uninitialized_memory = before[3]


def settings():
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def test_make_accelerator_sets_deterministic_algorithms_and_false_reverts_them(restore_determinism):
    make_accelerator(deterministic=False)
    assert settings() == (False, False, True, None)
    make_accelerator()                                       # train.deterministic: true, the default
    assert settings() == (True, True, False, ":4096:8")
    assert not torch.utils.deterministic.fill_uninitialized_memory
    make_accelerator(deterministic=False)
    assert settings()[:3] == (False, False, True)


def test_a_cublas_setting_of_the_user_is_kept(restore_determinism, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    set_determinism(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_config_has_the_switch():
    from ccfs_dist.config import load_config
    assert load_config(None, [])["train"]["deterministic"] is True
    assert load_config(None, ["train.deterministic=false"])["train"]["deterministic"] is False
    with pytest.raises(CCFSError, match="train.deterministic"):
        load_config(None, ["train.deterministic=fast"])


# ------------------------------------------------------------------------------ device-independent draws

def test_draws_are_made_on_the_cpu_whatever_the_device():
    """The views asked for on another device ('meta': placement only) consume the CPU generator exactly as
    the CPU's do, so the numbers are the CPU's, moved; a generator on another device is refused."""
    for crop in ("resized", "pad"):
        aug = Augment(Norm((0.5,), (0.25,)), 16, crop=crop)
        cpu, meta = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        boxes, flips = aug.draw(1000, 16, 16, cpu, "cpu")
        mboxes, mflips = aug.draw(1000, 16, 16, meta, "meta")
        assert mboxes.device.type == "meta" and mflips.device.type == "meta"
        assert torch.equal(cpu.get_state(), meta.get_state())
        again = aug.draw(1000, 16, 16, torch.Generator().manual_seed(3), "cpu")
        assert torch.equal(again[0], boxes) and torch.equal(again[1], flips)
    cpu, meta = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert randn_cpu((5,), meta, "meta").device.type == "meta"
    assert torch.equal(randn_cpu((5,), cpu, "cpu"), torch.randn(5, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(cpu.get_state(), meta.get_state())
    with pytest.raises(ValueError, match="CPU generator"):
        _rand((3,), SimpleNamespace(device=torch.device("cuda", 0)), "cpu")


def test_a_training_draws_every_number_on_cpu_generators(monkeypatch):
    """Every random call of train_model (order, crops, flips) and of the base distiller (noise, jitter,
    crops, flips) is given a CPU generator: none draws from a device generator or a global one."""
    from ccfs_dist.training import distill
    calls = []
    for name in ("rand", "randn", "randperm", "randint"):
        real = getattr(torch, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, kwargs.get("generator"), kwargs.get("device")))
            return _real(*args, **kwargs)
        monkeypatch.setattr(torch, name, spy)
    images, labels = torch.full((24, 1, 8, 8), 7, dtype=torch.uint8), torch.arange(24) % 4
    model = build_model({"name": "convnet", "width": 4, "depth": 1}, 4, 1, 8)
    train_model(OneRankAccelerator(make_accelerator()), model, images, labels, Recipe(epochs=2, batch_size=8, lr=0.1),
                norm=Norm((0.5,), (0.25,)), seed=5)
    trained = len(calls)
    distill.recover(model, [0, 1], norm=Norm((0.5,), (0.25,)), image_size=8, channels=1, iterations=3, lr=0.1,
                    r_bn=0.01, jitter=2, generator=torch.Generator().manual_seed(0))
    assert trained >= 4 and len(calls) > trained + 6       # 2 x (order + views), then noise + 3 x (jitter, crops)
    bad = [(n, g, d) for n, g, d in calls if g is None or g.device.type != "cpu" or d not in (None, "cpu")]
    assert not bad, bad


# ------------------------------------------------------------------------------ fp16 loss scaler

class FakeFp16:
    """An accelerator whose fp16 runs on the CPU (Accelerate has no CPU fp16): a scaler that grows every
    step from far above fp16's range, so that its state decides which early steps are skipped."""
    device = torch.device("cpu")
    mixed_precision = "fp16"

    def __init__(self):
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 28, growth_interval=1)

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.float16)


class Stop(Exception):
    pass


def test_fp16_scaler_is_per_training_and_in_its_checkpoints(tmp_path):
    make_accelerator()                   # Accelerate's state, which AcceleratedOptimizer reads
    images, labels = torch.randint(0, 256, (48, 1, 8, 8), dtype=torch.uint8), torch.arange(48) % 4
    rec = Recipe(epochs=4, batch_size=16, lr=0.1, scale_min=0.5, checkpoint_every=1)
    acc = FakeFp16()

    def run(checkpoint=None, on_epoch_end=None):
        torch.manual_seed(0)
        model = build_model({"name": "convnet", "width": 4, "depth": 1}, 4, 1, 8)
        local = OneRankAccelerator(acc)
        model, _ = train_model(local, model, images, labels, rec, norm=Norm((0.5,), (0.25,)), checkpoint=checkpoint,
                               on_epoch_end=on_epoch_end)
        assert local.scaler is not acc.scaler and acc.scaler.get_scale() == 2.0 ** 28   # its own scaler
        return torch.cat([v.flatten().float() for v in model.state_dict().values()])

    reference = run()

    def stop(epoch, model):
        if epoch == 2:
            raise Stop
    ckpt = tmp_path / "state.pt"
    with pytest.raises(Stop):
        run(str(ckpt), stop)
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1 and state["scaler"]["scale"] < 2.0 ** 28      # overflows lowered it
    without = {k: v for k, v in state.items() if k != "scaler"}
    torch.save(without, tmp_path / "without.pt")
    assert torch.equal(run(str(ckpt)), reference)                           # resumed with its scaler: exact
    assert not torch.equal(run(str(tmp_path / "without.pt")), reference)   # a fresh scale skips other steps


def test_fresh_scaler_keeps_the_settings_and_none_without_fp16():
    acc = FakeFp16()
    old = acc.scaler
    new = dist.fresh_scaler(acc)
    assert new is acc.scaler and new is not old
    assert (new.get_scale(), new.get_growth_interval(), new.get_backoff_factor()) == (2.0 ** 28, 1, 0.5)

    class NoFp16:
        scaler = None
    assert dist.fresh_scaler(NoFp16()) is None


# ------------------------------------------------------------------------------ a split job's state

class Rank:
    def __init__(self, index, world=2):
        self.process_index, self.num_processes, self.is_main_process = index, world, index == 0


class Looks:
    """A rank's view of the run directory: `done` (what it sees) and which jobs it looked at."""
    def __init__(self, done):
        self.done, self.asked = done, []

    def finished(self, job):
        self.asked.append(job.name)
        return self.done


def test_rank_0_decides_whether_a_split_job_has_finished(monkeypatch):
    """Rank 0's look is broadcast (main_says); rank 1 does not look, and follows it even where its own file
    system would say otherwise. A whole job is decided by the rank that runs it."""
    said = {}

    def main_says(acc, value):
        if acc.is_main_process:
            said["value"] = value
        return said["value"]
    monkeypatch.setattr(jobs, "main_says", main_says)
    split, whole = Job("filter", (1,), 1.0, True), Job("eval", ("ccfs", 0), 1.0, False)
    rank0, rank1 = Looks(True), Looks(False)       # rank 1's file system lags behind
    assert jobs.finished(Rank(0), split, rank0.finished) is True
    assert jobs.finished(Rank(1), split, rank1.finished) is True and rank1.asked == []
    assert jobs.finished(Rank(1), whole, rank1.finished) is False and rank1.asked == [whole.name]
    one = Looks(True)
    assert jobs.finished(Rank(0, world=1), split, one.finished) is True


# ------------------------------------------------------------------------------ one GPU per rank

@pytest.mark.parametrize("env, gpus, ok", [
    ({"WORLD_SIZE": "1"}, 1, True),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, 2, True),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 2, True),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, 1, False),   # rank 0 fails alike
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "0"}, 1, False),
    ({"WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 2, True),    # 2 nodes of 2
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 1, False),                            # no LOCAL_WORLD_SIZE
])
def test_one_gpu_per_rank(env, gpus, ok):
    message = one_gpu_per_rank(env, gpus)
    assert (message is None) == ok
    if not ok:
        assert "GPU of its own" in message and f"at most {gpus} process" in message
        assert ("CUDA_VISIBLE_DEVICES=0" in message) == ("CUDA_VISIBLE_DEVICES" in env)


def test_two_ranks_on_one_gpu_is_an_error_before_the_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(dist, "Accelerator", lambda **kw: pytest.fail("the accelerator was made"))
    for key, value in {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(CCFSError, match="2 processes on this node but this node shows 1 GPU"):
        make_accelerator()
