"""The CCFS pipeline: config -> data -> teacher -> distilled set -> curriculum phases -> evaluation.

The run directory is rundir.Run's (where, locking, staging, and the name of every artifact). Each step
writes its artifacts atomically (rank 0; a training: the rank that ran it), its final artifact last, and
on `resume` a step whose final artifact exists is loaded instead of run (`run.resumable`), so a killed run
continues from the last finished step, with any number of processes.
The trainings (teacher, score runs, filters, evaluation models) are jobs dealt to ranks by the plan
(plan.py, jobs.py); the rest runs on every rank alike.

    S_0 = distilled                                                  held_set(.., [distilled])
    for each phase j with budget k_j:                                 run_budgets
        filter_j  <- train on S_{j-1} (KD from the teacher)           trainings.filter(j, on=S_{j-1}, ..)
        preds     <- filter_j on the pool (real samples not selected)  predict_pool
        coarse    <- misclassified (and teacher-correct)               select_phase
        fine      <- k_j simplest per class
        S_j       <- S_{j-1} + selected                              held_set(.., [S_{j-1}, selected])
    evaluate S_J against two random baselines                         trainings.evaluations
"""
import os
import time

import numpy as np
import torch

from ccfs_dist.data import inputs
from ccfs_dist.runtime import io, seeds
from ccfs_dist.data import synthetic as synthetic_sets
from ccfs_dist.data.distilled import load_distilled, write_image_folder
from ccfs_dist.data.sources import input_paths, load_real
from ccfs_dist.ccfs.difficulty import load_score_file, to_hardness
from ccfs_dist.runtime.dist import dealt, gather_rows
from ccfs_dist.training.distill import recover
from ccfs_dist.errors import DataError
from ccfs_dist.training.evaluate import REGIME_LABELS, REGIMES, lead_key, leads, regimes, summarize, summary_key
from ccfs_dist.runtime.jobs import Trainings, model_factory, score_runs
from ccfs_dist.runtime.plan import describe, eval_sets, make_plan
from ccfs_dist.report import SET_LABELS, fallback_line, write_report
from ccfs_dist.runtime.rundir import Run
from ccfs_dist.training.predict import accuracy, predict
from ccfs_dist.training.scores import DYNAMICS, compute_score_files
from ccfs_dist.ccfs.selection import random_per_class, run_budgets, select, select_official
from ccfs_dist.training.stream_train import streams


def load_given_teacher(cfg, data):
    """The teacher named by teacher.checkpoint (checked before the run dir is touched), else None."""
    if not cfg["teacher"]["checkpoint"]:
        model_factory(cfg, data)()                     # an unknown or unfit model.name fails before the run dir is touched
        return None
    return Run.load_model(cfg["teacher"]["checkpoint"], model_factory(cfg, data)).eval()


def get_teacher(run, cfg, data, given):
    """The teacher: given, or trained by the start stage's teacher job (read back from teacher.pt)."""
    if given is not None:
        return given, {"source": cfg["teacher"]["checkpoint"]}
    teacher = run.load_model(io.wait_for(run.teacher()), model_factory(cfg, data)).eval()   # by the teacher's rank
    return teacher, run.read_json(run.teacher_stats()) or {"source": "resumed"}


