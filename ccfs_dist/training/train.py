"""Train a model on a small cached image set: the teacher, each phase's filter, and evaluation models.

The set is held as a uint8 tensor on the device and augmented in batches on the device (a set held in a
shared file, synthetic.py, stays on the host: each chunk's rows are gathered there and moved). A training runs
whole on one rank when `accelerator` is a dist.OneRankAccelerator (the plan's rule, plan.runs_data_parallel), else it is
split: every rank draws the same epoch permutation and trains on its share of each global batch;
Accelerate's DDP averages the gradients, so the recipe (global batch size, lr) does not depend on the
process count; on CUDA BatchNorm becomes SyncBatchNorm (global batch statistics), and at the end every
rank receives rank 0's parameters and buffers, the state that is saved.
The augmentation (crop box and flip of every sample) is drawn for all global batches of an epoch at
once from a CPU generator seeded alike on every rank (and moved to the device: the same views on every
device), and each rank takes its slice of each batch: a sample sees the same augmented view whatever the
process count (on the CPU the boxes equal those of drawing
batch by batch, as earlier versions did).

The step loop does only device work: the epoch permutation and the epoch's crop boxes are made once
per epoch, every rank's share of a global batch is the same slice in every step (the last batch of an
epoch wraps around, so all batches are full), and small batches are augmented several at a time
(AUG_CHUNK_BYTES; each sample's view is the same). With `compile` the student (after
`accelerator.prepare`, so DDP's graph breaks at bucket boundaries apply) and the teacher's forward run
through `torch.compile`; the prepared, uncompiled module is what is unwrapped, saved and returned, so
checkpoints are unchanged.
"""
import contextlib
import dataclasses
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ccfs_dist.runtime import seeds
from ccfs_dist.training.augment import Augment
from ccfs_dist.runtime.dist import broadcast_state, fresh_scaler, rank_slice, rank_world
from ccfs_dist.errors import DataError
from ccfs_dist.runtime.io import save_torch
from ccfs_dist.runtime.progress import track

AUG_CHUNK_BYTES = 32 * 2**20   # float32 augmented images held at once per rank (several batches when small)


def paper_epochs(ipc, class_size):
    """Epochs by compression ratio ipc / class size (CCFS supplement: <=10 % 500, <=20 % 250, else 200)."""
    ratio = ipc / class_size
    if ratio <= 0.10 + 1e-9:
        return 500
    if ratio <= 0.20 + 1e-9:
        return 250
    return 200


def paper_batch_size(per_class, class_size):
    """Batch size by the compression ratio of the *current* synthetic set (official scripts'
    `curriculum_train`): below 10 % of the training set 32, below 20 % 64, else 128.

    The official CIFAR-10 script writes this as < 500 / < 1000 images per class and the CIFAR-100 one
    as < 50 / < 100 (both are 10 % / 20 % of their 5,000 / 500 images per class); comparing
    10 * per_class with class_size keeps the boundary exact (500 per class of 5,000 is 64, as there).
    """
    if 10 * per_class < class_size:
        return 32
    if 10 * per_class < 2 * class_size:
        return 64
    return 128


def lr_lambda(total, warmup, warmup_start=None):
    """Linear warm-up then cosine decay to zero, as a multiplier of the base lr per scheduler step.

    `total` and `warmup` count scheduler steps (optimizer steps, or epochs when the schedule advances
    once per epoch). warmup_start None: the warm-up ramps (i + 1) / warmup, reaching 1 at its last
    step. A number s: torch's LinearLR(start_factor=s, total_iters=warmup) followed by
    CosineAnnealingLR(T_max=total - warmup), as the official scripts chain them with SequentialLR:
    s + (1 - s) * i / warmup during the warm-up, then 0.5 * (1 + cos(pi * (i - warmup) / (total - warmup))).
    """
    def factor(step):
        if step < warmup:
            if warmup_start is None:
                return (step + 1) / warmup
            return warmup_start + (1.0 - warmup_start) * step / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def kd_loss(student_logits, teacher_logits, temperature):
    """KL(softened teacher || softened student) * T^2, the paper's KD objective."""
    t = temperature
    log_p = F.log_softmax(student_logits.float() / t, dim=1)
    q = F.softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * (t * t)


