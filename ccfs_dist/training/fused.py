"""Fused independent trainings: K models of one shape trained by one recipe as one step (torch.func).

    train_fused(accelerator, models, sets, recipe, *, norm, seeds, teacher=None, ...) -> [(model, stats)]

A small training (batch 32-64, a small model) is bound by per-operation overhead (kernel launches, Python),
not by arithmetic; K such trainings stacked into one step pay that overhead once. The K models' parameters
and buffers are stacked (`torch.func.stack_module_state`) and one `vmap`-ed `functional_call` runs each
model on its own batch; the BatchNorm running statistics are stacked buffers too, so each model updates
its own. One SGD optimizer steps the stacked parameters: momentum and weight decay act per element, and
the loss is the sum of the K models' losses, so each model's gradient is that of its own loss alone.

Each model keeps everything a training alone has (train.train_model with a dist.OneRankAccelerator): its own
set, its own order and augmentation generators (seeded from its own seed exactly as train_model seeds
them), its own lr schedule (the recipe's; equal for all, as the recipe and the step count are), its own
`on_epoch_end` / `on_batch` hooks and its own mid-training state file, in train.Session's format. With KD
the teacher runs once over the K batches together (it is in eval mode: per-sample results do not depend
on the batch). The models' results equal those of the same trainings alone up to floating-point order:
the batched convolutions and matrix products sum in another order (tests/test_fused.py bounds it).

The K state files are written as a group: all K as `<file>.next`, then each renamed over its file, so a
kill at any point leaves either K states of one epoch, or a set that `_resume` completes (every model
has a `.next`, or an already renamed file, of the new epoch) or rolls back (the `.next` files are
dropped). Fusion runs whole on one rank (the plan fuses only trainings that are not split); it supports
bf16 autocast, not fp16 loss scaling, torch.compile or channels_last (the plan does not fuse those: fusable).
"""
import contextlib
import copy
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from ccfs_dist.training.augment import Augment
from ccfs_dist.errors import DataError
from ccfs_dist.runtime.io import save_torch
from ccfs_dist.runtime.progress import track
from ccfs_dist.training.train import AUG_CHUNK_BYTES, _sync, epoch_boxes, epoch_order, generators_of, lr_lambda, unresumable


def fusable(recipe, mixed_precision):
    """Whether trainings by `recipe` can be fused (see the module doc): not fp16, compiled or channels_last."""
    return mixed_precision != "fp16" and not recipe.compile and not recipe.channels_last


class _Group:
    """The stacked state of K models: parameters (leaves of the optimizer), buffers, the functional forward."""

    def __init__(self, models, device):
        self.models = models
        for m in models:
            m.to(device).train()
        params, buffers = stack_module_state(models)
        self.names = list(params)
        self.params = params
        self.buffers = buffers
        self.base = copy.deepcopy(models[0]).to("meta").train()

    def forward(self, x):
        """(K, B, classes) logits of the K models on their batches x (K, B, C, H, W); updates each model's
        BatchNorm statistics in its slice of the stacked buffers."""
        def one(params, buffers, xb):
            return functional_call(self.base, (params, buffers), (xb,))
        return vmap(one)(self.params, self.buffers, x)

    @torch.no_grad()
    def unstack(self, k):
        """Model k as a module holding its current parameters and buffers."""
        model = self.models[k]
        for name, p in model.named_parameters():
            p.copy_(self.params[name][k])
        for name, b in model.named_buffers():
            b.copy_(self.buffers[name][k])
        return model

    @torch.no_grad()
    def restack(self, k, state):
        """Load model k's state dict (a checkpoint's) into its slice."""
        for name, t in state.items():
            (self.params if name in self.params else self.buffers)[name][k].copy_(t)


def _optimizer_of(state, k):
    """Model k's SGD state dict (as a training alone saves it) from the stacked optimizer's."""
    return {"state": {i: {key: v[k].clone() if torch.is_tensor(v) and v.dim() else v for key, v in s.items()}
                      for i, s in state["state"].items()},
            "param_groups": copy.deepcopy(state["param_groups"])}


def _stacked_optimizer(states):
    """The stacked optimizer's state dict from the K models' (each as a training alone saves it)."""
    first = states[0]
    stacked = {}
    for i, s in first["state"].items():
        stacked[i] = {key: torch.stack([st["state"][i][key] for st in states]) if torch.is_tensor(v) and v.dim()
                      else v for key, v in s.items()}
    return {"state": stacked, "param_groups": copy.deepcopy(first["param_groups"])}


def _load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:                  # noqa: BLE001 - a damaged or foreign file, not a bug here
        raise unresumable(path, exc) from None


