"""Run configuration: built-in defaults, a YAML file on top, dotted overrides on top of that.

Every key that may appear is in DEFAULTS; an unknown key, a value of the wrong type or a number outside
its RANGES entry is a ConfigError naming the key. `None` in DEFAULTS means "derive it" (documented per key
in docs/configuration.md); keys listed in NULLABLE may be set to a value of the type given there.
"""
import copy
import math
from typing import NamedTuple

import yaml

from ccfs_dist.errors import ConfigError, DataError

MAX_DEPTH = 64                 # nesting of a YAML or JSON file the engine reads (io.py); none needs > 8
MAX_YAML_BYTES = 1 << 20       # a run config is a few kB
MAX_SIDE = 8192                # data.image_size and a shard index's image side: no huge allocation

DEFAULTS = {
    "seed": 0,
    "data": {
        "source": "digits",        # digits | cifar10 | cifar100 | tiny-imagenet | imagefolder | webdataset
        "root": None,              # folder holding the data set (not used by digits); webdataset: train index JSON
        "download": False,         # cifar10 / cifar100: fetch the archive into data.root if missing (MD5-checked)
        "test_root": None,         # webdataset: the test index JSON (written by `ccfs shards`)
        "validation": False,       # in-memory sources: leave the test split unread; evaluate on a fixed, stratified
                                   # 20 % of the training split, removed from the pool (choosing settings)
        "image_size": None,        # imagefolder, tiny-imagenet, webdataset: resize + center-crop to this size
        "distilled": None,         # folder of distilled images (one sub-folder per class); None: run the base distiller
        "mean": None,              # per-channel normalisation mean in [0, 1] units; None: the source's default
                                   # (cifar10/cifar100/tiny-imagenet: the official CCFS constants, docs/official.md;
                                   # digits/imagefolder: computed from the training split)
        "std": None,               # per-channel normalisation std; None: the source's default, as data.mean
        "distilled_resize": False, # resize / convert distilled images of another size or colour mode (else an error)
        "allow_urls": False,       # webdataset: index `file` entries may be URLs or `pipe:` commands (run by webdataset)
        "allow_outside": False,    # webdataset: index `file` entries may be absolute or climb out of the index's folder
        "num_workers": 0,          # webdataset: loader worker processes per rank decoding the streamed pool
        "worker_timeout": 600,     # webdataset: seconds a loader worker may deliver nothing before the run fails
        "decode": "cpu",           # webdataset: cpu (loader workers decode, PIL) | device (workers pass JPEG bytes on,
                                   # each rank decodes its batches on its device: nvjpeg on CUDA); docs/shards.md
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
        "crop": None,              # None: the `aug` section (RandomResizedCrop); "pad": RandomCrop(size, padding) +
                                   # flip, the SRe2L squeeze recipe that trained the official CIFAR teachers
        "padding": 4,              # crop "pad": zero padding on each side before the random crop
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
        "difficulty": "logits",    # logits | forgetting | loss | el2n (computed, `scores`) | file (ccfs.difficulty_file)
        "difficulty_file": None,   # the score file (.npy, .npz) that ccfs.difficulty: file reads
        "difficulty_file_method": None,  # direction of that file: forgetting | cscore | loss | el2n | margin | logits;
                                         # None: from the file (the JSON beside it, else its type)
        "balance": True,           # select per class (True) or globally over the pool (False)
        "teacher_correct": True,   # coarse candidates must also be classified correctly by the teacher
        "warm_start": False,       # start phase j's filter from phase j-1's weights
        "compat": "none",          # none | official: reproduce the official code's picks exactly (set-order ties,
                                   # short classes take fewer, int(ipc * alpha), selection order); docs/official.md
    },
    "train": {                     # recipe for filter and evaluation models
        "epochs": None,            # None: paper rule by ratio ipc/class size (<=10%: 500, <=20%: 250, else 200)
        "batch_size": None,        # None: official rule by the current set's ratio to the training set
                                   # (< 10 %: 32, < 20 %: 64, else 128)
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "warmup_epochs": 0,
        "warmup_start": None,      # lr factor at the first warm-up step; None: 1/warmup steps ((i+1)/W ramp);
                                   # official: 0.01 (LinearLR start_factor), reaching 1 after warmup_epochs
        "schedule_step": "batch",  # batch | epoch: advance warm-up + cosine per optimizer step, or once per epoch
                                   # (official: per epoch, cosine over epochs - warmup_epochs)
        "kd": True,                # filters: knowledge distillation from the teacher (else cross-entropy on labels);
                                   # the evaluation models follow eval.labels
        "temperature": 20.0,
        "mixed_precision": "no",   # no | fp16 | bf16
        "channels_last": False,
        "compile": False,          # torch.compile the student and the teacher's forward in filter / evaluation training
        "deterministic": True,     # deterministic algorithms (cuDNN, cuBLAS) on CUDA: the same result in every run;
                                   # false: cudnn.benchmark and torch's fastest kernels (docs/distributed.md)
        "checkpoint_every": 10,    # save the training state every this many epochs (0: never); resumable mid-training
        "min_batch_per_rank": 256, # split one training over the ranks (DDP) only if each gets >= this many samples a step
        "synthetic": "resident",   # resident | shared: how S_j and the evaluation sets are held in filter / evaluation
                                   # training: uint8 tensors on every rank, moved whole to the device (small sets), or
                                   # one .npy file in the run directory shared by a node's ranks (page cache), rows
                                   # moved per chunk (ImageNet scale; docs/shards.md)
    },
    "aug": {
        "scale_min": 0.08,         # RandomResizedCrop minimum area scale
        "flip": True,              # random horizontal flip
    },
    "stream": {                    # training on a streamed pool (webdataset): the teacher, the forgetting/loss/el2n runs
        "shuffle_buffer": 4096,    # decoded samples per rank from which each batch is drawn at random (memory: this x image bytes;
                                   # on the device under data.decode: device); a pool of at most this many is read once
                                   # and trained as in memory (train_model: the same result)
        "interleave": 16,          # shards each loader worker (data.num_workers) reads at once, drawing samples from all
        "resume_other_processes": False,  # --resume a streamed run with another process count: its trainings on the
                                   # stream then see other batches, so the result differs (refused unless true; warns)
    },
    "predict": {                   # a model's pass over pool samples (predict.py): teacher and filter predictions, accuracy
        "batch_size": 512,         # per rank
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
        "best_after": 0.8,         # official protocol: best test accuracy over every epoch e (0-based) with
                                   # e > best_after * epochs, reported beside the final-epoch headline
        "labels": "kd",            # kd | hard | both: evaluation models trained by KD from the teacher (the paper's
                                   # protocol), by cross-entropy on the true labels, or each set in both regimes
                                   # (the filters follow train.kd); docs/pipeline.md
    },
    "plan": {                      # where and how the trainings run (plan.py)
        "fuse": 1,                 # train up to this many evaluation models (or score runs) as one fused step
                                   # (fused.py; 1: each alone). Pays where a step is bound by per-operation
                                   # overhead (tiny models and batches; small trainings on a GPU); at the 32 px
                                   # shapes on the CPU it is slower (BENCHMARKS.md). Models match their
                                   # trainings alone up to float order
    },
}

