"""The trainings of a run as jobs of its plan (plan.py): each is seeded by seeds.py, trains with the
accelerator it is given (a dist.Local when it runs whole on one rank), and writes its own artifact into
the run directory, atomically, last of all; a job whose artifact exists is skipped on resume.

    teacher        teacher.json (its training stats), teacher.pt             (rundir.Layout names them)
    score_run r    scores_runs/run<r>.npz  (the run's per-sample forgetting, loss, el2n)
    filter j       phase_<j>/filter.pt, phase_<j>/steps.json
    eval set r     eval/<set>_run<r>.json       (KD; hard labels: eval/<set>_hard_run<r>.json)

Trainings keep their mid-training state in <artifact stem>_state.pt (train.checkpoint_every), which
loads on any rank, so a resumed run continues a killed training wherever the new plan puts it.
"""
import numpy as np
import torch

from . import io, seeds
from .dist import Local, main_says, wait_for_all
from .evaluate import eval_key, evaluate_in_regime, regime_of
from .models import build_model, load_checkpoint, state_dict_of
from .scores import DYNAMICS, dynamics_run
from .stream_train import stream_options, train_stream
from .train import Recipe, train_model


def build(cfg, data, seed):
    """A freshly initialised model, identical on every rank."""
    torch.manual_seed(seed)
    return build_model(cfg["model"], data.num_classes, data.channels, data.image_size)


def fresh(cfg, data):
    """A model of the run's architecture, to load saved weights into (rundir.Layout.load_model)."""
    return lambda: build_model(cfg["model"], data.num_classes, data.channels, data.image_size)