def _resume(paths):
    """The K saved states of one epoch (the group's), or None to start afresh; completes or rolls back a
    group write that a kill interrupted (module doc)."""
    if not paths or not any(os.path.exists(p) or os.path.exists(p + ".next") for p in paths):
        return None
    newest = [p + ".next" if os.path.exists(p + ".next") else p for p in paths]
    if all(os.path.exists(p) for p in newest):
        states = [_load(p) for p in newest]
        if len({s["epoch"] for s in states}) == 1:
            for p in paths:                   # finish the interrupted renames
                if os.path.exists(p + ".next"):
                    os.replace(p + ".next", p)
            return states
    for p in paths:                           # roll back: the group's previous states
        if os.path.exists(p + ".next"):
            os.remove(p + ".next")
    if not all(os.path.exists(p) for p in paths):
        if not any(os.path.exists(p) for p in paths):
            return None
        raise DataError(f"training states {', '.join(p for p in paths if os.path.exists(p))} were saved by "
                        f"another grouping of these trainings (plan.fuse changed?); delete them to restart "
                        f"the trainings from their start")
    states = [_load(p) for p in paths]
    if len({s["epoch"] for s in states}) != 1:
        raise DataError(f"training states {', '.join(paths)} are of different epochs (plan.fuse changed?); "
                        f"delete them to restart the trainings from their start")
    return states


def _save(paths, states):
    for p, s in zip(paths, states):
        save_torch(p + ".next", s)
    for p in paths:
        os.replace(p + ".next", p)


def _per_model(value, count):
    """One value per model: K Nones for None, else the K given (hooks, state objects)."""
    if value is None:
        return [None] * count
    if len(value) != count:
        raise ValueError(f"expected {count} per-model values, got {len(value)}")
    return list(value)


def _moved(moved, x, device):
    """`x` (a tensor, or a numpy array such as a shared set's memmap: copied) on `device`, once per object."""
    if id(x) not in moved:
        moved[id(x)] = (torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x).to(device)
    return moved[id(x)]