def make_distilled(run, cfg, data, teacher, per_class):
    """SRe2L/CDA recovery: one batch = one image per class; batches are spread over ranks."""
    d = cfg["distill"]
    chunks = torch.arange(data.num_classes).split(d["batch_classes"])
    items = [(b, c) for b in range(per_class) for c in range(len(chunks))]
    labels_np = data.train.labels.numpy()
    run.log(f"base distiller: {len(items)} recovery batches of up to {d['batch_classes']} classes over "
            f"{run.acc.num_processes} process(es), {d['iterations']} iterations each")
    images, labels, order = [], [], []
    for gid in dealt(run.acc, len(items)):                     # item gid is seeded by gid: any world size
        b, c = items[gid]
        gen = torch.Generator().manual_seed(seeds.distill_batch(cfg["seed"], gid))   # CPU: any device
        init = None
        if d["init"] == "real":
            one = random_per_class(labels_np, 1, seeds.distill_batch(cfg["seed"], gid))
            init = data.train.fetch(one[np.argsort(labels_np[one])])[0][chunks[c]]
        x = recover(teacher, chunks[c].to(run.acc.device), norm=data.norm,
                    image_size=data.image_size, channels=data.channels, iterations=d["iterations"], lr=d["lr"],
                    r_bn=d["r_bn"], jitter=d["jitter"], cda=d["cda"], init_images=init, generator=gen)
        images.append(x.cpu())
        labels.append(chunks[c])
        order.append(torch.full((len(x),), b, dtype=torch.int64))
    empty = torch.empty((0, data.channels, data.image_size, data.image_size), dtype=torch.uint8)
    local = {"images": torch.cat(images) if images else empty,
             "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64),
             "batch": torch.cat(order) if order else torch.empty(0, dtype=torch.int64)}
    allx = gather_rows(run.acc, local)
    key = np.lexsort((allx["batch"].numpy(), allx["labels"].numpy()))
    return allx["images"][key], allx["labels"][key]


def get_teacher_predictions(run, cfg, data, teacher):
    """The teacher's prediction on every training sample (global index order), kept in
    teacher_predictions.npz (index, label, pred) so that the teacher-correct rule can be checked or
    re-applied from the run directory alone."""
    path = run.teacher_predictions()

    def make():
        tp, _ = predict(run.acc, teacher, data.train, np.arange(len(data.train)), norm=data.norm,
                        batch_size=cfg["predict"]["batch_size"], desc="teacher score")
        tp = {key: tp[key] for key in ("index", "label", "pred")}
        run.write(io.write_npz, path, **tp)
        return tp
    return run.resumable(path, lambda: run.read_npz(path), make)


def load_given_distilled(cfg, data, per_class):
    """The distilled set named by data.distilled (checked before the run dir is touched), else None."""
    if cfg["data"]["distilled"] is None:
        return None
    return load_distilled(cfg["data"]["distilled"], data.classes, per_class, data.channels, data.image_size,
                          resize=cfg["data"]["distilled_resize"])


def get_distilled(run, cfg, data, teacher, per_class, given):
    if given is not None:
        return given
    folder = run.distilled()

    def load():      # read back from the PNGs, also when just made: every run uses the same rounded images
        return load_distilled(folder, data.classes, per_class, data.channels, data.image_size)

    def make():
        images, labels = make_distilled(run, cfg, data, teacher, per_class)
        run.write(write_image_folder, folder, images, labels, data.classes)
        return load()
    return run.resumable(folder, load, make)


def get_hardness_source(cfg, data):
    """Static hardness (larger = harder) from a score file, else None (filter logits, or computed later)."""
    spec = cfg["ccfs"]["difficulty"]
    if spec == "logits":
        return None, "logits"
    if spec in DYNAMICS:   # forgetting | loss | el2n: computed with the `scores` recipe (streamed for shards)
        return None, spec
    scores, method = load_score_file(cfg["ccfs"]["difficulty_file"], len(data.train),     # spec "file"
                                     labels=data.train.labels.numpy(), method=cfg["ccfs"]["difficulty_file_method"],
                                     data_name=data.name)
    return to_hardness(scores, method), method


def computed_hardness(run, cfg, data, method):
    """Scores the run computes itself, as hardness: from the start stage's score runs (or the scores file
    an interrupted run left)."""
    path = run.scores(method)
    runs = None if run.done(path) else score_runs(run, cfg)
    scores = compute_score_files(run.acc, cfg, data, {method: path}, runs=runs)[method]
    return to_hardness(scores, method)