def unresumable(path, exc):
    """The DataError for a training state at `path` that failed to load with `exc` (a damaged or foreign file)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return DataError(f"training state {path} cannot be resumed ({type(exc).__name__}: {first}); "
                     f"delete it to restart this training from its start")


def generators_of(seed):
    """A training's random generators, seeded from its seed: the data order and the augmentation (on the
    CPU, so the same on every rank and every device; saved and restored with a mid-training state)."""
    return {"order_gen": torch.Generator().manual_seed(seed),
            "aug_gen": torch.Generator().manual_seed(seeds.augmentation(seed))}


def epoch_order(order_gen, n, steps_per_epoch, batch_size):
    """The rows of every global batch of an epoch (steps x batch, on the host): a permutation of the n
    samples drawn from `order_gen`, repeated where the last batch wraps around."""
    perm = torch.randperm(n, generator=order_gen)
    perm = perm.repeat(math.ceil(steps_per_epoch * batch_size / n))
    return perm[:steps_per_epoch * batch_size].view(steps_per_epoch, batch_size)


def epoch_boxes(augment, samples, height, width, generator, device):
    """Crop boxes and flips of all `samples` augmented views of an epoch (the generator advances alike
    on every rank; each rank slices its rows)."""
    return augment.draw(samples, height, width, generator, device)


def compiled(module, compile):
    """`module` itself (compile False/None), or torch.compile(module) with the default backend (True)
    or the backend named by `compile` (e.g. "aot_eager", "eager": quick, for tests and debugging)."""
    if not compile:
        return module
    return torch.compile(module) if compile is True else torch.compile(module, backend=compile)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(accelerator, optimizer, scheduler, student_forward, x, targets, *, teacher_forward=None,
               teacher_autocast=contextlib.nullcontext, temperature=20.0, on_batch=None, rows=None):
    """One optimizer step on the augmented batch `x` (train_model and stream_train.train_stream): the forward
    pass, `on_batch(rows, detached logits)`, KD from `teacher_forward` at `temperature` (else cross-entropy on
    `targets`), backward, optimizer step, and the schedule's step unless `scheduler` is None (a schedule
    that advances once per epoch is stepped by the caller)."""
    logits = student_forward(x)
    if on_batch is not None:
        on_batch(rows, logits.detach())
    if teacher_forward is not None:
        with torch.no_grad(), teacher_autocast():
            teacher_logits = teacher_forward(x)
        loss = kd_loss(logits, teacher_logits, temperature)
    else:
        loss = F.cross_entropy(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one model is trained: the optimizer, the lr schedule, the loss temperature, the augmentation and
    the execution switches. Every training (teacher, filter, evaluation model, score run) is given one,
    built from the config by `for_teacher`, `for_phase` or `for_scores`, the only places that read the
    config's training sections.

    The lr follows `lr_lambda`: warm-up for `warmup_epochs` (from `warmup_start`), then cosine to zero,
    advanced after every optimizer step (schedule_step "batch") or after every epoch ("epoch", as the
    official scripts do). `temperature`: the KD temperature (when the training has a teacher). `crop`:
    "resized" (RandomResizedCrop from `scale_min`) or "pad" (RandomCrop with `padding` zero pixels per
    side); both with a horizontal flip when `flip`. `compile`: False, True (torch.compile the student and
    the teacher's forward) or a backend name. `checkpoint_every` > 0: save the training state every that
    many epochs (when the training is given a checkpoint path).
    """
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    warmup_start: object = None          # None or a float (see lr_lambda)
    schedule_step: str = "batch"
    temperature: float = 20.0
    crop: str = "resized"
    padding: int = 4
    scale_min: float = 0.08
    flip: bool = True
    channels_last: bool = False
    compile: object = False              # False, True or a torch.compile backend name
    checkpoint_every: int = 0

    def __post_init__(self):
        if self.schedule_step not in ("batch", "epoch"):
            raise ValueError(f"schedule_step must be 'batch' or 'epoch', got {self.schedule_step!r}")

    @property
    def per_batch(self):
        """Whether the schedule advances after every optimizer step (else once per epoch)."""
        return self.schedule_step == "batch"

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def recorded(self):
        """The fields written into each eval/<set>_run<r>.json (RECORDED)."""
        return {key: getattr(self, key) for key in RECORDED}

    @classmethod
    def for_phase(cls, cfg, *, ipc, class_size, per_class):
        """The filter and evaluation recipe (section `train`, `aug`).

        Unset epochs / batch size follow the paper's rules: epochs by the final ratio ipc / class size,
        batch size by the ratio of the current synthetic images per class to the class size.
        """
        t, a = cfg["train"], cfg["aug"]
        return cls(epochs=t["epochs"] or paper_epochs(ipc, class_size),
                   batch_size=t["batch_size"] or paper_batch_size(per_class, class_size),
                   lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"],
                   warmup_epochs=t["warmup_epochs"], warmup_start=t["warmup_start"], schedule_step=t["schedule_step"],
                   temperature=t["temperature"], scale_min=a["scale_min"], flip=a["flip"],
                   channels_last=t["channels_last"], compile=t["compile"], checkpoint_every=t["checkpoint_every"])

    @classmethod
    def for_evaluation(cls, cfg, *, class_size):
        """The recipe of every evaluation model: the phase recipe of a final set (ccfs.ipc per class)."""
        ipc = cfg["ccfs"]["ipc"]
        return cls.for_phase(cfg, ipc=ipc, class_size=class_size, per_class=ipc)

    @classmethod
    def for_teacher(cls, cfg):
        """The teacher's recipe (section `teacher`; trained on the full real training set, never compiled)."""
        t, a = cfg["teacher"], cfg["aug"]
        return cls(epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"], weight_decay=t["weight_decay"],
                   warmup_epochs=t["warmup_epochs"], scale_min=a["scale_min"], flip=a["flip"],
                   crop=t["crop"] or "resized", padding=t["padding"],
                   channels_last=cfg["train"]["channels_last"], checkpoint_every=cfg["train"]["checkpoint_every"])

    @classmethod
    def for_scores(cls, cfg):
        """The recipe of each training-dynamics score run (section `scores`; no warm-up, never compiled)."""
        s, t, a = cfg["scores"], cfg["train"], cfg["aug"]
        return cls(epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], momentum=t["momentum"],
                   weight_decay=s["weight_decay"], scale_min=a["scale_min"], flip=a["flip"],
                   channels_last=t["channels_last"], checkpoint_every=t["checkpoint_every"])


