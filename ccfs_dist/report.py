"""Run report: `report.md` and PNG figures written into a run directory, from its artifacts only.

    write_report(run_dir, data=None) -> path of report.md          (also `ccfs report RUN_DIR`)

Figures (each skipped with a note in report.md when its inputs are missing):
  selected_per_phase.png  rows = classes, one block of columns per phase: the real images that phase
                          selected around the median difficulty of that class's selection
  distilled.png           rows = classes: the base distilled images
  phases.png              per phase: filter test accuracy, pool misclassification rate and the mean
                          hardness of what was selected (needs matplotlib: pip install "ccfs-dist[report]")
Small images are upscaled with nearest-neighbour so 8x8 digits stay readable.
"""
import glob
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from ccfs_dist.runtime import io
from ccfs_dist.errors import CCFSError, DataError
from ccfs_dist.training.evaluate import REGIME_LABELS, REGIMES, lead_key, summary_key
from ccfs_dist.runtime.rundir import Layout

SET_LABELS = {"ccfs": "CCFS (distilled + selected real)", "distilled+random": "distilled + random real",
              "random": "random real only"}
PER_CELL = 4          # images per class and phase in the selection grid
MAX_CLASSES = 10      # rows shown; with more classes, evenly spaced ones are shown
MIN_TILE = 48         # upscale images smaller than this (pixels) with nearest-neighbour


def write_report(run_dir, data=None, name=None):
    """Write run_dir/report.md and its figures; `data` (a RealData, in `ccfs run`) draws the selected-image
    grid. `name`: the run's name in the title (default: run_dir's; a staged run is written under another
    name). An artifact without the fields a report reads is a DataError naming the run, not a traceback."""
    try:
        return _write_report(run_dir, data, name)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise DataError(f"{run_dir}: a run artifact is malformed ({type(exc).__name__}: {exc}); the run was "
                        f"not written by this version of ccfs or was edited") from None


def _write_report(run_dir, data, name):
    run_dir = os.fspath(run_dir)
    run = Layout(run_dir)
    from ccfs_dist.runtime.rundir import MARKER, is_run
    if not is_run(run_dir) or not os.path.exists(run.config()):
        raise CCFSError(f"{run_dir} is not a run directory (no {MARKER} or no config.yaml in it); a report is "
                        f"written only into a ccfs run")
    summary = run.read_json(run.summary())
    finished = run.finished_phases()
    phases = summary["phases"] if summary else [io.read_json(run.phase(j, "metrics.json")) for j, _ in finished]
    notes, figures = [], []

    cfg = None
    try:
        from ccfs_dist.config import load_config
        cfg = load_config(run.config())
    except CCFSError as e:
        notes.append(f"config.yaml could not be read ({e}); image grids skipped")
    if cfg is not None and data is None and finished:
        # a report reads the run's artifacts only: never data through a config found on disk (its shard
        # index could name URLs or `pipe:` commands); `ccfs run` draws this grid with the data it holds
        drawn = os.path.isfile(run.path("selected_per_phase.png"))
        method = cfg["ccfs"]["difficulty"] if cfg["ccfs"]["difficulty"] != "file" else \
            cfg["ccfs"]["difficulty_file_method"] or (summary or {}).get("difficulty", "the file's")
        how = "the filter's true-class logit" if method == "logits" else f"{method} score"
        if drawn:
            figures.append(("Selected real images per phase", "selected_per_phase.png"))
        notes.append("the selected-image grid is drawn by `ccfs run`, which holds the real data; `ccfs report` "
                     "reads the run's own artifacts only" + (f" (the grid shown is the run's: selected images "
                                                            f"ordered by {how})" if drawn else ""))
    if cfg is not None and data is not None and finished:
        figures.append(("Selected real images per phase", _selected_grid(run, cfg, data, notes)))
    if cfg is not None:
        figures.append(("Distilled images", _distilled_grid(run, cfg, summary, data, notes)))
    if phases:
        figures.append(("Per-phase filter and selection", _phase_plot(run, phases, notes)))

    text = _markdown(name or os.path.basename(os.path.abspath(run_dir)), cfg, summary, phases,
                     [(t, f) for t, f in figures if f], notes)
    path = run.report()
    io.write_text(path, text)
    return path


