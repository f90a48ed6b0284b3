"""Per-sample difficulty scores of the real training set, computed in parallel (`ccfs scores`).

    compute_scores(accelerator, cfg, data, method, out_path) -> (scores, method)
    compute_score_files(accelerator, cfg, data, {method: out_path}) -> {method: scores}
    training_dynamics(accelerator, cfg, data) -> ({"forgetting", "loss", "el2n": float32 array}, info)

Training-dynamics scores (forgetting, loss, el2n) come from `scores.runs` models trained with
different seeds on the full real training set, with `train_model`. Each run trains whole on one rank
(runs dealt to ranks), unless the plan's rule splits one training over the ranks (plan.runs_data_parallel):
then every rank trains on its share of each global batch. One training session yields all three.
Checkpoint scores (margin, logits) are one scoring pass of a given model (`scores.checkpoint`,
default the teacher's) with the distributed prediction pass (predict.py).

How correctness is observed (Toneva et al. 2019, "An empirical study of example forgetting"):
on the training forward pass itself, i.e. on the augmented view, before the optimizer step, each
time the sample appears in a minibatch. That is the paper's definition and costs nothing (no extra
pass over the data). `train_model` hands every rank's rows and detached logits to `on_batch`; each
rank keeps its observations of the epoch and they are gathered once per epoch (`dist.gather_rows`;
a run trained whole on one rank gathers nothing).

One observation per sample per epoch: the training loop wraps its last batch around, so a sample
may be presented twice in an epoch; the LAST presentation in the epoch counts (order: step, then
position in the global batch). Every sample is presented at least once per epoch, so a run gives
exactly E observations per sample (E = scores.epochs). Then, per run:

  forgetting  number of correct -> incorrect transitions between consecutive epochs' observations.
              A sample never classified correctly in the run ("never learned") gets E. A learned
              sample has f <= floor(E / 2) < E events (a forgetting event needs a correct
              observation before it), so never-learned samples rank above every learned one.
              Averaged over runs (the official CIFAR files look like a mean over 5 runs).
  loss        cross-entropy of the observation in each epoch; the per-epoch curve is smoothed with a
              Gaussian over epochs (sigma scores.loss_sigma = 3, scipy.ndimage.gaussian_filter1d
              semantics: reflect at the ends, truncate at 4 sigma) and the value at the last epoch is
              taken (BiLP). Averaged over runs (smoothing is linear, so the order does not matter).
  el2n        || softmax(logits) - onehot(label) ||_2 of the observation in epoch scores.el2n_epoch
              (1-based; default 20 % of the epochs), averaged over runs (Paul et al. 2021 use a fixed
              early checkpoint on clean inputs; here it is the augmented training view of that epoch).

Larger = harder for all three (difficulty.HARDER_IS_HIGHER); margin and logits: larger = easier.

Output: float32 .npy of length N aligned with the global index, and a JSON beside it (same stem)
with method, data set, N, runs, epochs, model, seeds and the sha256 fingerprint of the labels
(`difficulty.labels_fingerprint`), both written atomically by rank 0.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from ccfs_dist.runtime import io, seeds
from ccfs_dist.ccfs.difficulty import CHECKPOINT, DYNAMICS, HARDER_IS_HIGHER, METHODS, labels_fingerprint, load_score_file
from ccfs_dist.runtime.dist import OneRankAccelerator, dealt, gather_rows, log, step_rank_key
from ccfs_dist.errors import CCFSError, ConfigError, DataError
from ccfs_dist.training.fused import train_fused
from ccfs_dist.training.models import build_model, load_checkpoint, seeded_model
from ccfs_dist.runtime.plan import runs_data_parallel
from ccfs_dist.training.predict import predict
from ccfs_dist.training.stream_train import stream_options, streams, train_stream
from ccfs_dist.training.train import Recipe, train_model

_KEY_STRIDE = 1 << 24                              # > any local batch size: orders observations in an epoch


def el2n_epoch(scores_cfg):
    """The 1-based epoch whose observations give EL2N: scores.el2n_epoch, else 20 % of the epochs."""
    e = scores_cfg["el2n_epoch"]
    return int(e) if e is not None else max(1, int(round(0.2 * scores_cfg["epochs"])))


def seeds_of(cfg):
    return [seeds.score_run(cfg["seed"], r) for r in range(cfg["scores"]["runs"])]


def gaussian_last_weights(epochs, sigma, truncate=4.0):
    """Weights w (length `epochs`, sum 1) with  sum_e w[e] * x[e] == gaussian_filter1d(x, sigma)[-1].

    Same kernel and boundary as scipy.ndimage.gaussian_filter1d(mode="reflect", truncate=4):
    radius int(truncate * sigma + 0.5), reflection about the half-sample ends (d c b a | a b c d | d c b a).
    """
    radius = int(truncate * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / float(sigma)) ** 2)
    kernel /= kernel.sum()
    pos = np.mod(epochs - 1 + offsets, 2 * epochs)
    pos = np.where(pos >= epochs, 2 * epochs - 1 - pos, pos)
    weights = np.zeros(epochs)
    np.add.at(weights, pos, kernel)
    return weights


class TrainingDynamics:
    """Per-sample training dynamics of ONE run, fed by train_model's `on_batch` / `on_epoch_end`.

    Holds O(N) state; the epoch's observations (about N / world per rank) are gathered once per epoch.
    The result is identical on every rank.
    """

    def __init__(self, accelerator, labels, epochs, el2n_at, loss_weights):
        self.acc = accelerator
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(accelerator.device)
        self.n, self.epochs, self.el2n_at = len(self.labels), int(epochs), int(el2n_at)
        self.loss_weights = np.asarray(loss_weights, dtype=np.float64)
        if len(self.loss_weights) != self.epochs:
            raise ValueError(f"{len(self.loss_weights)} loss weights for {self.epochs} epochs")
        self.events = np.zeros(self.n, dtype=np.int64)       # correct -> incorrect transitions
        self.learned = np.zeros(self.n, dtype=bool)           # correct at least once
        self.previous = np.zeros(self.n, dtype=bool)          # last epoch's correctness
        self.loss = np.zeros(self.n, dtype=np.float64)        # Gaussian-weighted sum of per-epoch losses
        self.el2n = np.full(self.n, np.nan)
        self.epochs_seen = 0
        self._parts, self._step = [], 0

    def state_dict(self):
        """The running scores after `epochs_seen` epochs, as tensors (saved with a score run's training state)."""
        return {"events": torch.from_numpy(self.events), "learned": torch.from_numpy(self.learned),
                "previous": torch.from_numpy(self.previous), "loss": torch.from_numpy(self.loss),
                "el2n": torch.from_numpy(self.el2n), "epochs_seen": torch.tensor(self.epochs_seen)}

    def load_state_dict(self, state):
        if len(state["events"]) != self.n:
            raise ValueError(f"training dynamics of {len(state['events'])} samples, this pool has {self.n}")
        for name in ("events", "learned", "previous", "loss", "el2n"):
            setattr(self, name, state[name].numpy().copy())
        self.epochs_seen = int(state["epochs_seen"])
        self._parts, self._step = [], 0

    @torch.no_grad()
    def on_batch(self, rows, logits):
        """Record this rank's observations of one training step (called before the optimizer step)."""
        logits = logits.detach().float()
        y = self.labels[rows]
        key = (step_rank_key(self.acc, self._step) * _KEY_STRIDE
               + torch.arange(len(rows), device=rows.device))
        prob = logits.softmax(1)
        self._parts.append({
            "row": rows.to(torch.int64), "key": key,
            "correct": (logits.argmax(1) == y).to(torch.int64),
            "loss": F.cross_entropy(logits, y, reduction="none"),
            "el2n": (prob - F.one_hot(y, logits.shape[1]).float()).norm(dim=1),
        })
        self._step += 1

    def end_epoch(self, epoch):
        """Gather the epoch's observations, keep each sample's last one, update the running scores."""
        if epoch != self.epochs_seen:
            raise RuntimeError(f"training dynamics: expected the end of epoch {self.epochs_seen}, got {epoch}")
        device = self.acc.device
        if self._parts:
            local = {k: torch.cat([p[k] for p in self._parts]) for k in self._parts[0]}
        else:
            local = {"row": torch.empty(0, dtype=torch.int64, device=device),
                     "key": torch.empty(0, dtype=torch.int64, device=device),
                     "correct": torch.empty(0, dtype=torch.int64, device=device),
                     "loss": torch.empty(0, device=device), "el2n": torch.empty(0, device=device)}
        self._parts, self._step = [], 0
        obs = {k: v.numpy() for k, v in gather_rows(self.acc, local).items()}

        order = np.argsort(obs["key"], kind="stable")                   # presentation order in the epoch
        rows = obs["row"][order]
        uniq, first_from_end = np.unique(rows[::-1], return_index=True)
        if len(uniq) != self.n or (self.n and (uniq[0] != 0 or uniq[-1] != self.n - 1)):
            missing = np.setdiff1d(np.arange(self.n), uniq)
            raise RuntimeError(f"training dynamics: epoch {epoch} observed {len(uniq)} of {self.n} samples "
                               f"(first missing {missing[:10].tolist()})")
        last = order[len(order) - 1 - first_from_end]                  # last presentation of rows 0..n-1
        correct = obs["correct"][last].astype(bool)

        if epoch > 0:
            self.events += self.previous & ~correct
        self.learned |= correct
        self.previous = correct
        self.loss += self.loss_weights[epoch] * obs["loss"][last].astype(np.float64)
        if epoch + 1 == self.el2n_at:
            self.el2n = obs["el2n"][last].astype(np.float64)
        self.epochs_seen += 1

    def result(self):
        """{"forgetting", "loss", "el2n"}: float64 arrays of length N (this run)."""
        if self.epochs_seen != self.epochs:
            raise RuntimeError(f"training dynamics: {self.epochs_seen} of {self.epochs} epochs recorded")
        forgetting = np.where(self.learned, self.events, self.epochs).astype(np.float64)
        return {"forgetting": forgetting, "loss": self.loss.copy(), "el2n": self.el2n.copy()}


def _fresh_run(accelerator, cfg, data, r):
    """Score run r's seed, freshly initialised model and empty TrainingDynamics."""
    s = cfg["scores"]
    epochs, seed = s["epochs"], seeds.score_run(cfg["seed"], r)
    model = seeded_model(cfg["model"], data, seed)
    dyn = TrainingDynamics(accelerator, data.train.labels, epochs, el2n_epoch(s),
                           gaussian_last_weights(epochs, s["loss_sigma"]))
    return seed, model, dyn


def _ended(accelerator, cfg, r, seed, dyn, seconds):
    """(scores, info) of a finished score run, logged."""
    runs = cfg["scores"]["runs"]
    info = {"seconds": seconds, "accuracy": float(dyn.previous.mean()),
            "never_learned": int((~dyn.learned).sum()), "events": int(dyn.events.sum())}
    log(accelerator, f"scores run {r + 1}/{runs} (seed {seed}): last-epoch training accuracy "
                      f"{info['accuracy']:.4f}, never learned {info['never_learned']}, "
                      f"forgetting events {info['events']}")
    return dyn.result(), info


def dynamics_run(accelerator, cfg, data, r, checkpoint=None):
    """Training run `r` of the training-dynamics scores: ({method: float64 array}, info). `accelerator` is a
    dist.OneRankAccelerator for a run trained whole on one rank, or the Accelerator for one split over the ranks.
    `checkpoint`: where the run keeps its training state and running scores (train.checkpoint_every), so
    that a killed run continues from its last checkpoint to the same scores."""
    s, rec = cfg["scores"], Recipe.for_scores(cfg)
    seed, model, dyn = _fresh_run(accelerator, cfg, data, r)
    kw = dict(norm=data.norm, seed=seed, desc=f"scores run {r + 1}/{s['runs']}",
              on_batch=dyn.on_batch, on_epoch_end=lambda epoch, _model: dyn.end_epoch(epoch),
              checkpoint=checkpoint, extra_state=dyn)
    if data.train.in_memory:
        _, stats = train_model(accelerator, model, data.train.images, data.train.labels, rec, **kw)
    else:                                     # a streamed pool: train on the shards (stream_train)
        _, stats = train_stream(accelerator, model, data.train, rec, **kw, **stream_options(cfg))
    return _ended(accelerator, cfg, r, seed, dyn, stats["seconds"])


def dynamics_runs_fused(accelerator, cfg, data, runs, checkpoints):
    """Score runs `runs` (an in-memory pool) as one fused training (fused.py, plan.fuse), each as dynamics_run
    trains it alone up to float order: [(scores, info)] in order; `checkpoints`: one state file per run."""
    s, rec = cfg["scores"], Recipe.for_scores(cfg)
    fresh = [_fresh_run(accelerator, cfg, data, r) for r in runs]
    dyns = [dyn for _, _, dyn in fresh]
    trained = train_fused(accelerator, [model for _, model, _ in fresh], [(data.train.images, data.train.labels)] *
                          len(runs), rec, norm=data.norm, seeds=[seed for seed, _, _ in fresh],
                          desc=f"scores runs {', '.join(str(r + 1) for r in runs)}/{s['runs']} fused",
                          on_batch=[dyn.on_batch for dyn in dyns],
                          on_epoch_end=[lambda epoch, _model, dyn=dyn: dyn.end_epoch(epoch) for dyn in dyns],
                          checkpoints=checkpoints, extra_states=dyns)
    return [_ended(accelerator, cfg, r, seed, dyn, stats["seconds"])
            for r, (seed, _, dyn), (_, stats) in zip(runs, fresh, trained)]


def combine_runs(runs):
    """[(result, info) of run 0, 1, ...] -> ({method: float32 scores}, info): the mean over runs."""
    sums = {m: np.zeros(len(runs[0][0][m])) for m in DYNAMICS}
    for result, _ in runs:                               # in run order: the same sums on any process count
        for m in DYNAMICS:
            sums[m] += result[m]
    scores = {m: (sums[m] / len(runs)).astype(np.float32) for m in DYNAMICS}
    info = {"seconds": sum(i["seconds"] for _, i in runs),
            "last_epoch_train_accuracy": [i["accuracy"] for _, i in runs]}
    return scores, info


def training_dynamics(accelerator, cfg, data):
    """Train cfg.scores.runs models on data.train; return ({method: float32 scores}, info).

    Each run trains whole on one rank (runs dealt round-robin; their results all-gathered) unless the
    plan's rule splits it (plan.runs_data_parallel), then every run is data-parallel over all ranks; so is
    every run on a pool streamed over the ranks (stream_train.streams: larger than stream.shuffle_buffer; a
    smaller streamed pool is read whole by each run and trained as in memory, with the same result).
    """
    s = cfg["scores"]
    world = accelerator.num_processes
    streamed = streams(cfg, data.train)
    if streamed or runs_data_parallel(s["batch_size"], world, cfg["train"]["min_batch_per_rank"]):
        return combine_runs([dynamics_run(accelerator, cfg, data, r) for r in range(s["runs"])])
    if world == 1:
        return combine_runs([dynamics_run(OneRankAccelerator(accelerator), cfg, data, r) for r in range(s["runs"])])
    mine = {r: dynamics_run(OneRankAccelerator(accelerator), cfg, data, r) for r in dealt(accelerator, s["runs"])}
    local = {"run": torch.tensor(list(mine), dtype=torch.int64),
             "info": torch.tensor([[i["seconds"], i["accuracy"]] for _, i in mine.values()],
                                  dtype=torch.float64).reshape(-1, 2)}
    for m in DYNAMICS:
        local[m] = (torch.from_numpy(np.stack([result[m] for result, _ in mine.values()])) if mine
                    else torch.empty((0, len(data.train)), dtype=torch.float64))
    got = gather_rows(accelerator, local)
    runs = [({m: got[m][i].numpy() for m in DYNAMICS},
             {"seconds": float(got["info"][i, 0]), "accuracy": float(got["info"][i, 1])})
            for i in torch.argsort(got["run"]).tolist()]                     # in run order
    return combine_runs(runs)


def checkpoint_path(cfg):
    path = cfg["scores"]["checkpoint"] or cfg["teacher"]["checkpoint"]
    if not path:
        raise ConfigError("margin and logits scores need a trained model: set scores.checkpoint (or "
                          "teacher.checkpoint) to a state dict, e.g. runs/<name>/teacher.pt")
    return path


def checkpoint_scores(accelerator, cfg, data):
    """{"margin", "logits"}: float32 scores of the checkpoint model on the clean training set."""
    path = checkpoint_path(cfg)
    torch.manual_seed(cfg["seed"])
    model = load_checkpoint(build_model(cfg["model"], data.num_classes, data.channels, data.image_size), path)
    results, _ = predict(accelerator, model, data.train, np.arange(len(data.train)),
                         norm=data.norm, batch_size=cfg["predict"]["batch_size"],
                         channels_last=cfg["train"]["channels_last"], desc="scores (checkpoint)")
    return {"margin": results["margin"].astype(np.float32), "logits": results["true_logit"].astype(np.float32)}


def settings(cfg, method):
    """What determines the scores of `method` (besides the data): compared before reusing a file."""
    s = cfg["scores"]
    if method in CHECKPOINT:
        return {"checkpoint": checkpoint_path(cfg), "model": dict(cfg["model"])}
    out = {"runs": s["runs"], "epochs": s["epochs"], "batch_size": s["batch_size"], "lr": s["lr"],
           "weight_decay": s["weight_decay"], "momentum": cfg["train"]["momentum"], "seeds": seeds_of(cfg),
           "model": dict(cfg["model"]), "aug": dict(cfg["aug"])}
    if method == "el2n":
        out["el2n_epoch"] = el2n_epoch(s)
    if method == "loss":
        out["loss_sigma"] = s["loss_sigma"]
    return out


OBSERVATION = ("training forward pass (augmented view, before the optimizer step); one observation per "
               "sample per epoch: the last presentation in the epoch")


WRITER = "ccfs scores"            # the sidecar's `written_by`: what --overwrite may replace


def written_by_scores(path):
    """Refuse (CCFSError) to replace the score file `path` or its sidecar unless the sidecar says that
    `ccfs scores` (or a run) wrote them: --overwrite never replaces a file the user made."""
    npy, sidecar_path = os.fspath(path), os.path.splitext(os.fspath(path))[0] + ".json"
    if not (os.path.lexists(npy) or os.path.lexists(sidecar_path)):
        return
    meta = None
    if os.path.isfile(sidecar_path) and not os.path.islink(sidecar_path):
        try:
            meta = io.read_json(sidecar_path, "score sidecar")
        except DataError:
            meta = None
    ours = isinstance(meta, dict) and (meta.get("written_by") == WRITER or
                                       {"method", "labels_sha256", "settings"} <= set(meta))
    if not ours or (os.path.lexists(npy) and (os.path.islink(npy) or not os.path.isfile(npy))):
        raise CCFSError(f"--out '{npy}' (or its sidecar {sidecar_path}) exists but was not written by "
                        f"`ccfs scores` (no sidecar that says so); --overwrite replaces only score files it "
                        f"wrote: choose another --out")


def sidecar(cfg, data, method, values, world, info):
    meta = {"written_by": WRITER, "method": method, "data": data.name, "n": len(data.train), "num_classes": data.num_classes,
            "labels_sha256": labels_fingerprint(data.train.labels.numpy()),
            "harder_is_higher": HARDER_IS_HIGHER[method], "settings": settings(cfg, method)}
    s = meta["settings"]
    if method in DYNAMICS:
        meta.update({"runs": s["runs"], "epochs": s["epochs"], "model": s["model"]["name"], "seeds": s["seeds"],
                     "observation": OBSERVATION})
    if method == "forgetting":
        meta["never_learned_value"] = s["epochs"]
    meta.update({"processes": world, "mixed_precision": cfg["train"]["mixed_precision"],
                 "stats": {"min": float(values.min()), "mean": float(values.mean()), "max": float(values.max())}})
    meta.update(info)
    return meta


def _reusable(path, method, cfg, data):
    """Scores from an existing file at `path` (validated), or a DataError if it was made otherwise."""
    scores, _ = load_score_file(path, len(data.train), labels=data.train.labels.numpy(), method=method)
    meta = io.read_json(os.path.splitext(path)[0] + ".json", "score sidecar") if os.path.exists(
        os.path.splitext(path)[0] + ".json") else {}
    if meta.get("method", method) != method:
        raise DataError(f"score file {path} holds {meta['method']!r} scores, not {method!r}; delete it or "
                        f"choose another path")
    want = settings(cfg, method)
    have = meta.get("settings")
    if have is not None and have != want:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        detail = "; ".join(f"{k}: file {have.get(k)!r}, config {want.get(k)!r}" for k in diff)
        raise DataError(f"score file {path} was computed with other settings ({detail}); delete it to "
                        f"recompute, or restore those settings")
    return scores


def compute_score_files(accelerator, cfg, data, paths, reuse=True, runs=None):
    """Compute (or, with `reuse`, load where present) the scores {method: out_path}; rank 0 writes them.
    `runs`: the training-dynamics runs' [(result, info), ...] when they were trained already (the curriculum
    deals them to ranks as jobs of its plan), else they are trained here (training_dynamics).

    Training-dynamics methods share one training session. Returns {method: float64 scores}, identical
    on every rank and equal to what `difficulty.load_score_file` reads back from the written files.
    """
    unknown = [m for m in paths if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown score method(s) {unknown}; known: {', '.join(METHODS)}")
    out = {}
    for method, path in paths.items():
        if reuse and os.path.exists(path):
            out[method] = _reusable(path, method, cfg, data)
            log(accelerator, f"scores: reusing {method} scores from {path}")
    todo = [m for m in paths if m not in out]
    computed, info = {}, {}
    if any(m in DYNAMICS for m in todo):
        s = cfg["scores"]
        log(accelerator, f"scores: {'trained' if runs is not None else 'training'} {s['runs']} x {s['epochs']} epochs of {cfg['model']['name']} on "
                          f"{len(data.train)} {data.name} samples for {', '.join(m for m in todo if m in DYNAMICS)} "
                          f"({accelerator.num_processes} process(es))")
        dyn, info = combine_runs(runs) if runs is not None else training_dynamics(accelerator, cfg, data)
        computed.update(dyn)
    if any(m in CHECKPOINT for m in todo):
        computed.update(checkpoint_scores(accelerator, cfg, data))
    for method in todo:
        values = computed[method]
        if not np.isfinite(values).all():
            raise DataError(f"{method} scores hold NaN or inf (diverged training?); lower scores.lr")
        meta = sidecar(cfg, data, method, values, accelerator.num_processes,
                       {"seconds": round(info.get("seconds", 0.0), 3)} if method in DYNAMICS else {})
        path = paths[method]
        if accelerator.is_main_process:
            io.write_npy(path, values)
            io.write_json(os.path.splitext(path)[0] + ".json", meta)
        out[method] = values.astype(np.float64)
    accelerator.wait_for_everyone()
    return out


def compute_scores(accelerator, cfg, data, method, out_path):
    """Scores of `method` for data.train written to `out_path` (reused if present); -> (scores, method).

    The curriculum calls this when ccfs.difficulty names a computed method (forgetting | loss | el2n).
    """
    return compute_score_files(accelerator, cfg, data, {method: os.fspath(out_path)})[method], method
