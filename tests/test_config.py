import pytest

from ccfs_dist.config import DEFAULTS, load_config, parse_override
from ccfs_dist.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_and_file_and_overrides(tmp_path):
    path = write(tmp_path, "ccfs:\n  ipc: 10\n  alpha: 0.3\ntrain:\n  epochs: 7\n")
    cfg = load_config(path, ["ccfs.ipc=12", "train.lr=0.2", "ccfs.phases=log", "data.distilled=/x"])
    assert cfg["ccfs"]["ipc"] == 12 and cfg["ccfs"]["alpha"] == 0.3 and cfg["train"]["epochs"] == 7
    assert cfg["train"]["lr"] == 0.2 and cfg["ccfs"]["phases"] == "log" and cfg["data"]["distilled"] == "/x"
    assert cfg["model"] == DEFAULTS["model"]


def test_int_is_accepted_for_float():
    assert load_config(None, ["ccfs.alpha=1"])["ccfs"]["alpha"] == 1.0


@pytest.mark.parametrize("override, words", [
    ("ccfs.ipcc=3", "unknown config key 'ccfs.ipcc'"),
    ("nosuch.key=3", "unknown config key 'nosuch'"),
    ("ccfs.ipc=ten", "'ccfs.ipc' must be of type int"),
    ("ccfs.balance=3", "'ccfs.balance' must be true or false"),
    ("ccfs.ipc=true", "'ccfs.ipc' must be an integer"),
    ("ccfs.fine=medium", "'ccfs.fine' must be one of simple, hard, random"),
    ("ccfs.alpha=1.5", "'ccfs.alpha' must lie in [0, 1]"),
    ("ccfs.phases=0", "'ccfs.phases' must be a positive integer or 'log'"),
    ("train.mixed_precision=fp8", "'train.mixed_precision' must be one of"),
    ("ccfs=3", "'ccfs' must be a mapping"),
    ("ccfs.ipc", "must look like key.sub=value"),
    ("data.source=cifar10", "needs 'data.root'"),
    ("eval.runs=0", "'eval.runs' must be at least 1"),
    ("ccfs.ipc=null", "'ccfs.ipc' may not be null"),
    ("data.mean=0.5", "'data.mean' must be of type list"),
    ("data.std=[0.2, x]", "'data.std' must be a list of numbers"),
    ("data.std=[0.2, 0]", "'data.std' must hold positive numbers"),
    ("train.warmup_start=0", "'train.warmup_start' must lie in (0, 1]"),
    ("train.schedule_step=step", "'train.schedule_step' must be one of batch, epoch"),
    ("ccfs.compat=paper", "'ccfs.compat' must be one of none, official"),
    ("teacher.crop=resize", "'teacher.crop' must be one of pad"),
    ("teacher.padding=-1", "'teacher.padding' must be at least 0"),
    ("eval.best_after=1.0", "'eval.best_after' must lie in [0, 1)"),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert words in str(err.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = write(tmp_path, "train:\n  epoch: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert path in str(err.value) and "'train.epoch'" in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "none.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_parse_override_values_are_yaml():
    assert parse_override("a.b=0.5") == {"a": {"b": 0.5}}
    assert parse_override("a.b=true") == {"a": {"b": True}}
    assert parse_override("a=hello") == {"a": "hello"}


def test_repo_configs_all_load():
    import glob
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [p for p in glob.glob(os.path.join(root, "configs", "*.yaml")) if "accelerate" not in p]
    assert paths
    for p in paths:
        cfg = load_config(p, ["data.root=/somewhere"])
        assert cfg["ccfs"]["ipc"] >= 1
