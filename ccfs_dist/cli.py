"""The `ccfs` command. `ccfs run` (also `accelerate launch launch/ccfs.py`) runs the CCFS pipeline;
`ccfs scores` (also `accelerate launch launch/scores.py`) computes difficulty scores of the training set."""
import argparse
import os
import sys

from ccfs_dist.errors import CCFSError

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = os.path.join(REPO_CONFIGS, "default.yaml")


def add_config_arg(p, help):
    p.add_argument("--config", default=DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None, help=help)


def add_overrides_arg(p, help):
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=help)


def add_progress_arg(p):
    p.add_argument("--progress", choices=("auto", "bars", "lines", "off"), default=None,
                   help="progress of long loops: bars on a terminal, lines (one per loop, and one a minute while "
                        "it runs) in a log file; auto (default, or $CCFS_PROGRESS) picks by whether stderr is "
                        "a terminal. Only the main process reports")


def add_timeout_arg(p):
    p.add_argument("--timeout", type=int, default=1800,
                   help="seconds a collective waits for other ranks before failing (default 1800)")


def add_run_args(p):
    add_config_arg(p, "YAML run config (default: configs/default.yaml, the digits demo)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run in --out, skipping finished steps "
                   "(the config must be the run's; eval.labels=both may add an evaluation regime to a finished run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds an earlier ccfs run (its .ccfs-run marker), once the new run has "
                        "finished; never any other folder, nor one that holds an input of the run")
    add_timeout_arg(p)
    add_progress_arg(p)
    add_overrides_arg(p, "config overrides, e.g. ccfs.ipc=20 train.epochs=5 (values parsed as YAML)")


def cmd_run(args):
    from ccfs_dist.config import load_config
    cfg = load_config(args.config, args.overrides)
    name = os.path.splitext(os.path.basename(args.config))[0] if args.config else "default"
    out = args.out or os.path.join("runs", name)
    from ccfs_dist.runtime.dist import make_accelerator
    accelerator = make_accelerator(cfg["train"]["mixed_precision"], timeout_s=args.timeout,
                                   deterministic=cfg["train"]["deterministic"])
    from ccfs_dist.ccfs.curriculum import run_ccfs
    from ccfs_dist.runtime.rundir import release_locks
    try:
        run_ccfs(accelerator, cfg, out, resume=args.resume, overwrite=args.overwrite)
    finally:
        release_locks()                    # also on failure: the lock file and an uncommitted staged run go
    from ccfs_dist.runtime.dist import log
    log(accelerator, f"outputs: {os.path.abspath(out)} (summary.json, report.md, eval_*.json; docs/outputs.md)")
    accelerator.end_training()
    return 0