# ------------------------------------------------------------------------------------------ reading

def _hardness(run, cfg, data, j):
    """(index, hardness) over phase j's pool in the order its selection used, and how it was ordered."""
    preds = run.read_npz(run.phase(j, "predictions.npz"))
    index = preds["index"]
    spec, c = cfg["ccfs"]["difficulty"], cfg["ccfs"]
    path = c["difficulty_file"] if spec == "file" else run.scores(spec)   # a given score file, or computed in the run
    if spec != "logits" and os.path.isfile(path):
        from ccfs_dist.ccfs.difficulty import load_score_file, to_hardness
        scores, method = load_score_file(path, len(data.train), method=c["difficulty_file_method"])
        return index, to_hardness(scores, method)[index], f"{method} score ({path})"
    if spec == "logits":
        return index, -preds["true_logit"].astype(np.float64), "the filter's true-class logit"
    return index, preds["loss"].astype(np.float64), "the filter's loss (the score file was not found)"


# ------------------------------------------------------------------------------------------ figures

def _shown_classes(num_classes):
    if num_classes <= MAX_CLASSES:
        return list(range(num_classes))
    return sorted({round(i * (num_classes - 1) / (MAX_CLASSES - 1)) for i in range(MAX_CLASSES)})


def _to_float(images, channels):
    """uint8 N x C x H x W -> float in [0, 1], 3 channels, upscaled (nearest) to at least MIN_TILE pixels."""
    x = images.float() / 255.0
    if channels == 1:
        x = x.expand(-1, 3, -1, -1)
    factor = max(1, math.ceil(MIN_TILE / x.shape[-1]))
    if factor > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=factor, mode="nearest")
    return x


