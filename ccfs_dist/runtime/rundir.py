"""The run directory (`--out`): checked, locked, staged, committed and cleaned here, and nowhere else.

While a run uses a run directory RUN, up to three hidden siblings of RUN exist in its parent folder:

    .RUN.ccfs-lock   the lock file: one run (rank 0 of it) holds an exclusive flock for its lifetime; the
                     OS releases it when the process ends, however it ends. It holds the owner's pid.
    .RUN.ccfs-new    --overwrite of an earlier run: the new run is written here, and RUN is left untouched
                     until the new run has finished (`commit`)
    .RUN.ccfs-old    during `commit` only: the earlier run, moved aside, deleted once the new run is RUN

`release_locks` (the CLI calls it when a command ends, however it ends) removes the lock file and an
uncommitted staged run. `commit` is two renames and a delete; a run killed anywhere (SIGKILL included)
leaves a state that the next run or resume of RUN repairs first (`_recover`): the earlier run put back, or
the finished new one put in place. Temporary files of a killed run (`.name.*.tmp`, `.distilled.*.old`) are
removed when a run opens RUN.

A folder is a ccfs run when it holds the marker file `.ccfs-run`, which `open` writes first: only such a
folder is ever replaced (--overwrite), resumed or cleaned. Any other folder that is not empty is refused as
--out, and every --out is refused where it is, contains or lies inside an input of the run (io.check_outputs).

`Layout` is the one place that names what is inside RUN (docs/outputs.md lists it): every module that
writes, resumes from or reads back a run (curriculum, jobs, report, launch/ablate.py) asks it for a path,
whether a step is done, or an artifact loaded, instead of spelling a file name.
"""
import atexit
import errno
import fcntl
import os
import re
import shutil
import stat

import torch

from ccfs_dist.runtime import io
from ccfs_dist.config import dump_config, flatten
from ccfs_dist.runtime.dist import log, main_says
from ccfs_dist.errors import CCFSError, ConfigError

LEFTOVER = re.compile(r"^\..+\.(tmp|old)$")      # io.atomic_path and write_image_folder temporaries
MARKER = ".ccfs-run"                              # in every run directory: what --overwrite may replace
RESUME_FREE = {"stream.resume_other_processes"}  # keys a --resume may set otherwise than the run's config
# lock file path -> [fd, staged folder or None] of the runs this process holds (rank 0; one at a time)
_HELD = {}
_MADE = {}            # lock file path -> the folders made for it, deepest first (removed again if left empty)


def release_locks():
    """Release every run directory this process holds: an uncommitted staged run is removed, then the lock
    file is unlinked while still locked (a run that opened it meanwhile sees another inode and retries)."""
    for path, (fd, staged) in list(_HELD.items()):
        del _HELD[path]
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)
        for folder in _MADE.pop(path, ()):           # folders made for the lock, if the run left them empty
            try:
                os.rmdir(folder)
            except OSError:
                break


atexit.register(release_locks)


def is_run(folder):
    """True for a folder a ccfs run made (it holds the marker, a regular file): the only kind --overwrite
    replaces and a resume cleans."""
    marker = os.path.join(folder, MARKER)
    return os.path.isdir(folder) and os.path.isfile(marker) and not os.path.islink(marker)


def remove_run(folder):
    """Delete `folder` if it is a ccfs run or an empty folder; anything else is left alone (False)."""
    if is_run(folder):
        shutil.rmtree(folder)
    elif os.path.isdir(folder) and not os.path.islink(folder) and not os.listdir(folder):
        os.rmdir(folder)
    else:
        return False
    return True


def set_stem(name):
    """An evaluation set's name as it appears in file names ('distilled+random' -> 'distilled_random')."""
    return name.replace("+", "_")


def regime_suffix(regime):
    """An evaluation regime in file names and summary keys: KD keeps the names it always had ("");
    hard labels add "_hard"."""
    return "" if regime == "kd" else f"_{regime}"


# config keys a --resume may change, and the changes allowed: eval.labels may add a regime (its evaluations
# are trained, the existing regime's artifacts are reused as they are)
RESUME_MAY_CHANGE = {"eval.labels": {("kd", "both"), ("hard", "both")}}