def cmd_scores(args):
    from ccfs_dist.config import load_config
    cfg = load_config(args.config, args.overrides)
    from ccfs_dist.training.scores import METHODS
    methods = [m.strip() for m in (args.method or cfg["scores"]["method"]).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise CCFSError(f"--method must name one or more of {', '.join(METHODS)} (comma-separated), "
                        f"got {args.method!r}")
    methods = list(dict.fromkeys(methods))
    from ccfs_dist.runtime.io import check_outputs
    from ccfs_dist.data.sources import input_paths, load_real
    given = input_paths(cfg)                   # before anything is read in full or written
    data = load_real(cfg["data"])
    out = args.out or os.path.join("scores", f"{data.name}_{{method}}.npy")
    if len(methods) > 1 and "{method}" not in out:
        raise CCFSError(f"--out {out!r} names one file but {len(methods)} methods were asked for; put "
                        f"{{method}} in it, e.g. --out scores/{data.name}_{{method}}.npy")
    if not out.endswith(".npy"):
        raise CCFSError(f"--out {out!r} must end in .npy (a JSON file with the same stem is written beside it)")
    paths = {m: out.replace("{method}", m) for m in methods}
    from ccfs_dist.runtime.io import check_writable_folder
    written = [(what, p) for m in methods for what, p in (("--out", paths[m]),
                                                         ("--out's sidecar", os.path.splitext(paths[m])[0] + ".json"))]
    check_outputs(written, given)
    for p in paths.values():
        if os.path.isdir(p):
            raise CCFSError(f"--out '{p}' is a folder; name the .npy file to write")
        check_writable_folder(p, "--out", file=True)
    existing = [p for _, p in written if os.path.lexists(p)]
    if existing and not args.overwrite:
        raise CCFSError(f"{', '.join(existing)} already exist(s); pass --overwrite to recompute, "
                        f"or choose another --out")
    from ccfs_dist.training.scores import written_by_scores
    for m in methods:                      # --overwrite replaces only score files `ccfs scores` wrote
        written_by_scores(paths[m])
    from ccfs_dist.runtime.dist import log, make_accelerator
    accelerator = make_accelerator(cfg["train"]["mixed_precision"], timeout_s=args.timeout,
                                   deterministic=cfg["train"]["deterministic"])
    from ccfs_dist.training.scores import compute_score_files
    scores = compute_score_files(accelerator, cfg, data, paths, reuse=False)
    for m, values in scores.items():
        log(accelerator, f"{m}: {paths[m]} (+ .json): n={len(values)}, min {values.min():.4g}, "
                         f"mean {values.mean():.4g}, max {values.max():.4g}")
    accelerator.end_training()
    return 0


def cmd_shards(args):
    from ccfs_dist.config import load_config
    cfg = load_config(args.config, args.overrides)
    if args.verify:
        return verify_shards(args, cfg)
    from ccfs_dist.runtime.io import check_outputs, check_writable_folder
    from ccfs_dist.data.sources import input_paths
    check_outputs([("--out", args.out)], input_paths(cfg, checkpoints=False))
    check_writable_folder(args.out, "--out")
    from ccfs_dist.data.shards.writer import write_shards
    for split in [args.split] if args.split else ["train", "test"]:
        index = write_shards(cfg["data"], args.out, split=split, per_shard=args.per_shard,
                             overwrite=args.overwrite, workers=args.workers, resize=args.resize,
                             jpeg_quality=args.jpeg_quality)
        print(f"{split}: {index['num_samples']} samples in {len(index['shards'])} shard(s), "
              f"index {os.path.join(args.out, split + '.json')}", flush=True)
    return 0


def verify_shards(args, cfg):
    """`ccfs shards --verify`: read the shards of --out's index(es) whole and check them against the index."""
    from ccfs_dist.data.shards.reader import verify_shards as verify
    splits = [args.split] if args.split else [s for s in ("train", "test")
                                             if os.path.exists(os.path.join(args.out, s + ".json"))]
    if not splits:
        raise CCFSError(f"--verify: no train.json or test.json in --out '{args.out}'")
    for split in splits:
        index = os.path.join(args.out, split + ".json")
        n = verify(index, allow_urls=cfg["data"]["allow_urls"], allow_outside=cfg["data"]["allow_outside"])
        print(f"{split}: {n} shard(s) agree with {index} (size, sha256, keys, labels, counts)", flush=True)
    return 0


BENCH_SCRIPT = os.path.join(os.path.dirname(REPO_CONFIGS), "launch", "bench.py")


def cmd_bench(args):
    """Benchmarks live in launch/, outside the engine's import graph: run the checkout's launch/bench.py."""
    if not os.path.exists(BENCH_SCRIPT):
        raise CCFSError(f"`ccfs bench` runs the repository's launch/bench.py, which is not at {BENCH_SCRIPT}; "
                        f"run it from a checkout of ccfs-dist")
    import importlib.util
    spec = importlib.util.spec_from_file_location("ccfs_bench", BENCH_SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.main(args.args, prog="ccfs bench")


def cmd_report(args):
    from ccfs_dist.report import write_report
    print(write_report(args.run_dir), flush=True)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="ccfs", description="Curriculum Coarse-to-Fine Selection for high-IPC dataset distillation, "
                                 "distributed with Accelerate. Run under `accelerate launch` for several processes.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the CCFS pipeline: teacher, distilled set, phases, evaluation",
                       description="Run the CCFS pipeline on a config: teacher, base distilled set, curriculum "
                                   "phases (train filter, score pool, select), evaluation against baselines.")
    add_run_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("scores", help="compute per-sample difficulty scores of the real training set",
                       description="Compute difficulty scores of every real training sample: forgetting, loss (BiLP), "
                                   "el2n from scores.runs training runs on the full training set (one training "
                                   "session gives all three), or margin / logits of a model checkpoint "
                                   "(scores.checkpoint). Writes a float32 .npy aligned with the global index and "
                                   "a JSON beside it; use the file as ccfs.difficulty_file (with ccfs.difficulty=file).")
    add_config_arg(p, "YAML run config (default: configs/default.yaml, the digits demo); the scores section "
                        "holds the recipe")
    p.add_argument("--method", default=None,
                   help="forgetting | loss | el2n | margin | logits, or several comma-separated "
                        "(default: scores.method)")
    p.add_argument("--out", default=None,
                   help="output .npy; {method} is replaced by the method name (default: scores/<data>_{method}.npy)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files that `ccfs scores` wrote (its JSON sidecar says so)")
    add_timeout_arg(p)
    add_progress_arg(p)
    add_overrides_arg(p, "config overrides, e.g. scores.runs=5 scores.epochs=200 (values parsed as YAML)")
    p.set_defaults(func=cmd_scores)

    p = sub.add_parser("shards", help="write the data set as WebDataset shards (to stream the pool at scale)",
                       description="Write a split of the config's data source (digits, CIFAR, Tiny-ImageNet, image "
                                   "folders) as WebDataset tar shards plus an index JSON (OUT/train.json, "
                                   "OUT/test.json): one sample per global index, image files copied byte for byte, "
                                   "in-memory sources as lossless PNG. Then run with data.source=webdataset "
                                   "data.root=OUT/train.json data.test_root=OUT/test.json.")
    add_config_arg(p, "YAML run config whose data section names the source (default: configs/default.yaml)")
    p.add_argument("--out", required=True, help="output folder for the shards and index JSON(s)")
    p.add_argument("--split", choices=("train", "test"), default=None, help="one split only (default: both)")
    p.add_argument("--per-shard", type=int, default=2000,
                   help="samples per shard (default 2000); keep shards >= ranks x data.num_workers")
    p.add_argument("--workers", type=int, default=None, help="writer processes (default: min(8, CPUs))")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the split's shards and index in --out that `ccfs shards` wrote. Without it, "
                        "a killed write into the same --out resumes: the same command keeps the shards it "
                        "completed (OUT/<split>.progress.json) and writes the rest")
    p.add_argument("--resize", type=int, default=None, metavar="N",
                   help="image-file sources: store every image with its shorter side N (at least data.image_size; "
                        "N = data.image_size: reading only crops), JPEGs re-encoded as JPEG, others as lossless "
                        "PNG; cuts decode cost (docs/shards.md)")
    p.add_argument("--jpeg-quality", type=int, default=95, metavar="Q",
                   help="--resize: quality of the re-encoded JPEGs, 4:4:4 chroma (default 95; 100: closest to "
                        "resizing on read)")
    p.add_argument("--verify", action="store_true",
                   help="write nothing: read every shard of --out's index(es) and check its size, sha256, keys, "
                        "labels and sample count against the index (exit 2 on the first disagreement)")
    add_progress_arg(p)
    add_overrides_arg(p, "config overrides, e.g. data.root=data/imagenet data.image_size=224")
    p.set_defaults(func=cmd_shards)

    p = sub.add_parser("report", help="write report.md and figures for a run directory",
                       description="Write RUN_DIR/report.md with the results table, per-phase metrics and figures "
                                   "(selected real images per phase, distilled images, per-phase plots), from the "
                                   "run directory's artifacts only. The per-phase plots need matplotlib.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (the --out of `ccfs run`)")
    p.set_defaults(func=cmd_report)

    # every argument goes to launch/bench.py (whose parser prints the help), so `ccfs` starts without torch
    p = sub.add_parser("bench", help="per-phase throughput (filter training, scoring, selection, evaluation "
                                     "training) against the compute-only ceiling; `ccfs bench --help`",
                       add_help=False, prefix_chars="+")
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)
    return parser


