#!/usr/bin/env python
"""The paper's ablations (CCFS Tables 6-8) as a grid of ordinary CCFS runs.

    python launch/ablate.py --config configs/default.yaml --out runs/ablate --seeds 0,1,2 eval.runs=1
    accelerate launch launch/ablate.py ...                     (cells dealt to the ranks, each run whole)

The config's own settings are the centre of the grid; each axis varies one thing around it:
  combos  coarse x fine: misclassified|correct x simple|hard|random                 (Table 6)
  phases  number of curriculum phases J, e.g. 1, 3, 5                               (Table 7)
  scores  difficulty: logits, or forgetting / loss / el2n (computed once into OUT/scores/ with the
          config's `scores` recipe), or a score file path                           (Table 8)
  alphas  distilled share
repeated for every IPC in --ipcs and every seed in --seeds. The teacher and the base distilled set are
made once (OUT/base/: teacher.pt, distilled/) and passed to every cell as teacher.checkpoint and
data.distilled, so a cell trains only its filters and evaluation models. The seed varies filters,
random fine selection, evaluation models and the random baselines; teacher and distilled set stay fixed.

Each cell is a normal run directory OUT/cells/<name>/ and is skipped when its summary.json exists (so
an interrupted grid resumes cell by cell; an unfinished cell resumes from its last finished step). Under
`accelerate launch` the base run and the scores are made by all ranks together, then the cells are dealt
round-robin to the ranks and each runs whole on its rank with the single-process recipe (the same result
as with one process); the tables are read back from the cells' summary.json files.
Only the centre cell of each IPC and seed evaluates the baselines (distilled + random real, random
real); its name ends in -baselines. Tables (mean ± std over seeds of the final-epoch CCFS test
accuracy) are printed and written to OUT/ablation.md and OUT/ablation.json.

`eval.labels=hard|both` (an override, as for a run) evaluates every cell under hard labels instead of / as
well as KD: each regime gets its own tables, headed with the regime (ablation.json: "tables" for KD,
"tables_hard"; a cell's figures "ccfs", "random", ... and "ccfs_hard", "random_hard", ...). A finished
grid rerun with eval.labels=both resumes every cell to add the hard-label evaluations only.
"""
import argparse
import os
import sys

import numpy as np


from ccfs_dist.runtime import io  # noqa: E402
from ccfs_dist.cli import DEFAULT_CONFIG  # noqa: E402
from ccfs_dist.config import load_config  # noqa: E402
from ccfs_dist.runtime.dist import dealt, log  # noqa: E402
from ccfs_dist.errors import CCFSError  # noqa: E402
from ccfs_dist.training.evaluate import REGIME_LABELS, REGIMES, regimes, summary_key  # noqa: E402
from ccfs_dist.runtime.rundir import Layout, regime_suffix  # noqa: E402
from ccfs_dist.ccfs.selection import phase_budgets  # noqa: E402

COARSE, FINE = ("misclassified", "correct"), ("simple", "hard", "random")
COMPUTED = ("forgetting", "loss", "el2n")
SET_LABELS = {"distilled+random": "distilled + random real", "random": "random real only"}


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Run the CCFS ablations (coarse x fine, phases, difficulty score, alpha) over seeds as a "
                    "grid of CCFS runs around the config's settings, reusing one teacher and distilled set; "
                    "resumable cell by cell. Writes OUT/ablation.md and OUT/ablation.json.",
        epilog="Lists are comma-separated; an empty list ('') leaves that axis out. Example: python launch/ablate.py "
               "--config configs/default.yaml --out runs/ablate --ipcs 5,20 --seeds 0,1,2 eval.runs=1")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML run config, the centre of the grid "
                   "(default: configs/default.yaml)")
    p.add_argument("--out", default="runs/ablate", help="output folder (default: runs/ablate)")
    p.add_argument("--ipcs", default=None, help="IPC values (default: the config's ccfs.ipc)")
    p.add_argument("--seeds", default="0", help="seeds (default: 0)")
    p.add_argument("--combos", default="all", help="coarse-fine pairs, e.g. misclassified-simple,correct-hard "
                   "(default: all six)")
    p.add_argument("--phases", default="1,3,5", help="numbers of phases (default: 1,3,5)")
    p.add_argument("--scores", default="logits,forgetting,loss",
                   help="difficulty: logits, forgetting, loss, el2n or a score file (default: logits,forgetting,loss)")
    p.add_argument("--alphas", default=None, help="alpha values (default: the config's ccfs.alpha)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every cell, "
                   "e.g. eval.runs=1 train.epochs=50")
    return p.parse_args(argv)


