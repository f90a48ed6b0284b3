"""Which rank runs which training, and when: a pure function of (config, process count, data sizes).

A run is a fixed sequence of stages; in each, every rank first runs the stage's split trainings together
(data-parallel, in order), then its own list of whole trainings, alone; then all ranks meet and the
curriculum does the stage's collective part (distillation, scoring, selection, gathering results):

    start     teacher, difficulty-score runs               -> teacher accuracy, distillation, teacher scoring
    phase j   filter j; baseline evaluation runs            -> filter accuracy, pool scoring, selection
    final     CCFS evaluation runs; baseline runs left over -> results read back from the eval/ artifacts

(Evaluation runs: every set's, in each regime of eval.labels: KD and / or hard labels.)

A training is split over the ranks only when each would get at least `train.min_batch_per_rank`
samples per step (runs_data_parallel); otherwise it runs whole on one rank with the single-process recipe.
Whole trainings are dealt by their cost (images processed): longest first to the least-loaded rank;
the baseline evaluations, which need only the teacher and the distilled set, go to whichever stage and
rank adds the least to the run's wall time (a rank is otherwise idle while another trains a filter).
Every training is seeded by seeds.py and writes its own artifact, so where it runs changes nothing but
the wall time, and a resumed run (with any process count) skips the trainings whose artifacts exist.

With plan.fuse K > 1 the evaluation runs of one regime are cut, in order, into fused groups of up to K
(fused.py: one training of K models): the CCFS set's among themselves, the baselines' across their sets;
so are the difficulty-score runs of an in-memory pool.
The groups depend on the config alone (a fused model's floats differ from its training alone), never on
the process count; a group is dealt, and skipped on resume, as one job (finished when all its models are).
Split evaluation runs, and recipes fused.py cannot fuse (fp16, compile, channels_last), are not fused.
"""
import math
from dataclasses import dataclass, field

from ccfs_dist.ccfs.difficulty import DYNAMICS
from ccfs_dist.training.evaluate import eval_key, regimes
from ccfs_dist.training.fused import fusable
from ccfs_dist.ccfs.selection import run_budgets
from ccfs_dist.training.train import Recipe

KD_COST = 4 / 3          # a KD step adds the teacher's forward pass (about a third of forward + backward)


@dataclass(frozen=True)
class Job:
    kind: str            # teacher | score_run | filter | eval | fused
    key: tuple           # score_run: (r,); filter: (phase,); eval: (set name, run) under KD,
                         # (set name, run, "hard") under hard labels (evaluate.eval_key); fused: its Jobs
    cost: float          # images processed (epochs x steps x batch size), x KD_COST with a teacher
    split: bool = False  # data-parallel over all ranks (else whole on one rank)

    @property
    def name(self):
        if self.kind == "fused":
            return f"fused[{', '.join(job.name for job in self.key)}]"
        return " ".join([self.kind, *map(str, self.key)])


@dataclass
class Stage:
    name: str                                   # start | phase <j> | final
    split: list = field(default_factory=list)   # jobs every rank runs together, in order
    local: list = field(default_factory=list)   # local[rank]: the jobs that rank runs alone, in order

    def jobs_of(self, rank):
        return self.split + self.local[rank]

    def loads(self):
        """Estimated work per rank: its whole jobs plus its share of the split ones."""
        shared = sum(j.cost for j in self.split) / max(1, len(self.local))
        return [shared + sum(j.cost for j in jobs) for jobs in self.local]


def runs_data_parallel(batch_size, world, min_batch_per_rank):
    """True when one training of global batch `batch_size` is split over `world` ranks (DDP)."""
    return world > 1 and batch_size // world >= min_batch_per_rank


def training_cost(n, epochs, batch_size, kd):
    return epochs * math.ceil(n / batch_size) * batch_size * (KD_COST if kd else 1.0)


def eval_sets(cfg):
    return ["ccfs"] + (["distilled+random", "random"] if cfg["eval"]["baselines"] else [])


