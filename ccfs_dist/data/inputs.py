"""The files a run reads, before any of them is opened: every missing one in one error, each with where to get
it; and, once the run starts, what it will make itself because an input was not given.

    check_present(cfg)                       raises DataError listing every missing input
    made_here(cfg, n_train, n_distilled)     [str]: one line per input the run makes itself, with its cost
"""
import os

from ccfs_dist.errors import DataError
from ccfs_dist.data.memory import WHERE_TO_GET


def _given(cfg):
    """(config key, path, where to get it) of every file or folder input the config names."""
    d, c = cfg["data"], cfg["ccfs"]
    found = []
    if d["source"] == "webdataset":
        for key in ("root", "test_root"):
            if d[key] is not None:
                found.append((f"data.{key}", d[key], "`ccfs shards --out DIR` writes the index JSONs; docs/shards.md"))
    elif d["source"] != "digits" and d["root"] is not None and not d.get("download"):
        found.append(("data.root", d["root"], WHERE_TO_GET.get(d["source"], "docs/data.md")))
    if d["distilled"]:
        found.append(("data.distilled", d["distilled"],
                      f"{_published(d['source'], 'CDA sets')} (docs/data.md), or null: the run distils its own"))
    if cfg["teacher"]["checkpoint"]:
        found.append(("teacher.checkpoint", cfg["teacher"]["checkpoint"],
                      f"{_published(d['source'], 'checkpoints')} (docs/data.md), or null: the run trains its own"))
    if c["difficulty"] == "file" and c["difficulty_file"]:
        found.append(("ccfs.difficulty_file", c["difficulty_file"],
                      "the official repository's scores/ files (docs/data.md), or `ccfs scores` makes one, "
                      "or ccfs.difficulty=forgetting computes it in the run"))
    return found


PAPER_SOURCES = ("cifar10", "cifar100", "tiny-imagenet")    # the data sets the CCFS authors published inputs for


def _published(source, what):
    """Where `what` ('checkpoints', 'CDA sets') comes from: the authors' files exist only for the paper's data
    sets (and shards, which may hold one of them); for an image folder (ImageNet) the user brings their own."""
    if source in PAPER_SOURCES:
        return f"the authors' {what}"
    if source == "webdataset":
        return f"for CIFAR / Tiny-ImageNet shards the authors' {what}"
    return {"checkpoints": "a checkpoint trained on these classes",
            "CDA sets": "a distilled folder of these classes"}[what]


def check_present(cfg):
    """One DataError naming every input of `cfg` that does not exist, each with where to get it."""
    missing = [f"{key} not found: {path} ({where})" for key, path, where in _given(cfg)
               if not os.path.exists(os.path.expanduser(os.fspath(path)))]
    if missing:
        raise DataError((f"{len(missing)} inputs missing: " if len(missing) > 1 else "") + "; ".join(missing))


def made_here(cfg, n_train, n_distilled):
    """What the run computes because the config does not give it, and what that costs (in image passes, the
    unit BENCHMARKS.md's rates convert to time)."""
    lines = []
    t, d = cfg["teacher"], cfg["distill"]
    source = cfg["data"]["source"]
    if source in PAPER_SOURCES:
        paper = "; the paper's runs use the authors' files (docs/data.md)"
    elif source == "webdataset":
        paper = "; for CIFAR / Tiny-ImageNet the paper's runs use the authors' files (docs/data.md)"
    else:          # digits, image folders (ImageNet): the CCFS authors published no inputs for them
        paper = ""
    if not t["checkpoint"]:
        lines.append(f"teacher.checkpoint not given: training a teacher here, {t['epochs']} epochs over "
                     f"{n_train:,} images ({t['epochs'] * n_train:,} image passes){paper}")
    if not cfg["data"]["distilled"] and n_distilled:
        lines.append(f"data.distilled not given: the base distiller (SRe2L/CDA recovery) makes the distilled "
                     f"images, {d['iterations']} iterations per batch of up to {d['batch_classes']} classes{paper}")
    return lines