def split(text, kind=str):
    return [kind(v.strip()) for v in text.split(",") if v.strip()]


def score_name(spec):
    return spec if spec == "logits" or spec in COMPUTED else os.path.splitext(os.path.basename(spec))[0]


def cell_name(ipc, alpha, coarse, fine, phases, score, seed):
    return f"ipc{ipc}-a{alpha:g}-{coarse}-{fine}-J{phases}-{score_name(score)}-s{seed}"


def grid(args, centre):
    """{name: settings}: one-factor-at-a-time around `centre`, for every IPC and seed."""
    combos = ([(c, f) for c in COARSE for f in FINE] if args.combos == "all"
              else [tuple(v.split("-", 1)) for v in split(args.combos)])
    bad = [c for c in combos if len(c) != 2 or c[0] not in COARSE or c[1] not in FINE]
    if bad:
        raise CCFSError(f"--combos: {bad} are not coarse-fine pairs ({'|'.join(COARSE)} - {'|'.join(FINE)})")
    variants = ([{"coarse": c, "fine": f} for c, f in combos] + [{"phases": j} for j in split(args.phases, int)]
                + [{"difficulty": s} for s in split(args.scores)] + [{"alpha": a} for a in split(args.alphas, float)])
    cells = {}
    for ipc in split(args.ipcs, int):
        for seed in split(args.seeds, int):
            for v in [{}] + variants:
                s = {**centre, "ipc": ipc, "seed": seed, **v}
                s["baselines"] = all(s[k] == centre[k] for k in ("coarse", "fine", "phases", "difficulty", "alpha"))
                name = cell_name(s["ipc"], s["alpha"], s["coarse"], s["fine"], s["phases"], s["difficulty"], seed)
                cells.setdefault(name + ("-baselines" if s["baselines"] else ""), s)
    return cells


def resolve_scores(args, acc, cfg, centre):
    """Map each --scores entry to a ccfs.difficulty value; compute forgetting/loss/el2n files once.
    With data.validation on, a score file cannot be read (config.validate): each cell computes its own
    scores on the carved pool, as a single run does."""
    wanted = list(dict.fromkeys(split(args.scores) + [centre["difficulty"]]))
    resolved, todo = {}, {}
    for s in wanted:
        if s == "logits" or os.path.isfile(s) or (s in COMPUTED and cfg["data"]["validation"]):
            resolved[s] = s
        elif s in COMPUTED:
            todo[s] = os.path.abspath(os.path.join(args.out, "scores", f"{cfg['data']['source']}_{s}.npy"))
        else:
            raise CCFSError(f"--scores: {s!r} is neither logits, {', '.join(COMPUTED)} nor an existing score file")
    if todo:
        from ccfs_dist.data.sources import load_real
        from ccfs_dist.training.scores import compute_score_files
        compute_score_files(acc, cfg, load_real(cfg["data"]), todo, reuse=True)
        resolved.update(todo)
    return resolved


def difficulty_overrides(resolved, cfg):
    """The ccfs.difficulty* overrides of a cell whose resolved --scores entry is `resolved` (logits or a file).

    The config's ccfs.difficulty_file_method belongs to the config's own score file; any other file (the
    computed ones carry a JSON naming their method) is read by its own rule."""
    c = cfg["ccfs"]
    if resolved == "logits" or resolved in COMPUTED:
        return [f"ccfs.difficulty={resolved}", "ccfs.difficulty_file=null", "ccfs.difficulty_file_method=null"]
    own = c["difficulty"] == "file" and c["difficulty_file"] == resolved
    method = [] if own else ["ccfs.difficulty_file_method=null"]
    return ["ccfs.difficulty=file", f"ccfs.difficulty_file={resolved}", *method]


