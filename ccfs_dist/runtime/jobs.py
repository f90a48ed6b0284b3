"""The trainings of a run as jobs of its plan (plan.py): each is seeded by seeds.py, trains with the
accelerator it is given (a dist.OneRankAccelerator when it runs whole on one rank), and writes its own artifact into
the run directory, atomically, last of all; a job whose artifact exists is skipped on resume.

    teacher        teacher.json (its training stats), teacher.pt             (rundir.Layout names them)
    score_run r    scores_runs/run<r>.npz  (the run's per-sample forgetting, loss, el2n)
    filter j       phase_<j>/filter.pt, phase_<j>/steps.json
    eval set r     eval/<set>_run<r>.json       (KD; hard labels: eval/<set>_hard_run<r>.json)
    fused [...]    each of its runs' artifact (evaluation or score runs; plan.fuse: one fused training)

Trainings keep their mid-training state in <artifact stem>_state.pt (train.checkpoint_every), which
loads on any rank, so a resumed run continues a killed training wherever the new plan puts it.
"""
import numpy as np

from ccfs_dist.runtime import io, seeds
from ccfs_dist.runtime.dist import OneRankAccelerator, main_says, wait_for_all
from ccfs_dist.training.evaluate import evaluate_fused, evaluate_in_regime, regime_of
from ccfs_dist.training.models import build_model, load_checkpoint, seeded_model, state_dict_of
from ccfs_dist.training.scores import DYNAMICS, dynamics_run, dynamics_runs_fused
from ccfs_dist.training.stream_train import stream_options, train_stream
from ccfs_dist.training.train import Recipe, train_model


def model_factory(cfg, data):
    """A model of the run's architecture, to load saved weights into (rundir.Layout.load_model)."""
    return lambda: build_model(cfg["model"], data.num_classes, data.channels, data.image_size)


def artifact(run, job):
    """The file whose existence means `job` is finished."""
    if job.kind == "teacher":
        return run.teacher()
    if job.kind == "score_run":
        return run.score_run(*job.key)
    if job.kind == "filter":
        return run.phase(job.key[0], "steps.json")
    return run.eval_run(job.key[0], job.key[1], regime=regime_of(job.key))


def done(run, cfg, job):
    """Whether this rank sees `job`'s artifact (or what makes the job unneeded) in the run directory; a fused
    group's when it sees all its jobs' (else the whole group trains again: its models' floats depend on the
    group, so a model finished alone would not be the same)."""
    if job.kind == "fused":
        return all(done(run, cfg, member) for member in job.key)
    if job.kind == "score_run" and run.done(run.scores(cfg["ccfs"]["difficulty"])):
        return True                          # the scores themselves exist: no run is needed
    if job.kind == "filter" and run.done(run.phase(job.key[0], "metrics.json")):
        return True                          # the whole phase is finished
    return run.done(artifact(run, job))


def finished(acc, job, looks):
    """Whether `job` is finished, by `looks(job)`. A split job is decided by rank 0 alone and its answer given
    to every rank (they run it together: on a lagging shared file system one rank could see the artifact and
    another not, and one would enter the training alone and wait in its first collective); a whole job by
    its own rank."""
    if not job.split:
        return looks(job)
    return main_says(acc, looks(job) if acc.is_main_process else None)


def train_teacher(acc, run, cfg, data):
    """The teacher, on the full real training set: teacher.pt and teacher.json."""
    seed = seeds.teacher(cfg["seed"])
    rec = Recipe.for_teacher(cfg)
    kw = dict(norm=data.norm, seed=seed, desc="teacher", checkpoint=run.teacher_state())
    model = seeded_model(cfg["model"], data, seed)
    if data.train.in_memory:
        model, stats = train_model(acc, model, data.train.images, data.train.labels, rec, **kw)
    else:             # a streamed pool: on the shards, over all ranks when it streams (stream_train.streams)
        model, stats = train_stream(acc, model, data.train, rec, **kw, **stream_options(cfg))
    if acc.is_main_process:
        io.write_json(run.teacher_stats(), {"source": "trained", **{k: v for k, v in stats.items() if k != "lrs"}})
        io.save_torch(run.teacher(), state_dict_of(model))


