"""On-demand mutation check: one-line bugs of the algorithm and its recipes that the tests must catch.

    python tests/mutants.py                 # every mutant against the pinned tests (PINNED_TESTS)
    python tests/mutants.py -k kd -j 2      # the mutants whose name holds "kd", two at a time
    python tests/mutants.py --tests tests/test_run.py   # against other test files

Each mutant is (name, file, old text, new text, why). The old text must occur exactly once in the file
(else the mutant is reported as stale: the code moved on and the list needs updating). Each is applied to
a fresh copy of the repository (its git-tracked and untracked, not ignored files) in a temporary folder,
the chosen tests run there with `pytest -x`, and the mutant is *killed* when they fail. The survivors are
printed, and the exit status is 1 when any survived (2 when one is stale or pytest itself failed). docs/tests-and-benchmarks.md
has the latest result.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL_SCORES = os.path.join(os.path.dirname(ROOT), "shared", "reference", "ccfs-official-scores")

# the fast tests that pin answers (the whole-run ones share one small in-process run)
PINNED_TESTS = ["tests/test_pins.py", "tests/test_selection.py", "tests/test_difficulty.py", "tests/test_recipes.py",
                "tests/test_augment.py", "tests/test_official.py",
                "tests/test_scores.py::test_forgetting_rule_last_presentation_and_never_learned",
                "tests/test_scores.py::test_ccfs_run_with_computed_forgetting",
                "tests/test_regimes.py::test_hard_regime_trains_without_the_teacher"]

S, C, D, T, E, J, DI, SC, SE, A = ("ccfs_dist/ccfs/selection.py", "ccfs_dist/ccfs/curriculum.py", "ccfs_dist/ccfs/difficulty.py",
                                   "ccfs_dist/training/train.py", "ccfs_dist/training/evaluate.py", "ccfs_dist/runtime/jobs.py",
                                   "ccfs_dist/training/distill.py", "ccfs_dist/training/scores.py", "ccfs_dist/runtime/seeds.py",
                                   "ccfs_dist/training/augment.py")

MUTANTS = [
    # --- selection: coarse, fine, ties, tiers, budgets
    ("fine-hardest", S, 'key_of = lambda p: hardness[p]  ', 'key_of = lambda p: -hardness[p] ',
     "the simple order takes the hardest images"),
    ("coarse-correct", S, 'coarse_ok = (pred != label) if coarse', 'coarse_ok = (pred == label) if coarse',
     "the coarse rule keeps the correctly classified samples"),
    ("teacher-ignored", S, 'tier1 = coarse_ok if teacher_correct is None else coarse_ok & teacher_correct',
     'tier1 = coarse_ok', "the teacher-correct condition is dropped"),
    ("tiers-swapped", S, 'tier = np.where(coarse_ok, 2, 3)', 'tier = np.where(coarse_ok, 3, 2)',
     "the fallback takes the coarse-rule failures before the not-teacher-correct candidates"),
    ("ties-larger-index", S, 'packed = (number << np.uint64(32)) | index[order].astype(np.uint64)',
     'packed = (number << np.uint64(32)) | (np.uint64(2**32 - 1) - index[order].astype(np.uint64))',
     "equal difficulty is broken by the larger index"),
    ("budget-remainder-late", S, 'return [base + 1] * extra + [base] * (j - extra)',
     'return [base] * (j - extra) + [base + 1] * extra', "the remainder of the budget goes to the last phases"),
    ("budget-round", S, 'math.floor(ipc * Fraction(repr(float(alpha))))', 'round(ipc * Fraction(repr(float(alpha))))',
     "the distilled share is rounded instead of floored"),
    ("budget-official-flag", S, 'official=ccfs["compat"] == "official")', 'official=False)',
     "the plan and the run lose ccfs.compat official's int(ipc * alpha)"),
    ("quota-k-plus-one", S, 'group, quota = label, np.full(num_classes, k, dtype=np.int64)',
     'group, quota = label, np.full(num_classes, k + 1, dtype=np.int64)', "one image too many per class"),
    ("fine-hard-easiest", S, 'key_of = lambda p: -hardness[p] ', 'key_of = lambda p: hardness[p]  ',
     "fine 'hard' takes the easiest images"),
    ("official-fine-direction", S, 'key = hardness[candidates] if fine == "simple" else -hardness[candidates]',
     'key = -hardness[candidates] if fine == "simple" else -hardness[candidates]',
     "ccfs.compat official's simple order takes the hardest images"),
    ("budget-remainder-dropped", S, 'base, extra = divmod(budget, j)', 'base, extra = budget // j, 0',
     "the remainder of the real budget is never selected"),
    # --- difficulty directions and the run's difficulty
    ("logits-direction", D, '"logits": False,', '"logits": True, ', "a high true-class logit read as hard"),
    ("forgetting-direction", D, '"forgetting": True,', '"forgetting": False,', "many forgetting events read as easy"),
    ("logits-from-margin", C, 'to_hardness(preds["true_logit"], "logits")', 'to_hardness(preds["margin"], "logits")',
     "the logits difficulty reads the margin column"),
    ("logits-negated", C, 'to_hardness(preds["true_logit"], "logits")', 'to_hardness(-preds["true_logit"], "logits")',
     "the logits difficulty read the wrong way"),
    # --- the curriculum's wiring
    ("pool-keeps-selected", C, 'pool = np.setdiff1d(np.arange(len(data.train)), selected)',
     'pool = np.arange(len(data.train))', "the pool still holds the images selected earlier"),
    ("selected-not-accumulated", C, 'selected = np.concatenate([selected, new])', 'selected = new',
     "only the last phase's images count as selected"),
    ("s-j-loses-previous", C, '[synthetic, (data.train, new)]', '[(data.train, new)]',
     "S_j loses the images of S_{j-1}"),
    ("teacher-correct-off", C, 'teacher_ok = tp["pred"] == tp["label"] if c["teacher_correct"] else None',
     'teacher_ok = None', "the run drops the teacher-correct rule"),
    ("teacher-ok-misaligned", C, 'teacher_correct=teacher_ok[preds["index"]] if',
     'teacher_correct=teacher_ok[:len(preds["index"])] if', "teacher predictions not aligned with the pool"),
    ("s-j-duplicates-earlier", C, '[synthetic, (data.train, new)]', '[synthetic, (data.train, selected)]',
     "S_j adds every image selected so far again, not phase j's"),
    ("teacher-correct-inverted", C, 'teacher_ok = tp["pred"] == tp["label"] if', 'teacher_ok = tp["pred"] != tp["label"] if',
     "candidates must be misclassified by the teacher"),
    ("distill-no-bn-weight", C, 'r_bn=d["r_bn"], jitter', 'r_bn=0.0, jitter', "the distiller ignores distill.r_bn"),
    # --- the trainings' wiring
    ("filter-without-kd", J, 'teacher=teacher if cfg["train"]["kd"] else None, seed=seed,',
     'teacher=None, seed=seed,', "filters trained without KD"),
    ("eval-without-kd", E, 'evaluate_run(accelerator, images, labels, teacher=teacher if regime == "kd" else None,',
     'evaluate_run(accelerator, images, labels, teacher=None,', "evaluation models trained without KD"),
    ("hard-regime-keeps-teacher", E, 'teacher=teacher if regime == "kd" else None, **kw)', 'teacher=teacher, **kw)',
     "eval.labels hard still distils from the teacher"),
    ("eval-one-seed", J, 'seed=seeds.eval_run(cfg["seed"], r)', 'seed=seeds.eval_run(cfg["seed"], 0)',
     "one seed for every evaluation model"),
    ("eval-seed-table", SE, 'return seed + 500 + run', 'return seed + 500', "one seed for every evaluation model"),
    ("filter-one-seed", SE, 'return seed + 1000 * phase', 'return seed + 1000', "one seed for every filter"),
    ("warm-start-always", J, 'if cfg["ccfs"]["warm_start"] and j > 1:', 'if j > 1:',
     "filters start from the previous filter although ccfs.warm_start is off"),
    # --- recipes
    ("kd-no-temperature", T, 'log_p = F.log_softmax(student_logits.float() / t, dim=1)',
     'log_p = F.log_softmax(student_logits.float(), dim=1)', "the student's logits are not softened"),
    ("kd-no-t-squared", T, 'reduction="batchmean") * (t * t)', 'reduction="batchmean") * t',
     "the T^2 factor of the KD loss dropped"),
    ("kd-temperature-ignored", T, 'temperature=self.recipe.temperature,', 'temperature=20.0,',
     "training ignores train.temperature"),
    ("kd-is-cross-entropy", T, 'loss = kd_loss(logits, teacher_logits, temperature)',
     'loss = F.cross_entropy(logits.float(), teacher_logits.argmax(1))', "KD replaced by hard teacher labels"),
    ("kd-teacher-not-softened", T, 'q = F.softmax(teacher_logits.float() / t, dim=1)',
     'q = F.softmax(teacher_logits.float(), dim=1)', "the teacher's logits are not softened"),
    ("kd-mean-reduction", T, 'reduction="batchmean") * (t * t)', 'reduction="mean") * (t * t)',
     "the KL divergence averaged over classes too"),
    ("warmup-dropped-from-recipe", T, 'warmup_epochs=t["warmup_epochs"], warmup_start=t["warmup_start"],',
     'warmup_epochs=0, warmup_start=t["warmup_start"],', "filters and evaluation models train without warm-up"),
    ("cosine-ignores-warmup", T, 'progress = (step - warmup) / max(1, total - warmup)',
     'progress = step / max(1, total)', "the cosine starts at step 0, not after the warm-up"),
    ("warmup-start-ignored", T, 'return warmup_start + (1.0 - warmup_start) * step / warmup',
     'return (step + 1) / warmup', "train.warmup_start (the official LinearLR start) ignored"),
    ("warmup-off-by-one", T, 'return (step + 1) / warmup', 'return step / warmup', "the warm-up starts at lr 0"),
    ("cosine-half", T, 'math.cos(math.pi * min(1.0, progress))', 'math.cos(0.5 * math.pi * min(1.0, progress))',
     "the cosine decays only to half the lr"),
    ("flip-always", T, 'scale_min=r.scale_min, flip=r.flip, crop=r.crop,\n',
     'scale_min=r.scale_min, flip=True, crop=r.crop,\n', "training flips although aug.flip is off"),
    ("recipe-flip", T, 'temperature=t["temperature"], scale_min=a["scale_min"], flip=a["flip"],',
     'temperature=t["temperature"], scale_min=a["scale_min"], flip=True,', "the recipe ignores aug.flip"),
    ("crop-flip-ignored", A, 'flips = (u[:, 4] < 0.5) if flip else', 'flips = (u[:, 4] < 0.5) if True else',
     "the crop boxes flip although flip is off"),
    ("eval-best-epoch", E, '{"final": final, "official": max(seen', '{"final": max(seen + [final]), "official": max(seen',
     "evaluation reports the best epoch instead of the final one"),
    ("summary-reports-best", E, 'final = [r["final"] for r in runs]', 'final = [r["official"] for r in runs]',
     "the summary's headline takes each run's best epoch"),
    ("eval-model-init-one-seed", E, 'model = seeded_model(model_cfg, data, seed)',
     'model = seeded_model(model_cfg, data, 0)', "every evaluation model starts from the same weights"),
    ("eval-after-80-inclusive", E, 'if epoch > best_after * recipe.epochs:', 'if epoch >= best_after * recipe.epochs:',
     "the official protocol looks at one epoch too many"),
    # --- distiller and scores
    ("bn-term-dropped", DI, 'loss = F.cross_entropy(logits, targets) + r_bn * hooks.pop()',
     'loss = F.cross_entropy(logits, targets) + 0 * hooks.pop()', "the distiller's BN-matching term dropped"),
    ("bn-unbiased-var", DI, 'var = x.var(dim=(0, 2, 3), unbiased=False)', 'var = x.var(dim=(0, 2, 3), unbiased=True)',
     "BN matching with the unbiased variance (BatchNorm normalises with the biased one)"),
    ("forgetting-never-learned-zero", SC, 'np.where(self.learned, self.events, self.epochs)',
     'np.where(self.learned, self.events, 0)', "never-learned samples count as unforgettable"),
    ("forgetting-never-learned-by-last-epoch", SC, 'np.where(self.learned, self.events, self.epochs)',
     'np.where(self.previous, self.events, self.epochs)',
     "samples wrong in the last epoch count as never learned"),
    ("forgetting-learning-events", SC, 'self.events += self.previous & ~correct', 'self.events += ~self.previous & correct',
     "learning events counted instead of forgetting events"),
]


def copy_repo(dest):
    """The repository's tracked and untracked, not ignored files (as the device runner sees a worktree)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = os.path.join(ROOT, f)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, f))


