"""Run configuration: built-in defaults, a YAML file on top, dotted overrides on top of that.

Every key that may appear is in DEFAULTS; an unknown key or a value of the wrong type is a
ConfigError naming the key. `None` in DEFAULTS means "derive it" (documented per key in docs/configuration.md);
keys listed in NULLABLE may be set to a value of the type given there.
"""
import copy

import yaml

from .errors import ConfigError

DEFAULTS = {
    "seed": 0,
    "data": {
        "source": "digits",        # digits | cifar10 | cifar100 | tiny-imagenet | imagefolder | webdataset
        "root": None,              # folder holding the data set (not used by digits); webdataset: train index JSON
        "test_root": None,         # webdataset: the test index JSON (written by `ccfs shards`)
        "image_size": None,        # imagefolder, tiny-imagenet, webdataset: resize + center-crop to this size
        "distilled": None,         # folder of distilled images (one sub-folder per class); None: run the base distiller
    },
    "model": {
        "name": "convnet",         # convnet | resnet18 (CIFAR stem) | resnet18_imagenet | any torchvision classifier name
        "width": 32,               # convnet: channels per layer
        "depth": 3,                # convnet: conv-norm-relu-pool blocks
        "norm": "batchnorm",       # convnet: batchnorm | instancenorm | none
    },
    "teacher": {
        "checkpoint": None,        # path to a state dict; None: train one on the full real training set
        "epochs": 30,
        "batch_size": 128,
        "lr": 0.1,
        "weight_decay": 5e-4,
        "warmup_epochs": 0,
    },
    "distill": {                   # SRe2L / CDA recovery against the frozen teacher
        "iterations": 500,
        "lr": 0.25,
        "r_bn": 0.01,
        "jitter": 4,
        "init": "noise",           # noise | real (start from random real images)
        "cda": True,               # CDA: anneal the RandomResizedCrop minimum scale 1.0 -> 0.08
        "batch_classes": 100,      # classes per recovery batch (one image per class in a batch)
    },
    "ccfs": {
        "ipc": 50,                 # images per class of the final synthetic set
        "alpha": 0.2,              # share of distilled images: floor(ipc * alpha) per class
        "phases": 3,               # int, or "log" for J = floor(log2(ipc / 5)) + 1 (CUDD)
        "coarse": "misclassified", # misclassified | correct
        "fine": "simple",          # simple | hard | random
        "difficulty": "logits",    # logits | forgetting | loss | el2n (computed, `scores`) | score file (.npy, .npz)
        "difficulty_method": None, # direction of a score file: forgetting | cscore | loss | el2n | margin | logits; None: from the file
        "balance": True,           # select per class (True) or globally over the pool (False)
        "teacher_correct": True,   # coarse candidates must also be classified correctly by the teacher
        "warm_start": False,       # start phase j's filter from phase j-1's weights
    },
    "train": {                     # recipe for filter and evaluation models
        "epochs": None,            # None: paper rule by ratio ipc/class size (<=10%: 500, <=20%: 250, else 200)
        "batch_size": None,        # None: paper rule by synthetic images per class (<500: 32, <1000: 64, else 128)
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "warmup_epochs": 0,
        "kd": True,                # knowledge distillation from the teacher (else cross-entropy on labels)
        "temperature": 20.0,
        "mixed_precision": "no",   # no | fp16 | bf16
        "channels_last": False,
        "compile": False,          # torch.compile the student and the teacher's forward in filter / evaluation training
        "checkpoint_every": 10,    # save the training state every this many epochs (0: never); resumable mid-training
    },
    "aug": {
        "scale_min": 0.08,         # RandomResizedCrop minimum area scale
        "flip": True,              # random horizontal flip
    },
    "stream": {                    # training on a streamed pool (webdataset): the teacher, the forgetting/loss/el2n runs
        "shuffle_buffer": 4096,    # decoded samples per rank from which each batch is drawn at random (memory: this x image bytes)
        "interleave": 16,          # shards each loader worker (score.num_workers) reads at once, drawing samples from all
    },
    "score": {
        "batch_size": 512,
        "num_workers": 0,          # webdataset: DataLoader workers per rank decoding the streamed pool
    },
    "scores": {                    # per-sample difficulty scores: `ccfs scores`, ccfs.difficulty=forgetting|loss|el2n
        "method": "forgetting",    # what `ccfs scores` computes: forgetting | loss | el2n | margin | logits
        "runs": 3,                 # training runs (seeds seed+100, seed+101, ...); scores are averaged over runs
        "epochs": 30,              # epochs per run, on the full real training set
        "batch_size": 128,
        "lr": 0.1,
        "weight_decay": 5.0e-4,
        "el2n_epoch": None,        # 1-based epoch whose observations give EL2N; None: 20 % of epochs (at least 1)
        "loss_sigma": 3.0,         # BiLP: Gaussian smoothing of the per-epoch loss over epochs
        "checkpoint": None,        # margin | logits: state dict to score with; None: teacher.checkpoint
    },
    "eval": {
        "runs": 3,                 # evaluation models per set
        "baselines": True,         # also evaluate distilled+random and random-only sets
    },
}