def train_score_run(acc, run, cfg, data, r):
    """Training-dynamics score run r: scores_runs/run<r>.npz."""
    result, info = dynamics_run(acc, cfg, data, r, checkpoint=run.score_run(r, state=True))
    if acc.is_main_process:
        _write_score_run(run, r, result, info)


def train_score_group(acc, run, cfg, data, members):
    """The score runs `members` (plan.fused_groups) as one fused training: each run's scores_runs/run<r>.npz."""
    rs = [job.key[0] for job in members]
    results = dynamics_runs_fused(acc, cfg, data, rs, checkpoints=[run.score_run(r, state=True) for r in rs])
    if acc.is_main_process:
        for r, (result, info) in zip(rs, results):
            if not run.done(run.score_run(r)):
                _write_score_run(run, r, result, info)


def _write_score_run(run, r, result, info):
    """scores_runs/run<r>.npz: the run's per-sample scores and its (seconds, accuracy), as score_runs reads them."""
    io.write_npz(run.score_run(r), **result, info=np.array([info["seconds"], info["accuracy"]]))


def score_runs(run, cfg):
    """[(result, info), ...] of every score run, read back from their artifacts (after the start stage)."""
    runs = []
    for r in range(cfg["scores"]["runs"]):
        f = run.read_npz(io.wait_for(run.score_run(r)))
        runs.append(({m: f[m] for m in DYNAMICS}, {"seconds": float(f["info"][0]), "accuracy": float(f["info"][1])}))
    return runs


def train_filter(acc, run, cfg, data, j, *, synthetic, teacher, class_size):
    """filter_j on `synthetic` (S_{j-1}), with KD from `teacher` (train.kd): phase_<j>/filter.pt, steps.json."""
    seed = seeds.filter_model(cfg["seed"], j)
    filt = seeded_model(cfg["model"], data, seed)
    if cfg["ccfs"]["warm_start"] and j > 1:              # from phase j-1's filter, as saved
        load_checkpoint(filt, run.phase(j - 1, "filter.pt"))
    per_class = len(synthetic) / data.num_classes
    rec = Recipe.for_phase(cfg, ipc=cfg["ccfs"]["ipc"], class_size=class_size, per_class=per_class)
    filt, stats = train_model(acc, filt, synthetic.images, synthetic.labels, rec, norm=data.norm,
                              teacher=teacher if cfg["train"]["kd"] else None, seed=seed,
                              desc=f"phase {j} filter", checkpoint=run.phase(j, "filter_state.pt"))
    if acc.is_main_process:
        io.save_torch(run.phase(j, "filter.pt"), state_dict_of(filt))
        io.write_json(run.phase(j, "steps.json"),
                      {"train": {k: stats[k] for k in ("seconds", "images_per_s", "epochs", "batch_size")}})


def train_eval(acc, run, cfg, data, name, r, regime="kd", *, held, teacher, class_size):
    """Evaluation model r of the set `name` (`held`: its images and labels) in `regime` (eval.labels): KD from
    `teacher`, or cross-entropy on the true labels without it; the same recipe, seed and augmentation in
    both. eval/<set>_run<r>.json (KD), eval/<set>_hard_run<r>.json."""
    result = evaluate_in_regime(
        acc, held.images, held.labels, regime=regime, teacher=teacher, data=data, model_cfg=cfg["model"],
        recipe=Recipe.for_evaluation(cfg, class_size=class_size), seed=seeds.eval_run(cfg["seed"], r),
        best_after=cfg["eval"]["best_after"], desc=f"eval {name}{_regime_label(regime)} {r + 1}/{cfg['eval']['runs']}",
        checkpoint=run.eval_run(name, r, state=True, regime=regime))
    if acc.is_main_process:
        io.write_json(run.eval_run(name, r, regime=regime), result)