RECORDED = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs", "warmup_start",
            "schedule_step", "scale_min", "flip")   # the recipe written into each eval/<set>_run<r>.json


class Session:
    """What train_model and stream_train.train_stream share around their step loops: the optimizer and
    schedule of the recipe, the (compiled) forwards, the checkpoint's load and save, the epoch end and
    the tear-down. `model` is on the device already (in its memory format)."""

    def __init__(self, accelerator, model, recipe, steps_per_epoch, *, teacher, memory_format):
        self.accelerator, self.recipe, self.steps_per_epoch = accelerator, recipe, steps_per_epoch
        self.scaler = fresh_scaler(accelerator)        # fp16: this training's own, saved with its state
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                    weight_decay=recipe.weight_decay)
        self.ddp_model, optimizer = accelerator.prepare(model, optimizer)
        # Accelerate's optimizer wrapper matters only for fp16 loss scaling; elsewhere the plain optimizer is
        # stepped: AcceleratedOptimizer.step looks up packages on every step (its cost: BENCHMARKS.md)
        self.optimizer = optimizer if accelerator.scaler is not None else optimizer.optimizer
        unit = steps_per_epoch if recipe.per_batch else 1          # scheduler steps per epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(recipe.epochs * unit, recipe.warmup_epochs * unit, recipe.warmup_start))
        self.has_teacher = teacher is not None
        if teacher is not None:
            teacher = teacher.to(accelerator.device, memory_format=memory_format).eval()
        self.student_forward = compiled(self.ddp_model, recipe.compile)
        self.teacher_forward = compiled(teacher, recipe.compile) if teacher is not None else None
        self.teacher_autocast = (accelerator.autocast if accelerator.mixed_precision != "no"
                                 else contextlib.nullcontext)
        self.unwrapped = accelerator.unwrap_model(self.ddp_model)

    def step(self, x, targets, rows, on_batch):
        train_step(self.accelerator, self.optimizer, self.scheduler if self.recipe.per_batch else None,
                   self.student_forward, x, targets, teacher_forward=self.teacher_forward,
                   teacher_autocast=self.teacher_autocast, temperature=self.recipe.temperature,
                   on_batch=on_batch, rows=rows)

    def resume(self, checkpoint, generators, extra_state=None):
        """The first epoch to train: 0, or the one after the state saved at `checkpoint` (weights, optimizer,
        schedule, the fp16 loss scaler, the named random `generators` and `extra_state`, restored in place)."""
        if not (checkpoint and os.path.exists(checkpoint)):
            return 0
        try:
            # to the CPU first: under torchrun accelerator.device can be "cpu:0", which torch.load refuses
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            self.unwrapped.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
            for name, generator in generators.items():
                generator.set_state(state[name].cpu())
            if extra_state is not None:
                extra_state.load_state_dict(state["extra"])
            return state["epoch"] + 1
        except Exception as exc:                 # noqa: BLE001 - a damaged or foreign file, not a bug here
            raise unresumable(checkpoint, exc) from None

    def end_epoch(self, epoch, on_epoch_end, checkpoint, generators, extra_state=None):
        """The per-epoch schedule step, `on_epoch_end(epoch, model)`, and the periodic checkpoint."""
        if not self.recipe.per_batch:
            self.scheduler.step()
        if on_epoch_end is not None:
            on_epoch_end(epoch, self.unwrapped)
            if not all(m.training for m in self.ddp_model.modules()):   # the hook evaluated the model
                self.ddp_model.train()
        every, epochs = self.recipe.checkpoint_every, self.recipe.epochs
        if checkpoint and every > 0 and (epoch + 1) % every == 0 and epoch + 1 < epochs:
            if self.accelerator.is_main_process:
                save_torch(checkpoint, {
                    "model": self.unwrapped.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "epoch": epoch,
                    **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
                    **{name: generator.get_state() for name, generator in generators.items()},
                    **({"extra": extra_state.state_dict()} if extra_state is not None else {})})
            self.accelerator.wait_for_everyone()

    def clock(self):
        """time.perf_counter() once the device has finished its queued work: a training's timing points."""
        _sync(self.accelerator.device)
        return time.perf_counter()

    def stats(self, seconds, images):
        """The figures every training returns: its time, images trained on (all ranks), and the recipe's size."""
        r = self.recipe
        return {"seconds": seconds, "images": images, "images_per_s": images / max(seconds, 1e-9),
                "epochs": r.epochs, "batch_size": r.batch_size, "steps": r.epochs * self.steps_per_epoch}

    def finish(self, checkpoint, *, broadcast):
        """The trained model (unwrapped, in eval mode; with `broadcast`, every rank holds rank 0's state);
        the checkpoint is deleted."""
        accelerator = self.accelerator
        model = accelerator.unwrap_model(self.ddp_model, keep_fp32_wrapper=False)
        if broadcast:
            broadcast_state(accelerator, model)  # every rank holds rank 0's buffers: the state that is saved
        accelerator.free_memory()
        accelerator.wait_for_everyone()
        if checkpoint and accelerator.is_main_process and os.path.exists(checkpoint):
            os.remove(checkpoint)
        return model.eval()