def make_base(acc, args, per_class):
    """Teacher and base distilled set, made once and reused by every cell (unless the config names both).

    The base is an ordinary CCFS run at IPC per_class + 1 holding per_class distilled images per class,
    with one phase and 1-epoch filter/evaluation training: only its teacher.pt and distilled/ are used.
    """
    from ccfs_dist.ccfs.curriculum import run_ccfs
    cfg = load_config(args.config, args.overrides)
    base = os.path.abspath(os.path.join(args.out, "base"))
    given_teacher, given_distilled = cfg["teacher"]["checkpoint"], cfg["data"]["distilled"]
    base_run = Layout(base)
    if not (given_teacher and given_distilled) and not base_run.complete():
        log(acc, f"base run (teacher, {per_class} distilled images per class) in {base}")
        base_cfg = load_config(args.config, args.overrides + [
            f"ccfs.ipc={per_class + 1}", f"ccfs.alpha={(per_class + 0.5) / (per_class + 1)}", "ccfs.phases=1",
            "train.epochs=1", "eval.runs=1", "eval.baselines=false", "eval.labels=kd"])
        run_ccfs(acc, base_cfg, base, resume=True)
    return [f"teacher.checkpoint={given_teacher or base_run.teacher()}",
            f"data.distilled={given_distilled or base_run.distilled()}"]


def in_regime(r, regime):
    """A cell's record with `regime`'s figures under the plain names ("ccfs", "random", ...) and no other
    regime's figures."""
    x, names = regime_suffix(regime), ("ccfs", *SET_LABELS)
    every = {k + regime_suffix(g) for g in REGIMES for k in names}
    return {**{k: v for k, v in r.items() if k not in every}, **{k: r[k + x] for k in names if k + x in r}}


def has_regimes(out, cfg):
    """A finished cell holds the evaluations of every regime the grid asks for (else it is resumed: a
    regime added by eval.labels=both is trained, the rest reused)."""
    summary = io.read_json(Layout(out).summary())
    return all(summary_key(regime) in summary for regime in regimes(cfg))


def fmt(values):
    if not values:
        return "–"
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}"


