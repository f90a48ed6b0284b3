import math

import pytest

from ccfs_dist.config import DEFAULTS, DEFAULTS_FLAT, NULLABLE, RANGES, RENAMED, load_config, parse_override
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
    ("teacher.warmup_epochs=31", "'teacher.warmup_epochs' must be at most teacher.epochs (30), got 31"),
    # out of range: the examples of issue 11 (every key: test_every_numeric_key_is_checked_against_its_range)
    ("train.momentum=-0.5", "'train.momentum' must lie in [0, 1), got -0.5"),
    ("train.weight_decay=-0.0001", "'train.weight_decay' must be at least 0"),
    ("train.batch_size=-8", "'train.batch_size' must lie in [1, 65536]"),
    ("predict.batch_size=10000000000", "'predict.batch_size' must lie in [1, 65536]"),
    ("seed=-1", "'seed' must be at least 0"),
    ("aug.scale_min=1.5", "'aug.scale_min' must lie in (0, 1]"),
    ("teacher.epochs=-3", "'teacher.epochs' must be at least 1"),
    ("train.epochs=0", "'train.epochs' must be at least 1"),
    ("distill.iterations=0", "'distill.iterations' must be at least 1"),
    ("data.image_size=0", "'data.image_size' must lie in [1, 8192]"),
    ("model.width=0", "'model.width' must lie in [1, 16384]"),
    ("model.width=100000000", "'model.width' must lie in [1, 16384]"),
    ("train.lr=.nan", "'train.lr' must be positive, got nan"),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert words in str(err.value)


@pytest.mark.parametrize("old, new, value", [
    ("score.batch_size", "predict.batch_size", 256),
    ("score.num_workers", "data.num_workers", 2),
    ("ccfs.difficulty_method", "ccfs.difficulty_file_method", "margin"),
])
def test_a_renamed_key_names_its_new_key(old, new, value, tmp_path):
    words = f"config key '{old}' was renamed to '{new}'"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{old}={value}"])
    assert str(err.value) == words
    section, key = old.split(".")
    path = write(tmp_path, f"{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {words}"
    section, key = new.split(".")                          # the new key takes the value
    file = ["ccfs.difficulty=file", "ccfs.difficulty_file=s.npy"] if section == "ccfs" else []
    assert load_config(None, [*file, f"{new}={value}"])[section][key] == value


def test_every_renamed_key_is_gone_and_its_new_key_exists():
    assert RENAMED and all(old not in DEFAULTS_FLAT and new in DEFAULTS_FLAT for old, new in RENAMED.items())


def test_the_old_score_section_names_where_its_keys_went(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "score: {}\n"))
    assert ("config section 'score' was removed: 'score.batch_size' was renamed to 'predict.batch_size', "
            "'score.num_workers' was renamed to 'data.num_workers'") in str(err.value)
    with pytest.raises(ConfigError, match="config section 'score' was removed"):
        load_config(None, ["score.other=1"])


@pytest.mark.parametrize("value", ["scores/forgetting_CIFAR10.npy", "/abs/c.npz", "s.npy"])
def test_a_score_file_path_in_ccfs_difficulty_says_where_it_goes_now(value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"ccfs.difficulty={value}"])
    assert str(err.value) == (f"config key 'ccfs.difficulty' no longer takes a score file's path ({value!r}): "
                              f"set ccfs.difficulty: file and ccfs.difficulty_file: {value}")


def test_difficulty_file_goes_with_difficulty_file_only():
    cfg = load_config(None, ["ccfs.difficulty=file", "ccfs.difficulty_file=s.npy", "ccfs.difficulty_file_method=el2n"])
    assert cfg["ccfs"]["difficulty_file"] == "s.npy" and cfg["ccfs"]["difficulty_file_method"] == "el2n"
    with pytest.raises(ConfigError, match=r"'ccfs.difficulty' is 'file' but 'ccfs.difficulty_file'"):
        load_config(None, ["ccfs.difficulty=file"])
    for extra in ("ccfs.difficulty_file=s.npy", "ccfs.difficulty_file_method=margin"):
        with pytest.raises(ConfigError, match=rf"'{extra.split('=')[0]}' is set .* but ccfs.difficulty is 'logits'"):
            load_config(None, ["ccfs.difficulty=logits", extra])
    with pytest.raises(ConfigError, match="'ccfs.difficulty' must be one of logits, forgetting, loss, el2n, file"):
        load_config(None, ["ccfs.difficulty=forgeting"])


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


def numeric_keys():
    return sorted(k for k, v in DEFAULTS_FLAT.items()
                  if NULLABLE.get(k) in (int, float) or (isinstance(v, (int, float)) and not isinstance(v, bool)))


def test_every_numeric_key_has_a_range_and_its_default_lies_in_it():
    assert numeric_keys() and set(numeric_keys()) <= set(RANGES)
    assert set(RANGES) <= set(DEFAULTS_FLAT)
    for key in numeric_keys():
        if DEFAULTS_FLAT[key] is not None and key != "ccfs.phases":
            assert DEFAULTS_FLAT[key] in RANGES[key], key


def outside(r):
    """Values just outside a range, and non-finite ones."""
    values = [r.lo if r.lo_open else r.lo - 1, math.nan, math.inf]
    if r.hi != math.inf:
        values.append(r.hi if r.hi_open else r.hi + 0.5)
    return values


@pytest.mark.parametrize("key", numeric_keys())
def test_every_numeric_key_is_checked_against_its_range(key):
    """Negative momentum / weight decay / batch size / seed, scale_min above 1, 0 epochs or iterations, ..."""
    is_int = (NULLABLE.get(key) or type(DEFAULTS_FLAT[key])) is int
    for value in outside(RANGES[key]):
        if is_int and not math.isfinite(value):
            continue                                  # not an int: refused by type
        value = int(value) if is_int and value == int(value) else value
        if is_int and not isinstance(value, int):
            continue
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}={value!r}".replace("nan", ".nan").replace("inf", ".inf")])
        assert f"'{key}' must" in str(err.value), (key, value, str(err.value))


@pytest.mark.parametrize("text", ["false\n", "0\n", "hello\n", "[1, 2]\n", "3.5\n"])
def test_a_config_file_that_is_not_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="must hold a mapping at the top level"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_an_empty_config_file_means_the_defaults(tmp_path, text):
    assert load_config(write(tmp_path, text)) == load_config(None)


def test_unreadable_config_paths(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"seed: 1 # caf\xe9\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(str(bad))


def test_docs_list_every_range_and_every_key():
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "configuration.md")).read()
    documented = dict(re.findall(r"^\| `([a-z0-9_.]+)` \| must (.+?) \|$", text, flags=re.M))
    assert documented == {k: str(r) for k, r in RANGES.items()}
    for key in ("data.distilled_resize", "data.allow_urls", "data.allow_outside"):
        assert f"| `{key}` |" in text