class Layout:
    """The names of a run directory's artifacts, and their loaders. `dir` is the folder they live in.

    A step is finished when its final artifact (written last, atomically) exists: `finished`; a training
    keeps its mid-training state beside its artifact (`*_state.pt`) until it ends."""

    def __init__(self, folder):
        self.dir = os.fspath(folder)

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    # ------------------------------------------------------------------------------- artifact names
    def config(self):
        return self.path("config.yaml")

    def summary(self):
        return self.path("summary.json")

    def report(self):
        return self.path("report.md")

    def teacher(self):
        return self.path("teacher.pt")

    def teacher_stats(self):
        return self.path("teacher.json")

    def teacher_state(self):
        return self.path("teacher_state.pt")

    def teacher_predictions(self):
        return self.path("teacher_predictions.npz")

    def distilled(self):
        return self.path("distilled")

    def scores(self, method):
        """The difficulty scores the run computed (`ccfs.difficulty: forgetting` etc.; + .json beside it)."""
        return self.path(f"scores_{method}.npy")

    def score_run(self, r, state=False):
        return self.path("scores_runs", f"run{r}{'_state.pt' if state else '.npz'}")

    def phase(self, j, name=""):
        """phase_<j>/<name>: filter.pt, filter_state.pt, steps.json, predictions.npz, selected.npy,
        metrics.json (written last: the phase is finished)."""
        return self.path(f"phase_{j}", name)

    def synthetic(self, j):
        """synthetic/S_<j>.npy: the synthetic set after phase j (S_0: the distilled set), held in a file
        shared by the ranks (train.synthetic: shared); removed once S_<j+1> is written."""
        return self.path("synthetic", f"S_{j}.npy")

    def eval_set(self, name):
        """synthetic/<set>.npy: a baseline evaluation set held in a shared file (train.synthetic: shared)."""
        return self.path("synthetic", f"{set_stem(name)}.npy")

    def eval_run(self, name, r, state=False, regime="kd"):
        """eval/<set>_run<r>.json (KD, the paper's protocol), eval/<set>_hard_run<r>.json (hard labels)."""
        stem = f"{set_stem(name)}{regime_suffix(regime)}_run{r}"
        return self.path("eval", stem + ("_state.pt" if state else ".json"))

    def eval_summary(self, name, regime="kd"):
        """eval_<set>.json (KD), eval_<set>_hard.json (hard labels)."""
        return self.path(f"eval_{set_stem(name)}{regime_suffix(regime)}.json")

    def selected_indices(self):
        return self.path("selected_indices.json")

    # ------------------------------------------------------------------------------------ reading
    def finished(self, path):
        return os.path.exists(path)

    def complete(self):
        """The whole run has finished: summary.json is written last (then only report.md)."""
        return self.finished(self.summary())

    def finished_phases(self):
        """[(j, folder)] of the phases whose metrics.json exists, in phase order."""
        found = []
        for name in os.listdir(self.dir) if os.path.isdir(self.dir) else []:
            m = re.fullmatch(r"phase_(\d+)", name)
            if m and os.path.exists(self.phase(int(m.group(1)), "metrics.json")):
                found.append((int(m.group(1)), self.path(name)))
        return sorted(found)

    @staticmethod
    def read_json(path):
        """A JSON artifact as a dict, or None when it does not exist (yet); a DataError naming a truncated,
        oversized or too deeply nested one."""
        return io.read_json(path, "run artifact") if os.path.exists(path) else None

    @staticmethod
    def read_npz(path):
        return io.read_arrays(path, "run artifact")

    @staticmethod
    def read_npy(path):
        return io.read_array(path, "run artifact")

    @staticmethod
    def load_model(path, make_model):
        """The state dict saved at `path`, loaded into the model `make_model()` builds. Its initial weights
        are overwritten, so it is built under a forked RNG: loading consumes no seed and needs none."""
        from ccfs_dist.training.models import load_checkpoint
        with torch.random.fork_rng(devices=[]):
            model = make_model()
        return load_checkpoint(model, path)