# keys whose default is None but that take a value of this type when set
NULLABLE = {
    "data.root": str,
    "data.test_root": str,
    "data.image_size": int,
    "data.distilled": str,
    "data.mean": list,
    "data.std": list,
    "teacher.crop": str,
    "train.warmup_start": float,
    "teacher.checkpoint": str,
    "ccfs.difficulty_file": str,
    "ccfs.difficulty_file_method": str,
    "train.epochs": int,
    "train.batch_size": int,
    "scores.el2n_epoch": int,
    "scores.checkpoint": str,
}


class Range(NamedTuple):
    """Allowed values of a numeric key: lo..hi, each end included or not; every value must be finite."""
    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value):
        if not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self):
        """How error messages and docs say it: 'be at least 1', 'be positive', 'lie in [0, 1)'."""
        if self.hi == math.inf:
            return "be positive" if (self.lo, self.lo_open) == (0, True) else \
                f"be {'above' if self.lo_open else 'at least'} {self.lo:g}"
        return f"lie in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"


def _num(v):
    """A bound as docs say it: 1048576, not 1.04858e+06; 0.5 as 0.5."""
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, lo_open=True)
# stated limits of what sizes an allocation (docs/safety.md): beyond them a value is a mistake, refused before
# anything is allocated, not a multi-terabyte request that ends in a traceback
MAX_WIDTH, MAX_DEPTH_LAYERS, MAX_BUFFER = 16384, 64, 1 << 20
BATCH = Range(1, 65536)