def _labelled(blocks, row_names, col_names, path):
    """Blocks (each a float C x H x W grid, same height, rows aligned) side by side, with row and column names."""
    gap, left, top = 12, 8 + 7 * max(len(n) for n in row_names), 18
    pictures = [Image.fromarray((b.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
                for b in blocks]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # a column is as wide as its picture or its name, whichever is wider, so no name is cut off
    slots = [max(p.width, math.ceil(measure.textlength(name)) + 4) for p, name in zip(pictures, col_names)]
    width = left + sum(slots) + gap * (len(pictures) - 1) + 4
    height = top + max(p.height for p in pictures) + 4
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = left
    for p, name, slot in zip(pictures, col_names, slots):
        canvas.paste(p, (x, top))
        draw.text((x + 2, 3), name, fill="black")
        x += slot + gap
    row_h = (pictures[0].height - 2) / len(row_names)
    for i, name in enumerate(row_names):
        draw.text((4, top + 2 + i * row_h + row_h / 2 - 5), name, fill="black")
    with io.atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def _selected_grid(run, cfg, data, notes):
    """rows = classes, a block of PER_CELL columns per phase: selected samples of median difficulty."""
    classes = _shown_classes(data.num_classes)
    blank = torch.ones(data.channels, data.image_size, data.image_size, dtype=torch.uint8) * 255
    blocks, names, how = [], [], None
    for j, _ in run.finished_phases():
        selected = run.read_npy(run.phase(j, "selected.npy"))
        index, hardness, how = _hardness(run, cfg, data, j)       # predictions are sorted by index
        h = hardness[np.clip(np.searchsorted(index, selected), 0, len(index) - 1)]
        labels = data.train.labels.numpy()[selected]
        cols = max(1, min(PER_CELL, max(int((labels == c).sum()) for c in classes)))
        tiles = []
        for c in classes:
            mine = selected[labels == c][np.lexsort((selected[labels == c], h[labels == c]))].tolist()
            start = max(0, (len(mine) - cols) // 2)
            chosen = mine[start:start + cols]
            images = list(data.train.fetch(chosen)[0]) if chosen else []
            tiles += images + [blank] * (cols - len(chosen))
        x = _to_float(torch.stack(tiles), data.channels)
        blocks.append(make_grid(x, nrow=cols, padding=2, pad_value=1.0))
        names.append(f"phase {j}")
    path = run.path("selected_per_phase.png")
    _labelled(blocks, [str(data.classes[c])[:12] for c in classes], names, path)
    notes.append(f"selected images are ordered by {how}; each cell shows up to {PER_CELL} images around the "
                 f"median difficulty of what the phase selected in that class (blank = fewer selected)")
    return os.path.basename(path)


def _distilled_grid(run, cfg, summary, data, notes):
    folder = run.distilled()
    if not os.path.isdir(folder) and data is not None:   # in `ccfs run`, which checked data.distilled; a
        folder = cfg["data"]["distilled"]                  # standalone report opens no path its config names
    per_class = summary["distilled_per_class"] if summary else math.floor(cfg["ccfs"]["ipc"] * cfg["ccfs"]["alpha"])
    if not folder or not os.path.isdir(folder) or per_class == 0:
        notes.append("no distilled images to show (no distilled folder, or alpha gives 0 per class)")
        return None
    from ccfs_dist.data.distilled import load_distilled
    if data is not None:
        classes, channels, size = data.classes, data.channels, data.image_size
    else:   # read the folder's own class list and image shape
        subdirs = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        classes = list(range(len(subdirs)))
        try:
            with Image.open(sorted(glob.glob(os.path.join(folder, subdirs[0], "*.png")))[0]) as im:
                channels, size = (1 if im.mode == "L" else 3), im.width
        except (IndexError, OSError) as e:
            notes.append(f"distilled images in {folder} could not be read ({e})")
            return None
    try:
        distilled = load_distilled(folder, classes, per_class, channels, size)
    except CCFSError as e:
        notes.append(f"distilled images could not be read ({e})")
        return None
    shown = _shown_classes(len(classes))
    cols = min(per_class, 10)
    rows = [distilled.images[distilled.labels == c][:cols] for c in shown]
    x = _to_float(torch.cat(rows), channels)
    path = run.path("distilled.png")
    _labelled([make_grid(x, nrow=cols, padding=2, pad_value=1.0)], [str(classes[c])[:12] for c in shown],
              [f"distilled ({per_class} per class, first {cols} shown)"], path)
    return os.path.basename(path)


def _phase_plot(run, phases, notes):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        notes.append('per-phase plots skipped: matplotlib is not installed (pip install "ccfs-dist[report]")')
        return None
    x = [m["phase"] for m in phases]
    series = [("filter test accuracy", [m["filter_test_acc"] for m in phases]),
              ("pool misclassification rate", [m["pool_misclassification_rate"] for m in phases]),
              (f"mean hardness of selected\n({phases[0].get('difficulty', '?')}; larger = harder)",
               [m.get("mean_hardness_selected") for m in phases])]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, (title, y) in zip(axes, series):
        y = [np.nan if v is None else v for v in y]
        ax.plot(x, y, marker="o")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("phase")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run.path("phases.png")
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return os.path.basename(path)


# ------------------------------------------------------------------------------------------ text

def _pct(v):
    return "–" if v is None else f"{100 * v:.2f}"


def fallback_line(phases):
    """How many of the selected real images came from the fallback tiers rather than the coarse rule."""
    selected = sum(sum(m["selected_per_class"]) for m in phases)
    fallback = sum(m["filled_from_fallback"] for m in phases)
    return (f"selected real images from the fallback tiers: {fallback} of {selected} "
            f"({100 * fallback / max(1, selected):.1f} %); the rest met the coarse rule")


def results_table(summary):
    """Markdown: per evaluation regime, a table of CCFS vs baselines (mean ± std of final-epoch test
    accuracy) and the teacher; with both regimes, the two side by side with CCFS's lead in each."""
    out = []
    found = [regime for regime in REGIMES if summary_key(regime) in summary]
    for regime in found:
        lines = [f"**Evaluation models trained with {REGIME_LABELS[regime]}** (summary.json: "
                 f"`{summary_key(regime)}`)", "",
                 "| set | test acc % (final epoch, mean ± std) | runs | official protocol* % (mean ± std) |",
                 "|---|---|---|---|"]
        for name, r in summary[summary_key(regime)].items():
            official = ("–" if r.get("official_mean") is None else
                        f"{100 * r['official_mean']:.2f} ± {100 * r['official_std']:.2f}")
            lines.append(f"| {SET_LABELS.get(name, name)} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} | "
                         f"{len(r['final'])} | {official} |")
        lines.append(f"| full data (teacher) | {_pct(summary['teacher_test_acc'])} | | |")
        out += lines + [""]
    if len(found) > 1:
        out += [regimes_table(summary, found), ""]
    return "\n".join(out).rstrip("\n")


def regimes_table(summary, found):
    """The regimes side by side: per set, mean ± std per regime, and CCFS's lead over it in each (points,
    mean ± std of the paired per-run differences; runs ahead / behind)."""
    head = " | ".join(f"{REGIME_LABELS[g]}: test acc %" for g in found)
    lead = " | ".join(f"CCFS lead, {REGIME_LABELS[g]} (points)" for g in found)
    lines = ["**The regimes side by side**", "", f"| set | {head} | {lead} |", "|---|" + "---|" * 2 * len(found)]
    for name in summary[summary_key(found[0])]:
        accs = []
        for g in found:
            r = summary[summary_key(g)].get(name)
            accs.append("–" if r is None else f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}")
        leads = []
        for g in found:
            d = summary.get(lead_key(g), {}).get(name)
            leads.append("" if d is None else f"{d['mean']:+.2f} ± {d['std']:.2f} ({d['ahead']} / {d['behind']})")
        lines.append(f"| {SET_LABELS.get(name, name)} | " + " | ".join(accs + leads) + " |")
    return "\n".join(lines)


def _markdown(name, cfg, summary, phases, figures, notes):
    out = [f"# CCFS run report: `{name}`", ""]
    if cfg is not None:
        c, t = cfg["ccfs"], cfg["train"]
        out += [f"- data **{cfg['data']['source']}**, model {cfg['model']['name']}, seed {cfg['seed']}",
                f"- IPC {c['ipc']}, alpha {c['alpha']}, phases {summary['budgets'] if summary else c['phases']}, "
                f"coarse **{c['coarse']}**, fine **{c['fine']}**, difficulty {c['difficulty']}, "
                f"teacher-correct {c['teacher_correct']}, balance {c['balance']}, warm start {c['warm_start']}",
                f"- training: epochs {t['epochs'] or 'paper rule'}, lr {t['lr']}, "
                f"filters: KD {t['kd']} (T = {t['temperature']}); evaluation: eval.labels "
                f"{cfg['eval']['labels']}"]
        if summary:
            out.append(f"- {summary['distilled_per_class']} distilled images per class; {summary['processes']} "
                       f"process(es); teacher: {summary['teacher'].get('source', '?')}")
        out.append("")
    out += ["## Result", ""]
    if summary:
        out += [results_table(summary), "",
                "Final-epoch test accuracy over the evaluation runs. KD: the paper's protocol (the teacher's soft "
                "labels carry much of the signal); hard labels: the set alone (docs/pipeline.md). CCFS lead: run r "
                "of each set trains with the same seed; mean ± std of the paired differences (runs ahead / behind). "
                "*The official code's figure: the best test "
                f"accuracy over every epoch after {summary.get('best_after', 0.8):.0%} of training, selected on "
                "the test set: for comparison with published numbers only.", "",
                fallback_line(summary["phases"]).capitalize() + ".", ""]
    else:
        out += ["The run has not finished (no summary.json): no evaluation yet.", ""]
    if phases:
        out += ["## Phases", "",
                "| phase | k per class | pool | synthetic set | filter test acc % | pool misclassified % | "
                "candidates per class (min / mean) | selected | from fallback | short | mean hardness selected | "
                "filter train s | score s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in phases:
            cand = m["candidates_per_class"]
            hard = m.get("mean_hardness_selected")
            out.append(f"| {m['phase']} | {m['k']} | {m['pool_size']} | {m['synthetic_size']} | "
                       f"{_pct(m['filter_test_acc'])} | {_pct(m['pool_misclassification_rate'])} | "
                       f"{min(cand)} / {np.mean(cand):.1f} | {sum(m['selected_per_class'])} | "
                       f"{m['filled_from_fallback']} | {m['short']} | {'–' if hard is None else f'{hard:.3f}'} | "
                       f"{m['train']['seconds']:.1f} | {m['score']['seconds']:.1f} |")
        out.append("")
    for title, name in figures:
        out += [f"## {title}", "", f"![{title}]({name})", ""]
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)