# keys whose default is None but that take a value of this type when set
NULLABLE = {
    "data.root": str,
    "data.test_root": str,
    "data.image_size": int,
    "data.distilled": str,
    "teacher.checkpoint": str,
    "ccfs.difficulty_method": str,
    "train.epochs": int,
    "train.batch_size": int,
    "scores.el2n_epoch": int,
    "scores.checkpoint": str,
}

CHOICES = {
    "data.source": ("digits", "cifar10", "cifar100", "tiny-imagenet", "imagefolder", "webdataset"),
    "model.norm": ("batchnorm", "instancenorm", "none"),
    "distill.init": ("noise", "real"),
    "ccfs.coarse": ("misclassified", "correct"),
    "ccfs.fine": ("simple", "hard", "random"),
    "ccfs.difficulty_method": ("forgetting", "cscore", "loss", "el2n", "margin", "logits"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "scores.method": ("forgetting", "loss", "el2n", "margin", "logits"),
}


def _check(key, value, default):
    """Return value coerced to the type of default, or raise ConfigError naming key."""
    expected = NULLABLE.get(key, type(default))
    if value is None:
        if default is None or key in NULLABLE:
            return None
        raise ConfigError(f"config key '{key}' may not be null")
    if key == "ccfs.phases":
        if value == "log" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ConfigError(f"config key 'ccfs.phases' must be a positive integer or 'log', got {value!r}")
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"config key '{key}' must be of type {expected.__name__}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(CHOICES[key])}, got {value!r}")
    return value


def _merge(base, update, prefix=""):
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            known = ", ".join(sorted(base))
            raise ConfigError(f"unknown config key '{dotted}' (known keys here: {known})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' must be a mapping, got {value!r}")
            _merge(base[key], value, dotted + ".")
        else:
            base[key] = _check(dotted, value, DEFAULTS_FLAT[dotted])


def flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


DEFAULTS_FLAT = flatten(DEFAULTS)


def parse_override(text):
    """'train.epochs=5' -> {'train': {'epochs': 5}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from None
    tree = node = {}
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return tree


def validate(cfg):
    """Cross-key checks that a single key's type cannot express."""
    c = cfg["ccfs"]
    if not 0.0 <= c["alpha"] <= 1.0:
        raise ConfigError(f"config key 'ccfs.alpha' must lie in [0, 1], got {c['alpha']}")
    if c["ipc"] < 1:
        raise ConfigError(f"config key 'ccfs.ipc' must be at least 1, got {c['ipc']}")
    if cfg["data"]["source"] != "digits" and cfg["data"]["root"] is None:
        raise ConfigError(f"data source '{cfg['data']['source']}' needs 'data.root' (the folder holding it)")
    for key in ("train.temperature", "train.lr", "teacher.lr", "distill.lr", "scores.lr", "scores.loss_sigma"):
        section, name = key.split(".")
        if cfg[section][name] <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {cfg[section][name]}")
    for key in ("eval.runs", "score.batch_size", "teacher.batch_size", "distill.batch_classes",
                "scores.runs", "scores.epochs", "scores.batch_size"):
        section, name = key.split(".")
        if cfg[section][name] < 1:
            raise ConfigError(f"config key '{key}' must be at least 1, got {cfg[section][name]}")
    if cfg["stream"]["shuffle_buffer"] < 0:
        raise ConfigError(f"config key 'stream.shuffle_buffer' must be at least 0, got {cfg['stream']['shuffle_buffer']}")
    if cfg["stream"]["interleave"] < 1:
        raise ConfigError(f"config key 'stream.interleave' must be at least 1, got {cfg['stream']['interleave']}")
    if cfg["score"]["num_workers"] < 0:
        raise ConfigError(f"config key 'score.num_workers' must be at least 0, got {cfg['score']['num_workers']}")
    s = cfg["scores"]
    if s["el2n_epoch"] is not None and not 1 <= s["el2n_epoch"] <= s["epochs"]:
        raise ConfigError(f"config key 'scores.el2n_epoch' must lie in 1..scores.epochs ({s['epochs']}), "
                          f"got {s['el2n_epoch']}")
    return cfg


def load_config(path=None, overrides=()):
    """Defaults <- YAML file at `path` <- dotted `overrides`; validated. Returns a nested dict."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file '{path}' does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
        try:
            _merge(cfg, loaded)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    for text in overrides:
        _merge(cfg, parse_override(text))
    return validate(cfg)


def dump_config(cfg):
    return yaml.safe_dump(cfg, sort_keys=False)