# the range of every numeric key (a test checks that none is missing); documented in docs/configuration.md
RANGES = {
    "seed": AT_LEAST_0,
    "data.image_size": Range(1, MAX_SIDE),
    "model.width": Range(1, MAX_WIDTH),
    "model.depth": Range(1, MAX_DEPTH_LAYERS),
    "teacher.epochs": AT_LEAST_1,            # 0 epochs would give an untrained teacher
    "teacher.batch_size": BATCH,
    "teacher.lr": POSITIVE,
    "teacher.weight_decay": AT_LEAST_0,
    "teacher.warmup_epochs": AT_LEAST_0,
    "teacher.padding": AT_LEAST_0,
    "distill.iterations": AT_LEAST_1,        # 0 iterations would give noise as the distilled set
    "distill.lr": POSITIVE,
    "distill.r_bn": AT_LEAST_0,
    "distill.jitter": AT_LEAST_0,
    "distill.batch_classes": BATCH,
    "ccfs.ipc": AT_LEAST_1,
    "ccfs.alpha": Range(0, 1),
    "ccfs.phases": AT_LEAST_1,               # or "log"
    "train.epochs": AT_LEAST_1,
    "train.batch_size": BATCH,
    "train.lr": POSITIVE,
    "train.momentum": Range(0, 1, hi_open=True),
    "train.weight_decay": AT_LEAST_0,
    "train.warmup_epochs": AT_LEAST_0,
    "train.temperature": POSITIVE,
    "train.checkpoint_every": AT_LEAST_0,
    "train.min_batch_per_rank": AT_LEAST_1,
    "train.warmup_start": Range(0, 1, lo_open=True),
    "aug.scale_min": Range(0, 1, lo_open=True),
    "predict.batch_size": BATCH,
    "data.num_workers": Range(0, 1024),
    "data.worker_timeout": Range(0, 86400, lo_open=True),   # always bounded: no value turns it off
    "scores.runs": AT_LEAST_1,
    "scores.epochs": AT_LEAST_1,
    "scores.batch_size": BATCH,
    "scores.lr": POSITIVE,
    "scores.weight_decay": AT_LEAST_0,
    "scores.el2n_epoch": AT_LEAST_1,         # and at most scores.epochs (checked in validate)
    "scores.loss_sigma": POSITIVE,
    "stream.shuffle_buffer": Range(0, MAX_BUFFER),
    "stream.interleave": Range(1, 4096),
    "eval.runs": AT_LEAST_1,
    "eval.best_after": Range(0, 1, hi_open=True),
    "plan.fuse": Range(1, 64),
}