def train_eval_group(acc, run, cfg, data, members, *, sets, teacher, class_size):
    """The evaluation runs `members` (Jobs of one regime, plan.fused_groups) as one fused training; each
    writes the JSON that train_eval writes for it (those missing)."""
    regime = regime_of(members[0].key)
    keys = [(job.key[0], job.key[1]) for job in members]
    results = evaluate_fused(
        acc, [(sets[name].images, sets[name].labels) for name, _ in keys], regime=regime, teacher=teacher,
        data=data, model_cfg=cfg["model"],
        recipe=Recipe.for_evaluation(cfg, class_size=class_size),
        seeds=[seeds.eval_run(cfg["seed"], r) for _, r in keys], best_after=cfg["eval"]["best_after"],
        desc=f"eval fused {', '.join(f'{name} {r + 1}' for name, r in keys)}{_regime_label(regime)}",
        checkpoints=[run.eval_run(name, r, state=True, regime=regime) for name, r in keys])
    if acc.is_main_process:
        for (name, r), result in zip(keys, results):
            if not run.done(run.eval_run(name, r, regime=regime)):
                io.write_json(run.eval_run(name, r, regime=regime), result)


def _regime_label(regime):
    """What an evaluation's progress line adds for its regime: nothing for KD, " hard" for hard labels."""
    return "" if regime == "kd" else " " + regime


def run_stage(run, cfg, stage, trainers):
    """This rank's jobs of `stage`: the split ones (with every rank, in the same order), then its own;
    then every rank waits for all, so each job's artifact can be read by any rank. `trainers[kind]` trains
    a job of that kind: trainer(accelerator, *job.key), with every rank (job.split) or with this rank alone
    (a dist.OneRankAccelerator); a job whose artifact exists is skipped (resume)."""
    for job in stage.jobs_of(run.acc.process_index):
        if finished(run.acc, job, lambda job: done(run, cfg, job)):
            run.log(f"{job.name}: resumed")
        else:
            trainers[job.kind](run.acc if job.split else OneRankAccelerator(run.acc), *job.key)
    wait_for_all(run.acc)


class Trainings:
    """The run's trainings as the steps of the paper's loop, each run where the plan puts it: the curriculum
    calls `teacher_and_scores`, `filter` (once per phase) and `evaluations`; which rank trains a job,
    whole or split with every rank, and whether it is skipped because a resumed run has its artifact, is
    the plan's stage and `run_stage`'s. Baseline evaluations run beside the filters where the plan put them."""

    def __init__(self, run, cfg, data, class_size, stages):
        self.run, self.cfg, self.data, self.class_size = run, cfg, data, class_size
        self.start, *self.phases, self.final = stages

    def teacher_and_scores(self):
        """The teacher (unless given) and the training-dynamics score runs (ccfs.difficulty forgetting etc.)."""
        run, cfg, data = self.run, self.cfg, self.data
        run_stage(run, cfg, self.start, {"teacher": lambda acc: train_teacher(acc, run, cfg, data),
                                         "score_run": lambda acc, r: train_score_run(acc, run, cfg, data, r),
                                         "fused": lambda acc, *runs: train_score_group(acc, run, cfg, data, runs)})

    def filter(self, j, *, on, teacher, baselines):
        """filter_j trained on S_{j-1} (`on`) with KD from `teacher`; the plan's phase-j stage may also hold
        evaluation runs of the `baselines` sets."""
        run, cfg, data, class_size = self.run, self.cfg, self.data, self.class_size
        run_stage(run, cfg, self.phases[j - 1], {
            "filter": lambda acc, j: train_filter(acc, run, cfg, data, j, synthetic=on, teacher=teacher,
                                                  class_size=class_size),
            **self._evaluation(baselines, teacher)})

    def evaluations(self, sets, teacher):
        """The evaluation runs the final stage holds, of the sets {name: held set}."""
        run_stage(self.run, self.cfg, self.final, self._evaluation(sets, teacher))

    def _evaluation(self, sets, teacher):
        """The trainers of evaluation runs of `sets`, alone ("eval") and fused ("fused")."""
        run, cfg, data, class_size = self.run, self.cfg, self.data, self.class_size
        return {"eval": lambda acc, name, r, regime="kd": train_eval(acc, run, cfg, data, name, r, regime,
                                                                     held=sets[name], teacher=teacher,
                                                                     class_size=class_size),
                "fused": lambda acc, *members: train_eval_group(acc, run, cfg, data, members, sets=sets,
                                                                teacher=teacher, class_size=class_size)}