def tables(results, centre, ipcs, n_seeds, regime="kd"):
    """Markdown for every IPC: coarse x fine, phases, score, alpha, baselines; and the same as a dict; of
    the evaluations in `regime` (a cell's figures "ccfs", "random", ... under KD, "ccfs_hard", ... else)."""
    md, data = [], {}
    for ipc in ipcs:
        mine = [in_regime(r, regime) for r in results if r["ipc"] == ipc]

        def accs(**want):
            return [r["ccfs"] for r in mine if all(r[k] == v for k, v in {**centre, **want}.items()
                                                    if k not in ("ipc", "seed"))]
        t = {"coarse_x_fine": {c: {f: accs(coarse=c, fine=f) for f in FINE} for c in COARSE},
             "phases": {j: accs(phases=j) for j in sorted({r["phases"] for r in mine})},
             "score": {s: accs(difficulty=s) for s in dict.fromkeys(r["difficulty"] for r in mine)},
             "alpha": {a: accs(alpha=a) for a in sorted({r["alpha"] for r in mine})}}
        base = [r for r in mine if r["baselines"]]
        t["baselines"] = {k: [r[k] for r in base if k in r] for k in SET_LABELS}
        t["teacher"] = base[0]["teacher"] if base else (mine[0]["teacher"] if mine else None)
        t["paired"] = paired(mine, base, centre)
        data[ipc] = t
        c = centre
        md += [f"## IPC {ipc}, evaluation models trained with {REGIME_LABELS[regime]}", "",
               f"Centre: alpha {c['alpha']}, {c['coarse']} + {c['fine']}, {c['phases']} phases, difficulty "
               f"{score_name(c['difficulty'])}. Final-epoch test accuracy %, mean ± std over {n_seeds} seed(s), "
               f"evaluation regime: {REGIME_LABELS[regime]}.", "",
               "| coarse \\ fine | " + " | ".join(FINE) + " |", "|---|" + "---|" * len(FINE)]
        md += [f"| {co} | " + " | ".join(fmt(t["coarse_x_fine"][co][f]) for f in FINE) + " |" for co in COARSE]
        for key, title in (("phases", "phases"), ("score", "difficulty score"), ("alpha", "alpha")):
            if len(t[key]) > 1 or key == "phases":
                md += ["", f"| {title} | " + " | ".join(score_name(str(k)) for k in t[key]) + " |",
                       "|---|" + "---|" * len(t[key]),
                       "| CCFS | " + " | ".join(fmt(v) for v in t[key].values()) + " |"]
        md += ["", "| set | test acc % |", "|---|---|", f"| CCFS (centre) | {fmt(accs())} |"]
        md += [f"| {SET_LABELS[k]} | {fmt(v)} |" for k, v in t["baselines"].items()]
        md += [f"| full data (teacher) | {100 * t['teacher']:.2f} |" if t["teacher"] is not None else "", ""]
        md += ["| vs the centre, same seed | Δ acc, points (mean ± s.e.) | seeds better / worse |", "|---|---|---|"]
        md += [f"| {k} | {np.mean(d):+.2f} ± {np.std(d, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0:.2f} | "
               f"{sum(x > 0 for x in d)} / {sum(x < 0 for x in d)} |" for k, d in t["paired"].items() if d]
        md.append("")
    return "\n".join(md), {str(k): _jsonable(v) for k, v in data.items()}


def paired(mine, base, centre):
    """{variant: [accuracy minus the centre's, in points, per seed]}, baselines included."""
    at_centre = {r["seed"]: r["ccfs"] for r in base}
    out = {}
    for r in mine:
        label = ", ".join(f"{k} {score_name(str(r[k]))}" for k in centre if r[k] != centre[k])
        if label and r["seed"] in at_centre:
            out.setdefault(label, []).append(100 * (r["ccfs"] - at_centre[r["seed"]]))
    for k in SET_LABELS:
        out[SET_LABELS[k]] = [100 * (r[k] - r["ccfs"]) for r in base if k in r]
    return out