CHOICES = {
    "data.source": ("digits", "cifar10", "cifar100", "tiny-imagenet", "imagefolder", "webdataset"),
    "data.decode": ("cpu", "device"),
    "model.norm": ("batchnorm", "instancenorm", "none"),
    "teacher.crop": ("pad",),
    "ccfs.compat": ("none", "official"),
    "train.schedule_step": ("batch", "epoch"),
    "train.synthetic": ("resident", "shared"),
    "distill.init": ("noise", "real"),
    "ccfs.coarse": ("misclassified", "correct"),
    "ccfs.fine": ("simple", "hard", "random"),
    "ccfs.difficulty": ("logits", "forgetting", "loss", "el2n", "file"),
    "ccfs.difficulty_file_method": ("forgetting", "cscore", "loss", "el2n", "margin", "logits"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "scores.method": ("forgetting", "loss", "el2n", "margin", "logits"),
    "eval.labels": ("kd", "hard", "both"),
}

# old keys (issue 12): one that appears names its new key instead of being just unknown
RENAMED = {
    "score.batch_size": "predict.batch_size",
    "score.num_workers": "data.num_workers",
    "ccfs.difficulty_method": "ccfs.difficulty_file_method",
}


def _renamed(dotted, value):
    """The ConfigError for an old key, or for the old section holding it; None if `dotted` is not old."""
    if dotted in RENAMED:
        return ConfigError(f"config key '{dotted}' was renamed to '{RENAMED[dotted]}'")
    moved = [old for old in RENAMED if old.startswith(dotted + ".")]
    if not moved:
        return None
    for key in value if isinstance(value, dict) else ():
        if f"{dotted}.{key}" in RENAMED:
            return _renamed(f"{dotted}.{key}", None)
    return ConfigError(f"config section '{dotted}' was removed: "
                       + ", ".join(f"'{old}' was renamed to '{RENAMED[old]}'" for old in moved))


def _check(key, value, default):
    """Return value coerced to the type of default, or raise ConfigError naming key."""
    expected = NULLABLE.get(key, type(default))
    if value is None:
        if default is None or key in NULLABLE:
            return None
        raise ConfigError(f"config key '{key}' may not be null")
    if key == "ccfs.phases":
        if value == "log" or (isinstance(value, int) and not isinstance(value, bool) and value in RANGES[key]):
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
    if isinstance(value, str) and "\0" in value:
        raise ConfigError(f"config key '{key}' holds a NUL character: {value!r}")
    if key == "ccfs.difficulty" and value not in CHOICES[key] and ("/" in value or "." in value):
        raise ConfigError(f"config key 'ccfs.difficulty' no longer takes a score file's path ({value!r}): "
                          f"set ccfs.difficulty: file and ccfs.difficulty_file: {value}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in RANGES and value not in RANGES[key]:
        raise ConfigError(f"config key '{key}' must {RANGES[key]}, got {value!r}")
    return value


def _merge(base, update, prefix=""):
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            old = _renamed(dotted, value)
            if old is not None:
                raise old
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
        value = load_yaml(raw, f"override '{text}': its value") if raw != "" else None
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    tree = node = {}
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return tree


def validate(cfg):
    """Cross-key checks that a single key's type and range cannot express."""
    if cfg["data"]["source"] != "digits" and cfg["data"]["root"] is None:
        raise ConfigError(f"data source '{cfg['data']['source']}' needs 'data.root' (the folder holding it)")
    for key in ("data.mean", "data.std"):
        values = cfg["data"][key.split(".")[1]]
        if values is not None and (not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         and math.isfinite(v) for v in values)):
            raise ConfigError(f"config key '{key}' must be a list of numbers (one per channel), got {values!r}")
    if cfg["data"]["std"] is not None and min(cfg["data"]["std"]) <= 0:
        raise ConfigError(f"config key 'data.std' must hold positive numbers, got {cfg['data']['std']}")
    if cfg["data"]["validation"] and cfg["data"]["source"] == "webdataset":
        raise ConfigError("config key 'data.validation' applies to in-memory sources only (data.source is "
                          "'webdataset': write a validation index with `ccfs shards` and set data.test_root)")
    if cfg["data"]["validation"] and cfg["ccfs"]["difficulty"] == "file":
        raise ConfigError("config key 'data.validation' is true but 'ccfs.difficulty' is 'file': a score file "
                          "is aligned with the full training split, not the carved pool; compute the scores in "
                          "the run (ccfs.difficulty: forgetting, loss or el2n) or set data.validation: false")
    if cfg["data"]["decode"] == "device" and cfg["data"]["source"] != "webdataset":
        raise ConfigError(f"config key 'data.decode' is 'device', which applies to data.source webdataset only "
                          f"(data.source is {cfg['data']['source']!r}: its images are decoded once, in memory)")
    for section in ("teacher", "train"):                 # a warm-up longer than the training never ends
        warmup, epochs = cfg[section]["warmup_epochs"], cfg[section]["epochs"]
        if epochs is not None and warmup > epochs:
            raise ConfigError(f"config key '{section}.warmup_epochs' must be at most {section}.epochs ({epochs}), "
                              f"got {warmup}")
    c = cfg["ccfs"]                                      # the score file's keys go with ccfs.difficulty: file only
    if c["difficulty"] == "file" and c["difficulty_file"] is None:
        raise ConfigError("config key 'ccfs.difficulty' is 'file' but 'ccfs.difficulty_file' (the score file's "
                          "path) is not set")
    for key in ("difficulty_file", "difficulty_file_method"):
        if c["difficulty"] != "file" and c[key] is not None:
            raise ConfigError(f"config key 'ccfs.{key}' is set ({c[key]!r}) but ccfs.difficulty is "
                              f"{c['difficulty']!r}, not 'file'; set ccfs.difficulty: file or remove it")
    s = cfg["scores"]
    if s["el2n_epoch"] is not None and not 1 <= s["el2n_epoch"] <= s["epochs"]:
        raise ConfigError(f"config key 'scores.el2n_epoch' must lie in 1..scores.epochs ({s['epochs']}), "
                          f"got {s['el2n_epoch']}")
    return cfg


def load_yaml(text, where):
    """The YAML document `text` (safe tags only) with its nesting bounded by MAX_DEPTH: PyYAML composes
    nodes recursively, so a document nested 100,000 deep would end in a RecursionError; a DataError naming
    `where` instead (also for a syntax error)."""
    class Bounded(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise DataError(f"{where} nests more than {MAX_DEPTH} levels deep; refused")
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    try:
        return yaml.load(text, Loader=Bounded)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise DataError(f"{where} is not valid YAML: {exc}") from None
    except RecursionError:
        raise DataError(f"{where} nests too deep; refused") from None


def read_yaml(path):
    """The YAML document in the file at `path`, or a ConfigError saying why it cannot be read (a FIFO, a
    file over MAX_YAML_BYTES or nested deeper than MAX_DEPTH are refused before they are parsed)."""
    import os
    import stat
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file '{path}' cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"config file '{path}' is a directory; name a YAML file")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"config file '{path}' is not a regular file (a pipe or device); name a YAML file")
    if st.st_size > MAX_YAML_BYTES:
        raise ConfigError(f"config file '{path}' is {st.st_size} bytes, over the limit of {MAX_YAML_BYTES}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_YAML_BYTES + 1)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {exc.start}); name a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"config file '{path}' cannot be read: {exc.strerror or exc}") from None
    try:
        return load_yaml(text, f"config file '{path}'")
    except DataError as exc:
        raise ConfigError(str(exc)) from None


def load_config(path=None, overrides=()):
    """Defaults <- YAML file at `path` <- dotted `overrides`; validated. Returns a nested dict."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        loaded = read_yaml(path)
        if loaded is None:                     # an empty file (or only comments): the defaults
            loaded = {}
        if not isinstance(loaded, dict):       # `false` or `0` must not quietly mean "defaults"
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level, "
                              f"got {type(loaded).__name__} {loaded!r:.40}")
        try:
            _merge(cfg, loaded)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    for text in overrides:
        _merge(cfg, parse_override(text))
    return validate(cfg)


def dump_config(cfg):
    return yaml.safe_dump(cfg, sort_keys=False)