def check_budget(cfg, data):
    counts = np.bincount(data.train.labels.numpy(), minlength=data.num_classes)
    ipc = cfg["ccfs"]["ipc"]
    if ipc > counts.min():
        c = int(counts.argmin())
        raise DataError(f"ccfs.ipc={ipc} exceeds the real images of class '{data.classes[c]}' "
                        f"({counts[c]} in the training set); lower ccfs.ipc")
    return float(counts.mean())


def finished_phase(run, j):
    """(selected, metrics) of phase j when a resumed run finished it (metrics.json is written last), else None."""
    done = run.phase(j, "metrics.json")
    if not run.done(done):
        return None
    run.log(f"phase {j}: resumed")
    return run.read_npy(run.phase(j, "selected.npy")), io.read_json(done)


def predict_pool(run, cfg, data, j, selected):
    """filter_j's predictions on the pool, the real samples not yet `selected` (ccfs.compat official: every
    training sample, as the official code scores them), every rank a share of the global batches; with the
    filter's test accuracy and the phase's step figures. A resumed run reads predictions.npz back."""
    c = cfg["ccfs"]
    steps = io.read_json(io.wait_for(run.phase(j, "steps.json")))      # written last by the filter's rank
    filt = run.load_model(run.phase(j, "filter.pt"), model_factory(cfg, data))
    filter_acc = accuracy(run.acc, filt, data.test, norm=data.norm)

    official = c["compat"] == "official"
    # the official code scores every training sample (selected ones too: they shape its candidate set)
    pool = np.setdiff1d(np.arange(len(data.train)), selected)
    scored = np.arange(len(data.train)) if official else pool
    predictions = run.phase(j, "predictions.npz")
    if run.done(predictions) and "score" in steps:      # scored before an interruption (steps.json says so)
        preds = run.read_npz(predictions)
    else:
        preds, sstats = predict(run.acc, filt, data.train, scored, norm=data.norm,
                                batch_size=cfg["predict"]["batch_size"], channels_last=cfg["train"]["channels_last"],
                                desc=f"phase {j} score")
        steps["score"] = {k2: sstats[k2] for k2 in ("seconds", "images_per_s")}
        run.write(io.write_npz, predictions, **preds)
        run.write(io.write_json, run.phase(j, "steps.json"), steps)
    return preds, filter_acc, steps


