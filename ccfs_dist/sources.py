"""The real data a run uses, by `data.source`: an in-memory source (data.py) or WebDataset shards
(shards.py). The one place that chooses between them, above both, so that neither imports the other's
reader."""
from .data import load_source, set_normalisation
from .shards import load_shards


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