def train_fused(accelerator, models, sets, recipe, *, norm, seeds, teacher=None, desc="fused",
                on_epoch_end=None, on_batch=None, checkpoints=None, extra_states=None):
    """Train the K `models` (one architecture) in place, model k on `sets[k]` = (uint8 images N,C,H,W as a
    tensor or numpy array, int64 labels) seeded `seeds[k]`, by `recipe`, as train.train_model trains each
    with a dist.OneRankAccelerator; return [(model, stats)] in order (stats as train_model's; `seconds` is the group's).

    The sets may differ but must give the same number of steps per epoch (the schedule is shared).
    `on_epoch_end`, `on_batch`, `checkpoints`, `extra_states`: None or one per model, as train_model's.
    """
    count = len(models)
    r = recipe
    device = accelerator.device
    batch = r.batch_size
    steps = {max(1, math.ceil(len(images) / batch)) for images, _ in sets}
    if len(steps) != 1 or len(sets) != count or len(seeds) != count:
        raise ValueError(f"fused trainings need one set and seed per model and equal steps per epoch, got "
                         f"{len(sets)} sets, {len(seeds)} seeds, steps {sorted(steps)}")
    steps_per_epoch = steps.pop()
    hooks, batch_hooks = _per_model(on_epoch_end, count), _per_model(on_batch, count)
    extras, paths = _per_model(extra_states, count), checkpoints
    moved = {}                                # a set given for several models is moved once
    images = [_moved(moved, x, device) for x, _ in sets]
    labels = [_moved(moved, y, device) for _, y in sets]
    augment = Augment(norm, images[0].shape[-1], scale_min=r.scale_min, flip=r.flip, crop=r.crop,
                      padding=r.padding)
    height, width = images[0].shape[2], images[0].shape[3]

    group = _Group(models, device)
    optimizer = torch.optim.SGD(list(group.params.values()), lr=r.lr, momentum=r.momentum,
                                weight_decay=r.weight_decay)
    unit = steps_per_epoch if r.per_batch else 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(r.epochs * unit, r.warmup_epochs * unit, r.warmup_start))
    if teacher is not None:
        teacher = teacher.to(device).eval()
    autocast = accelerator.autocast if accelerator.mixed_precision != "no" else None
    generators = [generators_of(s) for s in seeds]

    first_epoch = 0
    states = _resume(paths)
    if states is not None:
        for k, state in enumerate(states):
            group.restack(k, state["model"])
            for name, gen in generators[k].items():
                gen.set_state(state[name].cpu())
            if extras[k] is not None:
                extras[k].load_state_dict(state["extra"])
        optimizer.load_state_dict(_stacked_optimizer([s["optimizer"] for s in states]))
        scheduler.load_state_dict(states[0]["scheduler"])
        first_epoch = states[0]["epoch"] + 1

    per_sample = math.prod(images[0].shape[1:]) * 4
    chunk_steps = max(1, min(steps_per_epoch, AUG_CHUNK_BYTES // max(1, count * batch * per_sample)))
    _sync(device)
    start = time.perf_counter()
    seen, lrs = 0, []
    for epoch in track(range(first_epoch, r.epochs), desc=desc, main=accelerator.is_main_process,
                       initial=first_epoch, total=r.epochs, unit="epochs"):
        lrs.append(optimizer.param_groups[0]["lr"])
        rows, boxes, flips = [], [], []
        for k in range(count):              # as train_model draws them, from model k's own generators
            rows.append(epoch_order(generators[k]["order_gen"], len(images[k]), steps_per_epoch, batch).to(device))
            b, f = epoch_boxes(augment, steps_per_epoch * batch, height, width, generators[k]["aug_gen"], device)
            boxes.append(b.view(steps_per_epoch, batch, 4))
            flips.append(f.view(steps_per_epoch, batch))
        for step in range(steps_per_epoch):
            j = step % chunk_steps
            if j == 0:                      # augment the K models' next chunk_steps batches in one call
                part = slice(step, step + chunk_steps)
                chunk = torch.cat([images[k].index_select(0, rows[k][part].reshape(-1)) for k in range(count)])
                views = augment.apply(chunk, torch.cat([b[part].reshape(-1, 4) for b in boxes]),
                                      torch.cat([f[part].reshape(-1) for f in flips]))
                views = views.view(count, -1, *views.shape[1:])
            x = views[:, j * batch:(j + 1) * batch]
            idx = [rows[k][step] for k in range(count)]
            _step(group, optimizer, x, idx, labels, teacher, r.temperature, autocast, batch_hooks)
            if r.per_batch:
                scheduler.step()
            seen += batch
        if not r.per_batch:
            scheduler.step()
        for k, hook in enumerate(hooks):
            if hook is not None:
                hook(epoch, group.unstack(k))
        if paths and r.checkpoint_every > 0 and (epoch + 1) % r.checkpoint_every == 0 and epoch + 1 < r.epochs:
            stacked = optimizer.state_dict()
            _save(paths, [{"model": group.unstack(k).state_dict(), "optimizer": _optimizer_of(stacked, k),
                           "scheduler": scheduler.state_dict(), "epoch": epoch,
                           **{name: gen.get_state() for name, gen in generators[k].items()},
                           **({"extra": extras[k].state_dict()} if extras[k] is not None else {})}
                          for k in range(count)])
    _sync(device)
    seconds = time.perf_counter() - start
    results = []
    for k in range(count):
        model = group.unstack(k).eval()
        results.append((model, {"seconds": seconds, "images": seen, "images_per_s": seen / max(seconds, 1e-9),
                                "epochs": r.epochs, "batch_size": batch, "steps": r.epochs * steps_per_epoch,
                                "lrs": lrs, "fused": count}))
    for p in paths or ():
        if os.path.exists(p):
            os.remove(p)
    return results


def _step(group, optimizer, x, idx, labels, teacher, temperature, autocast, batch_hooks):
    """One optimizer step of every model: the sum of their losses (each its own batch's mean, as alone)."""
    count, batch = x.shape[0], x.shape[1]
    with (autocast or contextlib.nullcontext)():
        logits = group.forward(x)
    for k, hook in enumerate(batch_hooks):
        if hook is not None:
            hook(idx[k], logits[k].detach())
    logits = logits.float()
    if teacher is not None:
        with torch.no_grad(), (autocast or contextlib.nullcontext)():
            teacher_logits = teacher(x.reshape(count * batch, *x.shape[2:]))
        t = temperature
        log_p = F.log_softmax(logits / t, dim=-1)
        q = F.softmax(teacher_logits.float().view(count, batch, -1) / t, dim=-1)
        # F.kl_div(..., "batchmean") of each model: its sum over the batch / batch size
        loss = (F.kl_div(log_p, q, reduction="none").sum((1, 2)) / batch).sum() * (t * t)
    else:
        targets = torch.stack([labels[k][idx[k]] for k in range(count)])
        loss = F.cross_entropy(logits.reshape(count * batch, -1), targets.reshape(-1),
                               reduction="none").view(count, batch).mean(1).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