def select_phase(run, cfg, data, j, k, preds, *, selected, hardness, method, teacher_ok, synthetic_size,
                 filter_acc, steps):
    """k real images per class from the pool's predictions (selection.select: coarse rule and teacher-correct,
    then the fine order of the difficulty; ccfs.compat official: select_official); writes selected.npy and,
    last, metrics.json."""
    c = cfg["ccfs"]
    official = c["compat"] == "official"
    pool_size = len(data.train) - len(selected)
    t0 = time.perf_counter()
    h = to_hardness(preds["true_logit"], "logits") if hardness is None else hardness[preds["index"]]
    rule = dict(coarse=c["coarse"], fine=c["fine"], balance=c["balance"], num_classes=data.num_classes,
                teacher_correct=teacher_ok[preds["index"]] if teacher_ok is not None else None,
                seed=seeds.selection(cfg["seed"], j))
    if official:
        sel = select_official(preds["index"], preds["label"], preds["pred"], h, k, selected=selected, **rule)
    else:
        sel = select(preds["index"], preds["label"], preds["pred"], h, k, **rule)
    select_s = time.perf_counter() - t0
    in_pool = ~np.isin(preds["index"], selected) if official else slice(None)
    if sel.total_short and official:
        run.log(f"note: phase {j}: {int(sel.total_short)} images fewer than the quota (ccfs.compat: official takes "
                f"fewer where a class has fewer candidates than k)")
    elif sel.total_short:
        run.log(f"warning: phase {j}: the pool ran out: {int(sel.total_short)} images short of the quota")
    if sel.filled_from_fallback.sum():
        run.log(f"warning: phase {j}: {int(sel.filled_from_fallback.sum())} images came from the fallback tiers "
                f"(too few coarse candidates in {int((sel.filled_from_fallback > 0).sum())} classes)")
    metrics = {
        "phase": j, "k": k, "pool_size": int(pool_size), "synthetic_size": int(synthetic_size),
        "filter_test_acc": filter_acc,
        "pool_misclassification_rate": float((preds["pred"] != preds["label"])[in_pool].mean()),
        "candidates_per_class": sel.candidates_per_class.tolist(), "selected_per_class": sel.per_class.tolist(),
        "filled_from_fallback": int(sel.filled_from_fallback.sum()), "short": int(sel.total_short),
        "compat": c["compat"],
        "mean_hardness_selected": float(h[np.isin(preds["index"], sel.indices)].mean()) if len(sel.indices) else None,
        "difficulty": method,
        "train": steps["train"], "score": steps["score"], "select_seconds": select_s,
    }

    def write_all():
        io.write_npy(run.phase(j, "selected.npy"), sel.indices.astype(np.int64))
        io.write_json(run.phase(j, "metrics.json"), metrics)          # last: marks the phase finished
    run.write(write_all)
    run.log(f"phase {j}: filter test acc {filter_acc:.4f}, pool {pool_size}, misclassified "
            f"{metrics['pool_misclassification_rate']:.3f}, selected {len(sel.indices)} "
            f"(train {steps['train']['images_per_s']:.0f} img/s, score {steps['score']['images_per_s']:.0f} img/s)")
    return sel.indices, metrics


