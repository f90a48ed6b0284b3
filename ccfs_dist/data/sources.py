"""The real data a run uses, by `data.source`: an in-memory source (memory.py) or WebDataset shards
(shard_reader.py). The one place that chooses between them, above both, so that neither imports the other's
reader; and the one list of what a command reads (`input_paths`), which no output may overlap."""
import os

import torch

from ccfs_dist.runtime import seeds
from ccfs_dist.errors import DataError
from ccfs_dist.data.folders import image_places
from ccfs_dist.data.memory import load_source, set_normalisation
from ccfs_dist.data.pool import RealData, TensorPool
from ccfs_dist.data.shards.index import index_places
from ccfs_dist.data.shards.reader import load_shards

VALIDATION_FRACTION = 0.2


def load_real(data_cfg):
    """Load the real train/test data named by the `data` config section.

    data.num_workers: loader worker processes per rank that decode a streamed (webdataset) pool; unused otherwise.
    data.mean / data.std, when set, replace the source's default normalisation.
    data.validation: the test split is left unread and replaced by a split carved from the training data
    (carve_validation), so settings can be chosen without looking at the test split.
    """
    validation = data_cfg.get("validation", False)
    if data_cfg["source"] == "webdataset":
        data = load_shards(data_cfg, num_workers=data_cfg.get("num_workers", 0))
    else:
        data = load_source(data_cfg, test=not validation)
        if validation:
            data = carve_validation(data)
    return set_normalisation(data, data_cfg)


def carve_validation(data, fraction=VALIDATION_FRACTION):
    """`data` with its test split replaced by a fixed, per-class-stratified `fraction` of its training split
    (round(fraction x class count) images of each class, drawn by seeds.validation()), and those images
    removed from the pool. The pool keeps its source order; its global indices are rows of the carved pool,
    so score files aligned with the full training split do not apply (config.validate refuses them). The
    normalisation stays the source's default (for digits: the full training split's statistics)."""
    labels = data.train.labels
    generator = torch.Generator().manual_seed(seeds.validation())
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(data.num_classes):
        rows = torch.nonzero(labels == c).flatten()
        take = int(round(fraction * len(rows)))
        if not 0 < take < len(rows):
            raise DataError(f"data.validation: class {data.classes[c]!r} has {len(rows)} training image(s), too "
                            f"few to carve {fraction:.0%} of them for validation and keep the rest")
        held[rows[torch.randperm(len(rows), generator=generator)[:take]]] = True
    images = data.train.images
    pool = TensorPool(images[~held].contiguous(), labels[~held].contiguous())
    val = TensorPool(images[held].contiguous(), labels[held].contiguous())
    return RealData(data.name, data.classes, pool, val, data.norm)


def _top(folder, what):
    """`folder` and the resolved targets of its top-level entries (a symlinked sub-folder lies elsewhere)."""
    found = [(what, folder)]
    if os.path.isdir(folder):
        found += [(what, os.path.realpath(e.path)) for e in os.scandir(folder) if e.is_symlink()]
    return found


def input_paths(cfg, data=True, checkpoints=True):
    """[(what, path)] of everything a command with config `cfg` reads: the data (data.root with its splits,
    class folders and the targets of symlinks in them; a shard index and the shards it names), the distilled
    folder, the checkpoints and the score file with its sidecar. Cheap (no image is decoded); a malformed
    index is refused here already."""
    d, found = cfg["data"], []
    if data and d["root"] is not None:
        root = os.path.expanduser(d["root"])
        if d["source"] == "webdataset":
            for key in ("root", "test_root"):
                if d[key] is not None:
                    found += [(f"data.{key}", p) for p in index_places(os.path.expanduser(d[key]), d)]
        elif d["source"] in ("imagefolder", "tiny-imagenet") and os.path.isdir(root):
            found += [("data.root", p) for p in image_places(d["source"], root)]
        else:
            found += _top(root, "data.root")
    if data and d["distilled"] is not None:
        found += _top(os.path.expanduser(d["distilled"]), "data.distilled")
    if checkpoints:
        for key in ("teacher.checkpoint", "scores.checkpoint", "ccfs.difficulty_file"):
            section, name = key.split(".")
            if cfg[section][name] is not None:
                found.append((key, cfg[section][name]))
        if cfg["ccfs"]["difficulty_file"] is not None:
            found.append(("ccfs.difficulty_file's sidecar", os.path.splitext(cfg["ccfs"]["difficulty_file"])[0]
                          + ".json"))
    return found