def try_mutant(mutant, tests, timeout):
    name, path, old, new, _ = mutant
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        copy_repo(tmp)
        text = open(os.path.join(tmp, path)).read()
        if text.count(old) != 1:
            return name, "stale", 0.0, f"old text found {text.count(old)} times in {path}"
        with open(os.path.join(tmp, path), "w") as f:
            f.write(text.replace(old, new))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=tmp, PYTHONDONTWRITEBYTECODE="1")
        if os.path.isdir(OFFICIAL_SCORES):        # the copy is not beside ../shared: point its tests at the files
            env.setdefault("CCFS_OFFICIAL_SCORES", OFFICIAL_SCORES)
        start = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                  cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return name, "killed", time.monotonic() - start, "timed out"
        seconds = time.monotonic() - start
        if proc.returncode == 0:
            return name, "survived", seconds, ""
        if proc.returncode == 2:                  # a collection error: the mutant broke an import
            return name, "killed", seconds, "pytest exit 2 (collection error)"
        if proc.returncode != 1:                  # 3-5: pytest's internal or usage errors: no verdict
            return name, "error", seconds, f"pytest exit {proc.returncode}: {proc.stdout[-200:]!r}"
        failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
        return name, "killed", seconds, failed[0][7:120] if failed else ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-k", default="", help="only the mutants whose name contains this")
    p.add_argument("-j", type=int, default=1, help="mutants tried at once (each runs its tests in one process)")
    p.add_argument("--tests", nargs="+", default=PINNED_TESTS, help="test files or ids to run (default: the pinned ones)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per mutant (a timeout counts as killed)")
    p.add_argument("--list", action="store_true", help="print the mutants and exit")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if args.k in m[0]]
    if args.list:
        for name, path, _, _, why in chosen:
            print(f"{name:<32}{path:<28}{why}")
        return 0
    start = time.monotonic()
    results = []
    with ThreadPoolExecutor(args.j) as pool:
        for name, outcome, seconds, detail in pool.map(lambda m: try_mutant(m, args.tests, args.timeout), chosen):
            print(f"{outcome:<9}{seconds:7.1f}s  {name:<32}{detail}", flush=True)
            results.append((name, outcome))
    killed = sum(o == "killed" for _, o in results)
    stale = [n for n, o in results if o == "stale"]
    survived = [n for n, o in results if o == "survived"]
    errors = [n for n, o in results if o == "error"]
    applied = len(results) - len(stale) - len(errors)
    print(f"\nkilled {killed} of {applied} mutants ({100 * killed / max(1, applied):.0f} %) in "
          f"{time.monotonic() - start:.0f} s; survived: {', '.join(survived) or 'none'}"
          + (f"; stale (update the list): {', '.join(stale)}" if stale else "")
          + (f"; no verdict (pytest error): {', '.join(errors)}" if errors else ""))
    return 2 if stale or errors else 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