def one_line(exc):
    """The message of `exc` on one line (a message may quote a library's multi-line one)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv=None):
    """Run a subcommand. User mistakes print one `error:` line and return 2. With several processes, any
    other failure prints the rank and the traceback and ends the process at once (status 1), so the
    other ranks are not left waiting in a collective: their launcher stops them, or their next
    collective fails within --timeout."""
    args = build_parser().parse_args(argv)
    if getattr(args, "progress", None):
        from ccfs_dist.runtime.progress import set_mode
        set_mode(args.progress)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):     # set but empty: as if unset (accelerate reads them too)
        if os.environ.get(name) == "":
            del os.environ[name]
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        print(f"error: the environment variable WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of "
              f"processes; unset it or launch with accelerate", file=sys.stderr, flush=True)
        return 2
    prefix = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
    try:
        status = args.func(args)
    except CCFSError as exc:
        print(f"{prefix}error: {one_line(exc)}", file=sys.stderr, flush=True)
        if world > 1:
            os._exit(2)
        return 2
    except Exception as exc:  # noqa: BLE001 - reported, then the process ends
        if world == 1:
            raise
        import traceback
        traceback.print_exc()
        print(f"{prefix}failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    from ccfs_dist.runtime.dist import exit_process
    return exit_process(status)                # several processes: no interpreter finalisation (see there)


if __name__ == "__main__":
    sys.exit(main())
