"""The real data a run uses, by `data.source`: an in-memory source (data.py) or WebDataset shards
(shards.py). The one place that chooses between them, above both, so that neither imports the other's
reader; and the one list of what a command reads (`input_paths`), which no output may overlap."""
import os

from .data import image_places, load_source, set_normalisation
from .shards import index_places, load_shards


def load_real(data_cfg):
    """Load the real train/test data named by the `data` config section.

    data.num_workers: loader worker processes per rank that decode a streamed (webdataset) pool; unused otherwise.
    data.mean / data.std, when set, replace the source's default normalisation.
    """
    if data_cfg["source"] == "webdataset":
        data = load_shards(data_cfg, num_workers=data_cfg.get("num_workers", 0))
    else:
        data = load_source(data_cfg)
    return set_normalisation(data, data_cfg)


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