def make_plan(cfg, world, *, n_train, num_classes, class_size, streamed=False):
    """[Stage, ...] of a run with `world` processes (see the module doc). Identical on every rank.
    `streamed`: the pool is streamed over the ranks (stream_train.streams: larger than a rank's shuffle
    buffer), so the teacher and the score runs train on the stream
    over all ranks (stream_train), as split jobs."""
    c, t, minimum = cfg["ccfs"], cfg["train"], cfg["train"]["min_batch_per_rank"]
    stages = [Stage("start", local=[[] for _ in range(world)])]
    start = []
    if not cfg["teacher"]["checkpoint"]:
        te = Recipe.for_teacher(cfg)
        start.append(Job("teacher", (), training_cost(n_train, te.epochs, te.batch_size, False),
                         streamed or runs_data_parallel(te.batch_size, world, minimum)))
    if c["difficulty"] in DYNAMICS:
        s = Recipe.for_scores(cfg)
        runs = [Job("score_run", (r,), training_cost(n_train, s.epochs, s.batch_size, False),
                    streamed or runs_data_parallel(s.batch_size, world, minimum)) for r in range(cfg["scores"]["runs"])]
        in_memory = cfg["data"]["source"] != "webdataset"           # fused.py trains a set held in memory
        start += fused_groups(runs, cfg["plan"]["fuse"] if in_memory and fusable(s, t["mixed_precision"]) else 1)
    _deal(stages[0], start)

    budgets = run_budgets(c)
    per_class = c["ipc"] - sum(budgets)
    for j, k in enumerate(budgets, 1):
        rec = Recipe.for_phase(cfg, ipc=c["ipc"], class_size=class_size, per_class=per_class)
        job = Job("filter", (j,), training_cost(per_class * num_classes, rec.epochs, rec.batch_size, t["kd"]),
                  runs_data_parallel(rec.batch_size, world, minimum))
        stages.append(Stage(f"phase {j}", local=[[] for _ in range(world)]))
        _deal(stages[-1], [job])
        per_class += k

    stages.append(Stage("final", local=[[] for _ in range(world)]))
    evals = eval_jobs(cfg, world, num_classes=num_classes, class_size=class_size)
    evaluation = Recipe.for_evaluation(cfg, class_size=class_size)
    fuse = cfg["plan"]["fuse"] if fusable(evaluation, t["mixed_precision"]) else 1
    _deal(stages[-1], fused_groups([j for j in evals if j.key[0] == "ccfs"], fuse))
    background = fused_groups([j for j in evals if j.key[0] != "ccfs"], fuse)
    split = any(j.split for j in evals)
    if split:
        stages[-1].split.extend(background)
    else:
        _fill(stages[1:], background)
    return stages


def eval_jobs(cfg, world, *, num_classes, class_size):
    """The evaluation runs of every set in every regime (evaluate.regimes): KD ones first, each regime's
    in set order. A KD run costs the teacher's forward pass too (KD_COST), a hard-label run does not."""
    c = cfg["ccfs"]
    rec = Recipe.for_evaluation(cfg, class_size=class_size)
    split = runs_data_parallel(rec.batch_size, world, cfg["train"]["min_batch_per_rank"])
    return [Job("eval", eval_key(name, r, regime),
                training_cost(c["ipc"] * num_classes, rec.epochs, rec.batch_size, regime == "kd"), split)
            for regime in regimes(cfg) for name in eval_sets(cfg) for r in range(cfg["eval"]["runs"])]


def fused_groups(jobs, fuse):
    """`jobs` (evaluation runs, or score runs) with each regime's whole ones cut, in order, into fused jobs of
    up to `fuse` (a group of one stays the job itself); split jobs stay as they are. The cost of a group is
    its jobs' sum."""
    out, regime_groups = [], {}
    for job in jobs:
        if job.split or fuse == 1:
            out.append(job)
        else:
            regime_groups.setdefault(job.key[2:], []).append(job)
    for group in regime_groups.values():
        for i in range(0, len(group), fuse):
            part = tuple(group[i:i + fuse])
            out.append(part[0] if len(part) == 1 else Job("fused", part, sum(j.cost for j in part)))
    return out


def _deal(stage, jobs):
    """Split jobs into stage.split; whole ones longest first (ties: in order) to the least-loaded rank."""
    stage.split.extend(j for j in jobs if j.split)
    whole = sorted((j for j in jobs if not j.split), key=lambda j: -j.cost)
    for job in whole:
        loads = stage.loads()
        stage.local[loads.index(min(loads))].append(job)


def _fill(stages, jobs):
    """Place each job (all of equal standing) where it adds least to the sum of the stages' longest loads;
    ties: the lower resulting load, then the earlier stage, then the lower rank."""
    for job in jobs:
        best = None
        for s, stage in enumerate(stages):
            loads = stage.loads()
            for r, load in enumerate(loads):
                grows = max(max(loads), load + job.cost) - max(loads)
                key = (grows, load + job.cost, s, r)
                if best is None or key < best[0]:
                    best = (key, stage, r)
        best[1].local[best[2]].append(job)


def describe(stages):
    """Lines showing the plan, one per stage and rank (logged at the start of a run)."""
    lines = []
    for stage in stages:
        together = ", ".join(j.name for j in stage.split)
        parts = [f"{stage.name}:"] + ([f"all ranks [{together}]"] if together else [])
        parts += [f"rank {r} [{', '.join(j.name for j in jobs)}]" for r, jobs in enumerate(stage.local) if jobs]
        lines.append(" ".join(parts))
    return lines