def run_ccfs(accelerator, cfg, out_dir, resume=False, overwrite=False):
    """Run the whole pipeline into `out_dir`; returns the summary dict (also written to summary.json).

    Every input is checked before the run directory is touched, so a mistake never costs earlier outputs.
    The trainings are the jobs of the plan (plan.py, jobs.py); between its stages every rank runs the
    same collective steps (distillation, scoring, selection) on the artifacts the jobs wrote.
    """
    inputs.check_present(cfg)                  # every missing input in one error, before any is read
    run = Run(accelerator, out_dir, resume)
    run.check(cfg, overwrite, input_paths(cfg))      # no --out overlaps an input: before any byte is written
    c = cfg["ccfs"]
    data = load_real(cfg["data"])
    class_size = check_budget(cfg, data)
    budgets = run_budgets(c)
    n_distilled = c["ipc"] - sum(budgets)
    hardness, method = get_hardness_source(cfg, data)
    given_teacher = load_given_teacher(cfg, data)
    given_distilled = load_given_distilled(cfg, data, n_distilled)
    run.open(cfg, overwrite)
    held_out = "validation (data.validation: carved from train; every 'test' figure below is on it)" \
        if cfg["data"]["validation"] else "test"
    run.log(f"data {data.name}: {len(data.train)} train / {len(data.test)} {held_out}, {data.num_classes} classes; "
            f"ipc {c['ipc']} = {n_distilled} distilled + phases {budgets}; difficulty {method}")
    for line in inputs.made_here(cfg, len(data.train), n_distilled):
        run.log(line)
    start, *phase_stages, final = make_plan(cfg, accelerator.num_processes, n_train=len(data.train),
                                            num_classes=data.num_classes, class_size=class_size,
                                            streamed=streams(cfg, data.train))
    for line in describe([start, *phase_stages, final]):
        run.log(f"plan: {line}")
    trainings = Trainings(run, cfg, data, class_size, [start, *phase_stages, final])
    wall, lap = {}, Lap()

    trainings.teacher_and_scores()
    wall["teacher + scores"] = lap()
    if c["difficulty"] in DYNAMICS:
        hardness = computed_hardness(run, cfg, data, method)
    teacher, teacher_stats = get_teacher(run, cfg, data, given_teacher)
    teacher = teacher.to(accelerator.device).eval()
    teacher_acc = accuracy(accelerator, teacher, data.test, norm=data.norm)
    run.log(f"teacher test acc {teacher_acc:.4f}")
    distilled = get_distilled(run, cfg, data, teacher, n_distilled, given_distilled)
    distilled_acc = (accuracy(accelerator, teacher, distilled, norm=data.norm)
                     if len(distilled) else None)

    tp = get_teacher_predictions(run, cfg, data, teacher)
    teacher_ok = tp["pred"] == tp["label"] if c["teacher_correct"] else None
    baselines = baseline_sets(run, cfg, data, distilled, n_distilled)
    wall["distill"] = lap()

    synthetic = held_set(run, cfg, data, run.synthetic(0), [distilled], successor=run.synthetic(1))   # S_0
    distilled = given_distilled = None           # train.synthetic shared: the rank's own copy is no longer needed
    selected = np.empty(0, dtype=np.int64)
    phases = []
    for j, k in enumerate(budgets, 1):
        trainings.filter(j, on=synthetic, teacher=teacher, baselines=baselines)    # filter_j on S_{j-1}, KD
        done = finished_phase(run, j)                                              # (a resumed run's phase j)
        if done is None:
            preds, filter_acc, steps = predict_pool(run, cfg, data, j, selected)      # filter_j on the pool
            done = select_phase(run, cfg, data, j, k, preds, selected=selected, hardness=hardness, method=method,
                                teacher_ok=teacher_ok, synthetic_size=len(synthetic), filter_acc=filter_acc,
                                steps=steps)                                       # k_j per class: coarse, fine
        new, metrics = done
        phases.append(metrics)
        selected = np.concatenate([selected, new])
        # S_j = S_{j-1} + the selected images (a streamed pool: each rank reads a share)
        previous, synthetic = synthetic, held_set(run, cfg, data, run.synthetic(j), [synthetic, (data.train, new)],
                                                  successor=run.synthetic(j + 1) if j < len(budgets) else None)
        synthetic_sets.drop(run.acc, previous)
        wall[f"phase {j}"] = lap()
    # ccfs.compat official: idx_selected in selection order, as the official code writes it
    order = selected if c["compat"] == "official" else np.sort(selected)
    run.write(io.write_json, run.selected_indices(),
              {"ipc": c["ipc"], "alpha": c["alpha"], "idx_selected": order.tolist()})

    trainings.evaluations({**baselines, "ccfs": synthetic}, teacher)
    evaluation = gather_evaluation(run, cfg)
    wall["evaluation"] = lap()
    summary = {
        "data": data.name, "ipc": c["ipc"], "alpha": c["alpha"], "budgets": budgets, "difficulty": method,
        "processes": accelerator.num_processes, "teacher_test_acc": teacher_acc, "teacher": teacher_stats,
        "distilled_per_class": n_distilled, "teacher_acc_on_distilled": distilled_acc,
        "phases": phases, **evaluation,
        **{lead_key(regime): leads(evaluation[summary_key(regime)]) for regime in regimes(cfg)},
        "best_after": cfg["eval"]["best_after"],
        "wall_seconds": wall,
    }
    run.write(io.write_json, run.summary(), summary)
    run.log(format_table(summary))
    run.write(write_report, run.dir, data=data, name=os.path.basename(run.out))
    run.commit()
    return summary


class Lap:
    """Wall seconds since the previous call (since creation the first time), for summary.json's
    wall_seconds: per step of the pipeline, including the wait for the slowest rank."""

    def __init__(self):
        self.last = time.perf_counter()

    def __call__(self):
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return round(seconds, 3)