class Trainings:
    """What the jobs need (filled in by the curriculum as the run goes on) and how each one runs."""

    def __init__(self, run, cfg, data, class_size):
        self.run, self.cfg, self.data, self.class_size = run, cfg, data, class_size
        self.teacher = None          # after the start stage
        self.synthetic = None        # S_{j-1} during phase j (a synthetic.Resident or Stored)
        self.sets = {}               # evaluation sets (held alike): the baselines after the start stage, ccfs at the end

    def artifact(self, kind, *key):
        """The file whose existence means the job (kind, key) is finished."""
        run = self.run
        if kind == "teacher":
            return run.teacher()
        if kind == "score_run":
            return run.score_run(key[0])
        if kind == "filter":
            return run.phase(key[0], "steps.json")
        return run.eval_run(key[0], key[1], regime=regime_of(key))

    def finished(self, job):
        run = self.run
        if job.kind == "score_run" and run.done(run.scores(self.cfg["ccfs"]["difficulty"])):
            return True                          # the scores themselves exist: no run is needed
        if job.kind == "filter" and run.done(run.phase(job.key[0], "metrics.json")):
            return True                          # the whole phase is finished
        return run.done(self.artifact(job.kind, *job.key))

    def do(self, job):
        """Run `job` on this rank (whole) or with every rank (job.split); its writer writes the artifact."""
        acc = self.run.acc if job.split else Local(self.run.acc)
        getattr(self, "train_" + job.kind)(acc, *job.key)

    def train_teacher(self, acc):
        cfg, data = self.cfg, self.data
        seed = seeds.teacher(cfg["seed"])
        rec = Recipe.for_teacher(cfg)
        kw = dict(mean=data.mean, std=data.std, seed=seed, desc="teacher", checkpoint=self.run.teacher_state())
        if data.train.in_memory:
            model, stats = train_model(acc, build(cfg, data, seed), data.train.images, data.train.labels, rec, **kw)
        else:        # a streamed pool: on the shards, over all ranks when it streams (stream_train.streams)
            model, stats = train_stream(acc, build(cfg, data, seed), data.train, rec, **kw, **stream_options(cfg))
        if acc.is_main_process:
            io.write_json(self.run.teacher_stats(),
                          {"source": "trained", **{k: v for k, v in stats.items() if k != "lrs"}})
            io.save_torch(self.run.teacher(), state_dict_of(model))

    def train_score_run(self, acc, r):
        result, info = dynamics_run(acc, self.cfg, self.data, r, checkpoint=self.run.score_run(r, state=True))
        if acc.is_main_process:
            io.write_npz(self.artifact("score_run", r), **result,
                         info=np.array([info["seconds"], info["accuracy"]]))

    def score_runs(self):
        """[(result, info), ...] of every score run, read back from their artifacts (after the start stage)."""
        runs = []
        for r in range(self.cfg["scores"]["runs"]):
            f = self.run.read_npz(io.wait_for(self.artifact("score_run", r)))
            runs.append(({m: f[m] for m in DYNAMICS}, {"seconds": float(f["info"][0]),
                                                       "accuracy": float(f["info"][1])}))
        return runs

    def train_filter(self, acc, j):
        cfg, data, run = self.cfg, self.data, self.run
        seed = seeds.filter_model(cfg["seed"], j)
        filt = build(cfg, data, seed)
        if cfg["ccfs"]["warm_start"] and j > 1:              # from phase j-1's filter, as saved
            load_checkpoint(filt, run.phase(j - 1, "filter.pt"))
        per_class = len(self.synthetic) / data.num_classes
        rec = Recipe.for_phase(cfg, ipc=cfg["ccfs"]["ipc"], class_size=self.class_size, per_class=per_class)
        filt, stats = train_model(acc, filt, self.synthetic.images, self.synthetic.labels, rec, mean=data.mean, std=data.std,
                                  teacher=self.teacher if cfg["train"]["kd"] else None, seed=seed,
                                  desc=f"phase {j} filter", checkpoint=run.phase(j, "filter_state.pt"))
        if acc.is_main_process:
            io.save_torch(run.phase(j, "filter.pt"), state_dict_of(filt))
            io.write_json(run.phase(j, "steps.json"),
                          {"train": {k: stats[k] for k in ("seconds", "images_per_s", "epochs", "batch_size")}})

    # ---- evaluation runs (eval.labels: each set in the KD regime, the hard-label one, or both) ----
    def train_eval(self, acc, name, r, regime="kd"):
        """Evaluation run r of set `name` in `regime`: KD from the teacher, or cross-entropy on the true
        labels without it; the same recipe, seed and augmentation in both."""
        cfg, data, c = self.cfg, self.data, self.cfg["ccfs"]
        held = self.sets[name]
        key = eval_key(name, r, regime)
        result = evaluate_in_regime(
            acc, held.images, held.labels, regime=regime, teacher=self.teacher, data=data, model_cfg=cfg["model"],
            recipe=Recipe.for_phase(cfg, ipc=c["ipc"], class_size=self.class_size, per_class=c["ipc"]),
            seed=seeds.eval_run(cfg["seed"], r), best_after=cfg["eval"]["best_after"],
            desc=f"eval {name}{'' if regime == 'kd' else ' ' + regime} {r + 1}/{cfg['eval']['runs']}",
            checkpoint=self.run.eval_run(name, r, state=True, regime=regime))
        if acc.is_main_process:
            io.write_json(self.artifact("eval", *key), result)


def finished(acc, trainings, job):
    """Whether `job` is finished. A split job is decided by rank 0 alone and its answer given to every rank
    (they run it together: on a lagging shared file system one rank could see the artifact and another not,
    and one would enter the training alone and wait in its first collective); a whole job by its own rank."""
    if not job.split:
        return trainings.finished(job)
    return main_says(acc, trainings.finished(job) if acc.is_main_process else None)


def run_stage(run, stage, trainings):
    """This rank's jobs of `stage`: the split ones (with every rank, in the same order), then its own;
    then every rank waits for all, so each job's artifact can be read by any rank."""
    for job in stage.jobs_of(run.acc.process_index):
        if finished(run.acc, trainings, job):
            run.log(f"{job.name}: resumed")
        else:
            trainings.do(job)
    wait_for_all(run.acc)