def _jsonable(t):
    if isinstance(t, dict):
        return {str(k): _jsonable(v) for k, v in t.items()}
    if isinstance(t, list):
        return {"values": t, "mean": float(np.mean(t)) if t else None, "std": float(np.std(t)) if t else None,
                "n": len(t)}
    return t


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, args.overrides)
    c = cfg["ccfs"]
    args.ipcs = args.ipcs or str(c["ipc"])
    args.alphas = args.alphas if args.alphas is not None else str(c["alpha"])
    centre = {"alpha": c["alpha"], "coarse": c["coarse"], "fine": c["fine"], "phases": c["phases"],
              "difficulty": c["difficulty_file"] if c["difficulty"] == "file" else c["difficulty"]}

    from ccfs_dist.ccfs.curriculum import run_ccfs
    from ccfs_dist.runtime.dist import OneRankAccelerator, make_accelerator, wait_for_all
    wanted = grid(args, centre)
    acc = make_accelerator(cfg["train"]["mixed_precision"], deterministic=cfg["train"]["deterministic"])
    scores = resolve_scores(args, acc, cfg, centre)
    cells, infeasible = {}, {}
    for n, s in wanted.items():
        try:
            phase_budgets(s["ipc"], s["alpha"], s["phases"])
        except CCFSError as e:
            infeasible.setdefault(str(e), []).append(n)
            continue
        if s["difficulty"] in scores:
            cells[n] = s
    for message, names in infeasible.items():
        log(acc, f"skipping {len(names)} cell(s) such as {names[0]}: {message}")
    if not cells:
        raise CCFSError("the grid is empty: check --ipcs, --seeds and the axes")
    per_class = max(s["ipc"] - sum(phase_budgets(s["ipc"], s["alpha"], s["phases"])) for s in cells.values())
    base = make_base(acc, args, per_class)
    log(acc, f"ablation: {len(cells)} cells in {os.path.join(args.out, 'cells')}")

    # cells are independent runs: each runs whole on one rank (dist.OneRankAccelerator), dealt round-robin in grid order
    local, mine = OneRankAccelerator(acc), dealt(acc, len(cells))
    for i, (name, s) in enumerate(cells.items(), 1):
        out = os.path.join(args.out, "cells", name)
        if i - 1 not in mine:
            continue
        if Layout(out).complete() and has_regimes(out, cfg):
            print(f"[{i}/{len(cells)}] {name}: done, skipped", flush=True)
            continue
        print(f"[{i}/{len(cells)}] {name}: running" + (f" on rank {acc.process_index}" if acc.num_processes > 1
                                                        else ""), flush=True)
        cell_cfg = load_config(args.config, args.overrides + base + [
            f"seed={s['seed']}", f"ccfs.ipc={s['ipc']}", f"ccfs.alpha={s['alpha']}", f"ccfs.coarse={s['coarse']}",
            f"ccfs.fine={s['fine']}", f"ccfs.phases={s['phases']}", *difficulty_overrides(scores[s["difficulty"]], cfg),
            f"eval.baselines={'true' if s['baselines'] else 'false'}"])
        os.makedirs(out, exist_ok=True)
        run_ccfs(local, cell_cfg, out, resume=True)
    wait_for_all(acc)

    results = []
    for name, s in cells.items():                 # read back from the cells' run directories
        summary = io.read_json(Layout(os.path.join(args.out, "cells", name)).summary())
        figures = {}
        for regime in regimes(cfg):               # "ccfs", "random", ... (KD); "ccfs_hard", ... (hard labels)
            ev = summary[summary_key(regime)]
            figures.update({k + regime_suffix(regime): r["mean"] for k, r in ev.items()})
        results.append({**s, "name": name, **figures, "teacher": summary["teacher_test_acc"],
                        "fallback_share": sum(p["filled_from_fallback"] for p in summary["phases"])
                        / max(1, sum(sum(p["selected_per_class"]) for p in summary["phases"]))})

    n_seeds = len(split(args.seeds))
    mds, data = [], {}
    for regime in regimes(cfg):
        md, data["tables" + regime_suffix(regime)] = tables(results, centre, split(args.ipcs, int), n_seeds, regime)
        mds.append(md)
    heads = [f"CCFS acc %, {REGIME_LABELS[regime]}" for regime in regimes(cfg)]
    cells_md = ["## All cells", "", f"| cell | {' | '.join(heads)} | selected from fallback tiers |",
                "|---|" + "---|" * (len(heads) + 1)]
    cells_md += [f"| {r['name']} | "
                 + " | ".join(f"{100 * r['ccfs' + regime_suffix(regime)]:.2f}" for regime in regimes(cfg))
                 + f" | {100 * r['fallback_share']:.0f} % |" for r in results]
    text = (f"# CCFS ablation: {os.path.basename(args.config)} {' '.join(args.overrides)}\n\n" + "\n".join(mds)
            + "\n" + "\n".join(cells_md) + "\n")
    if acc.is_main_process:
        io.write_text(os.path.join(args.out, "ablation.md"), text)
        io.write_json(os.path.join(args.out, "ablation.json"),
                      {"config": args.config, "overrides": args.overrides, "centre": centre, **data,
                       "cells": results})
        print("\n" + text, flush=True)
    acc.end_training()
    return 0


if __name__ == "__main__":
    from ccfs_dist.runtime.relaunch import relaunch_cpu_processes
    relaunch_cpu_processes([os.path.abspath(__file__), *sys.argv[1:]])
    from ccfs_dist.runtime.dist import exit_process
    try:
        sys.exit(exit_process(main()))
    except CCFSError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