def train_model(accelerator, model, images, labels, recipe, *, norm, teacher=None, seed=0, desc="train",
                on_epoch_end=None, on_batch=None, checkpoint=None, extra_state=None):
    """Train `model` in place on uint8 `images` (N,C,H,W) with int64 `labels` by `recipe` (a Recipe);
    return (model, stats).

    `images` is a tensor (moved whole to the device) or a numpy array such as the read-only memmap of a
    shared set (synthetic.Stored): then each chunk's rows are gathered on the host and only they are moved,
    with the same order and augmentation (the same result).

    `norm` (a data.pool.Norm: mean, std per channel) normalises the uint8 images (in the Augment views).
    With `teacher` the loss is KD at the recipe's temperature (labels unused), else cross-entropy.
    `on_epoch_end(epoch, model)` is called on every rank after each epoch (for periodic evaluation).
    `on_batch(rows, logits)` is called on every rank after each forward pass, before the optimizer
    step, with this rank's rows of `images` (int64, on the device; a row may repeat where the last batch
    of an epoch wraps around) and the detached logits of their augmented views (training dynamics).
    With `checkpoint` (a path) and the recipe's `checkpoint_every` > 0, the full training state (weights,
    optimizer, schedule, random generators, the fp16 loss scaler) is saved every that many epochs, training continues from it
    when it exists, and it is deleted at the end: a killed run resumes mid-training and ends exactly as an
    uninterrupted one. `extra_state` (an object with state_dict() -> dict of tensors and load_state_dict())
    is saved and restored with it: what `on_epoch_end` accumulates (a score run's training dynamics).
    """
    r = recipe
    device = accelerator.device
    n = len(images)
    rank, world = rank_world(accelerator)
    memory_format = torch.channels_last if r.channels_last else torch.contiguous_format
    on_host = isinstance(images, np.ndarray)             # a shared set: rows gathered on the host per chunk
    if not on_host:
        images = images.to(device).contiguous(memory_format=memory_format)
    labels = labels.to(device)
    augment = Augment(norm, images.shape[-1], scale_min=r.scale_min, flip=r.flip, crop=r.crop,
                      padding=r.padding)
    height, width = images.shape[2], images.shape[3]
    batch_size, epochs = r.batch_size, r.epochs

    split = world > 1                    # a data-parallel training (else `accelerator` is a dist.OneRankAccelerator)
    if split and device.type == "cuda":  # global BatchNorm statistics (torch has no CPU SyncBatchNorm)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=memory_format)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    session = Session(accelerator, model, r, steps_per_epoch, teacher=teacher, memory_format=memory_format)
    lo, hi = rank_slice(batch_size, rank, world)          # this rank's rows of every (full) global batch
    share = hi - lo
    # batches augmented together (per-sample results are the same): fewer, larger kernels per step
    chunk_steps = max(1, min(steps_per_epoch, AUG_CHUNK_BYTES // max(1, share * math.prod(images.shape[1:]) * 4)))

    generators = generators_of(seed)       # on the CPU (augment._rand); the boxes are moved to the device
    order_gen, aug_gen = generators["order_gen"], generators["aug_gen"]
    first_epoch = session.resume(checkpoint, generators, extra_state)
    start = session.clock()
    seen = 0
    lrs = []                                              # lr at the first step of each epoch trained here
    session.ddp_model.train()
    for epoch in track(range(first_epoch, epochs), desc=desc, main=accelerator.is_main_process,
                       initial=first_epoch, total=epochs, unit="epochs"):
        lrs.append(session.optimizer.param_groups[0]["lr"])
        # this rank's rows of every global batch of the epoch: steps x share (on the host; a copy on the device)
        mine_host = epoch_order(order_gen, n, steps_per_epoch, batch_size)[:, lo:hi]
        mine = mine_host.to(device)
        boxes, flips = epoch_boxes(augment, steps_per_epoch * batch_size, height, width, aug_gen, device)
        my_boxes = boxes.view(steps_per_epoch, batch_size, 4)[:, lo:hi]
        my_flips = flips.view(steps_per_epoch, batch_size)[:, lo:hi]
        for step in range(steps_per_epoch):
            j = step % chunk_steps
            if j == 0:                                     # augment the next chunk_steps batches at once
                part = slice(step, step + chunk_steps)
                chunk_idx = mine[part].reshape(-1)
                if on_host:                                # take: a new contiguous array, as index_select gives
                    rows = torch.from_numpy(images.take(mine_host[part].reshape(-1).numpy(), axis=0)).to(device)
                else:                                      # index_select: see pool.TensorPool.batches
                    rows = images.index_select(0, chunk_idx)
                chunk_x = augment.apply(rows, my_boxes[part].reshape(-1, 4), my_flips[part].reshape(-1))
                if r.channels_last:
                    chunk_x = chunk_x.contiguous(memory_format=torch.channels_last)
            idx = chunk_idx[j * share:(j + 1) * share]
            session.step(chunk_x[j * share:(j + 1) * share], labels[idx] if teacher is None else None, idx, on_batch)
            seen += batch_size
        session.end_epoch(epoch, on_epoch_end, checkpoint, generators, extra_state)
    seconds = session.clock() - start
    model = session.finish(checkpoint, broadcast=split)
    return model, {**session.stats(seconds, seen), "lrs": lrs}