class Run(Layout):
    """The run directory and the rank-0-writes / everyone-waits discipline around it.

    `dir` is where artifacts go: RUN itself, or its staging sibling while an --overwrite runs."""

    def __init__(self, accelerator, out_dir, resume):
        self.acc, self.resume = accelerator, resume
        self.given = os.fspath(out_dir)
        self.out = io.resolved(out_dir)          # a symlink to a run: the run itself, never the link
        super().__init__(self.out)
        parent, base = os.path.split(self.out)
        self.staged, self.old, self.lock_path = (os.path.join(parent, f".{base}.ccfs-{s}")
                                                 for s in ("new", "old", "lock"))
        self._staging = False

    def done(self, path):
        """True when resuming and the artifact at `path` (a Layout name) exists: the step that writes it
        is skipped and the artifact loaded instead."""
        return self.resume and self.finished(path)

    def resumable(self, artifact, load, make):
        """The one resume pattern of a collective step: a resumed run whose final `artifact` exists loads
        it (`load()`); otherwise every rank runs `make()`, which computes the step and writes `artifact`
        last (rank 0, through `write`), and its result is used."""
        if self.done(artifact):
            return load()
        return make()

    def write(self, fn, *args, **kwargs):
        if self.acc.is_main_process:
            fn(*args, **kwargs)
        self.acc.wait_for_everyone()

    def log(self, message):
        log(self.acc, message)

    # ------------------------------------------------------------------------------------ before work

    def check(self, cfg, overwrite, inputs=()):
        """Refuse, before any work, an --out that overlaps an input (`inputs`: (what, path)), a folder that
        is not a ccfs run, a location that cannot be written, a directory another run holds, to clobber an
        earlier run without --overwrite, or to resume one made with another config. Rank 0 takes the lock
        and repairs an interrupted commit; then every rank looks before any rank goes on to write (else rank
        1 could find rank 0's new run) and reaches the same verdict."""
        io.check_outputs([("--out", self.given)] + [(f"--out's {what}", p) for what, p in
                                                    (("lock file", self.lock_path), ("staged run", self.staged),
                                                     ("replaced run", self.old))], inputs)
        io.check_writable_folder(self.out, "--out")
        self._refuse_foreign()
        if os.path.exists(self.out) and not os.access(self.out, os.W_OK | os.X_OK):
            raise CCFSError(f"--out '{self.out}' is not writable by this user; choose another location")
        failure = None
        if self.acc.is_main_process:
            try:
                self._lock()
                self._recover()
            except CCFSError as exc:
                failure = str(exc)
        failure = main_says(self.acc, failure)
        if failure:
            raise CCFSError(failure)
        self.acc.wait_for_everyone()             # rank 0's repairs are visible to every rank
        self._refuse_foreign()
        self._check(cfg, overwrite)
        self._staging = overwrite and is_run(self.out)
        self.acc.wait_for_everyone()

    def _lock(self):
        """Hold an exclusive flock on the lock file (rank 0 only, so ranks of one run never lock each other
        out); the error names the directory and the pid of the run holding it."""
        release_locks()                          # a run that ended in this process (cli.main called again)
        while True:
            try:
                made, folder = [], os.path.dirname(self.lock_path)
                while not os.path.lexists(folder):
                    made.append(folder)
                    folder = os.path.dirname(folder)
                os.makedirs(os.path.dirname(self.lock_path), exist_ok=True)     # the lock lives beside RUN
                _MADE[self.lock_path] = made
                # O_NOFOLLOW: a lock "file" that is a symlink to the user's file is refused, never truncated
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise OSError(errno.EINVAL, "not a regular file")
            except OSError as exc:
                raise CCFSError(f"--out '{self.out}': cannot create the lock file {self.lock_path}: "
                                f"{exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise CCFSError(f"run directory '{self.out}' is in use by another run (pid {holder}); wait "
                                    f"for it to end, or choose another --out") from None
                raise CCFSError(f"--out '{self.out}': cannot lock {self.lock_path}: {exc.strerror}") from None
            try:
                if os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino:
                    break                        # else its holder unlinked it as we opened it: open the new one
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[self.lock_path] = [fd, None]

    def _recover(self):
        """Repair what a run killed during --overwrite or `commit` left (we hold the lock: nobody writes)."""
        try:
            if os.path.isdir(self.old):
                if not os.path.exists(self.out):            # killed between commit's two renames
                    if Layout(self.staged).complete():
                        os.rename(self.staged, self.out)     # the new run had finished: it goes in place
                    else:
                        os.rename(self.old, self.out)        # else the earlier run is put back
                if os.path.isdir(self.old):
                    self._remove(self.old)
            if os.path.isdir(self.staged):                   # an --overwrite run that never finished
                self._remove(self.staged)
        except OSError as exc:
            raise CCFSError(f"--out '{self.out}': cannot repair what an interrupted run left "
                            f"({exc.strerror}: {exc.filename})") from None

    def _remove(self, folder):
        if not remove_run(folder):
            raise CCFSError(f"--out '{self.out}': '{folder}' has a name a run uses beside it but holds no ccfs "
                            f"run (no {MARKER}); move it away, or choose another --out")

    def _refuse_foreign(self):
        """A folder that is not empty and holds no ccfs run (data, a home folder, anything) is never written:
        not with --overwrite (which would delete it), not with --resume (which would clean it)."""
        if os.path.isdir(self.out) and not is_run(self.out) and os.listdir(self.out):
            raise CCFSError(f"--out '{self.given}' is a folder that is not empty and holds no ccfs run (no "
                            f"{MARKER} marker in it); a run writes only into a new or empty folder or one a "
                            f"run made, and --overwrite replaces only such a run: choose another --out")

    def _check(self, cfg, overwrite):
        if not is_run(self.out) or overwrite:
            return
        saved = self.config()
        if not self.resume:
            finished = self.complete()
            what = "a finished run" if finished else "an unfinished run"
            hint = "--overwrite to replace it" if finished else "--resume to continue it, or --overwrite to start over"
            raise CCFSError(f"run directory '{self.out}' holds {what}; pass {hint}, or choose another --out")
        if not os.path.exists(saved):            # nothing to check the config against: no silent mix
            raise CCFSError(f"--resume: the run in '{self.out}' has no config.yaml to check the config "
                            f"against; pass --overwrite to start over")
        try:
            theirs = io.read_yaml_bounded(saved, "the run's config")
        except CCFSError as exc:
            raise CCFSError(f"--resume: {exc}; pass --overwrite to start over") from None
        if not isinstance(theirs, dict):
            raise CCFSError(f"--resume: the run's {saved} holds no mapping; pass --overwrite to start over")
        theirs = {k: v for k, v in flatten(theirs).items() if k not in RESUME_FREE}
        ours = {k: v for k, v in flatten(cfg).items() if k not in RESUME_FREE}
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)
                        and (theirs.get(k), ours.get(k)) not in RESUME_MAY_CHANGE.get(k, ()))
        if differ:
            shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in differ[:5])
            raise ConfigError(f"--resume: the config differs from the run's {saved} ({shown}); resume with "
                              f"the same config, or pass --overwrite to start over")
        self._check_processes(cfg)

    def _check_processes(self, cfg):
        """A streamed (webdataset) pool is dealt to ranks by shards and cut into batches per rank and loader
        worker: its trainings depend on the process count, so a resume with another count would mix two
        orders. Refused unless stream.resume_other_processes, then said (docs/distributed.md)."""
        if cfg["data"]["source"] != "webdataset":
            return
        try:
            then = io.read_json(self.path(MARKER), "run marker").get("processes")
        except (CCFSError, AttributeError):
            then = None                          # a marker without the count: nothing to compare
        now = self.acc.num_processes
        if then is None or then == now:
            return
        if not cfg["stream"]["resume_other_processes"]:
            raise ConfigError(f"--resume: the run in '{self.out}' streams its pool (data.source webdataset) and "
                              f"was started with {then} process(es), this resume has {now}; a streamed training's "
                              f"batches depend on the process count, so the result would differ from an "
                              f"uninterrupted run. Resume with {then} process(es), or set "
                              f"stream.resume_other_processes=true to accept another result")
        self.log(f"warning: resuming a streamed run started with {then} process(es) on {now}: the trainings "
                 f"still to run see other batches, the result differs from an uninterrupted run "
                 f"(stream.resume_other_processes=true)")

    # ------------------------------------------------------------------------------------- the run

    def open(self, cfg, overwrite):
        """After all inputs passed their checks: make the directory the run writes in (the staging sibling
        when it replaces an earlier run), remove what a killed run left, and save the config. A training
        state (`*_state.pt`) can only be found by a resume: a new run always starts in an empty folder."""
        if self._staging:
            self.dir = self.staged
        if self.acc.is_main_process:
            _HELD[self.lock_path][1] = self.staged if self._staging else None   # removed if never committed
            try:
                os.makedirs(self.dir, exist_ok=True)
                if not is_run(self.dir):         # checked: new or empty; the marker first, then anything else
                    io.write_json(os.path.join(self.dir, MARKER), {
                        "ccfs_run": "a ccfs-dist run directory: `ccfs run --overwrite` may replace this folder",
                        "processes": self.acc.num_processes, "streamed": cfg["data"]["source"] == "webdataset"})
                self._remove_leftovers()
                io.write_text(self.config(), dump_config(cfg))
            except OSError as exc:
                raise CCFSError(f"--out '{self.out}': cannot write the run directory ({exc.strerror}: "
                                f"{exc.filename})") from None
        self.acc.wait_for_everyone()

    def _remove_leftovers(self):
        for folder, dirs, files in os.walk(self.dir):
            for name in [d for d in dirs if LEFTOVER.match(d)]:
                shutil.rmtree(os.path.join(folder, name))
                dirs.remove(name)
            for name in files:
                if LEFTOVER.match(name):
                    os.remove(os.path.join(folder, name))

    def commit(self):
        """The run has finished: a staged run replaces the earlier one (see the module docstring for what a
        kill in between leaves and how it is repaired); then the lock is released and its file removed."""
        if self.acc.is_main_process:
            if self._staging:
                os.rename(self.out, self.old)
                os.rename(self.staged, self.out)
                remove_run(self.old)
            _HELD[self.lock_path][1] = None
            release_locks()
        self.dir = self.out
        self._staging = False
        self.acc.wait_for_everyone()