def held_set(run, cfg, data, path, parts, successor=None):
    """The set made of `parts` (synthetic.build), held as train.synthetic says; a shared one is written to
    `path` once. A resumed run opens the file if it exists, and does not write it when the `successor` set's
    file exists (S_j once S_{j+1} is written: the only training on S_j, filter j+1, has finished)."""
    store = cfg["train"]["synthetic"]
    if store == "shared" and (run.done(path) or (successor is not None and run.done(successor))):
        return synthetic_sets.Stored(path, synthetic_sets.labels_of(parts))
    made = synthetic_sets.build(run.acc, store, path, parts, data.train.shape)
    if store == "shared":
        run.log(f"synthetic set: {len(made)} images written to {os.path.relpath(path, run.dir)}")
    return made


def baseline_sets(run, cfg, data, distilled, n_distilled):
    """The evaluation sets CCFS is compared with, at the same IPC: distilled + random real, random real."""
    if not cfg["eval"]["baselines"]:
        return {}
    ipc, seed, labels = cfg["ccfs"]["ipc"], cfg["seed"], data.train.labels.numpy()
    top_up = random_per_class(labels, ipc - n_distilled, seeds.top_up_baseline(seed))
    return {"distilled+random": held_set(run, cfg, data, run.eval_set("distilled+random"),
                                         [distilled, (data.train, top_up)]),
            "random": held_set(run, cfg, data, run.eval_set("random"),
                               [(data.train, random_per_class(labels, ipc, seeds.random_baseline(seed)))])}


def gather_evaluation(run, cfg):
    """Every set's evaluation runs in each regime, read back from the jobs' artifacts: {summary key:
    {set: mean ± std over runs}} ("evaluation": KD, "evaluation_hard": hard labels). A resumed run keeps
    the eval_<set>*.json it has (a regime added by --resume leaves the other's as they were). Rank 0 alone
    looks and writes, with no barrier: a per-rank look at a file rank 0 may have just written would let one
    rank skip a collective write that the other waits in (nothing reads these files during the run)."""
    results = {}
    for regime in regimes(cfg):
        mine = results[summary_key(regime)] = {}
        for name in eval_sets(cfg):
            runs = [io.read_json(io.wait_for(run.eval_run(name, r, regime=regime))) for r in range(cfg["eval"]["runs"])]
            mine[name] = {**summarize(runs), "regime": regime}
            if run.acc.is_main_process and not run.done(run.eval_summary(name, regime)):
                io.write_json(run.eval_summary(name, regime), mine[name])
    return results


def format_table(summary):
    """The CCFS-vs-baselines table printed at the end of a run: one block per evaluation regime, with
    CCFS's lead over each baseline."""
    lines = [f"{summary['data']}  IPC {summary['ipc']}  alpha {summary['alpha']}  phases {summary['budgets']}  "
             f"difficulty {summary['difficulty']}",
             f"{'set':<34}{'test acc, final epoch':>24}{'official protocol*':>22}"]
    for regime in REGIMES:
        key = summary_key(regime)
        if key not in summary:
            continue
        lines.append(f"-- evaluation models trained with {REGIME_LABELS[regime]} (summary.json: {key})")
        for name, r in summary[key].items():
            acc = f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"
            official = ("–" if r.get("official_mean") is None else
                        f"{100 * r['official_mean']:.2f} ± {100 * r['official_std']:.2f}")
            lines.append(f"{SET_LABELS[name]:<34}{acc:>24}{official:>22}")
        for name, d in summary.get(lead_key(regime), {}).items():
            lines.append(f"  CCFS lead over {SET_LABELS[name]}: {d['mean']:+.2f} ± {d['std']:.2f} points "
                         f"(ahead in {d['ahead']}, behind in {d['behind']} of the paired runs)")
    lines.append(f"{'full data (teacher)':<34}{100 * summary['teacher_test_acc']:>23.2f}%")
    lines.append(fallback_line(summary["phases"]))
    lines.append(f"* best test accuracy over every epoch after {summary.get('best_after', 0.8):.0%} of training "
                 f"(the official code's figure): selected on the test set, for comparison only")
    return "\n".join(lines)
