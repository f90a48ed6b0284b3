import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(args, processes=2, timeout=600, env_extra=None):
    """Run `accelerate launch --cpu --num_processes N ARGS` from the repo root; return CompletedProcess.

    The launcher starts in a session (and process group) of its own; at `timeout` the whole group is
    killed (launcher, supervisor, ranks, fork servers, loader workers) before TimeoutExpired is raised,
    so that a hung run leaves no process behind."""
    import signal
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port())] + list(args)
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            stdout, stderr = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
        finally:
            if proc.poll() is None:          # interrupted (Ctrl-C in pytest): nothing of the run goes on
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture
def launch():
    return accelerate_launch


def run_here(capsys, args):
    """`ccfs run ARGS` in this process, without a process start-up (the entry script has its own tests in
    test_run.py): an object with the exit status and the output, as subprocess.run's."""
    from types import SimpleNamespace
    from ccfs_dist import cli
    capsys.readouterr()
    code = cli.main(["run", *args])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def run_on_one_thread(args):
    """`ccfs run ARGS` in this process on one thread, as a launched rank (OMP_NUM_THREADS=1), so that its
    artifacts are byte for byte those of a launched run: the exit status (output left to pytest)."""
    import torch
    from ccfs_dist import cli
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main(["run", *args])
    finally:
        torch.set_num_threads(threads)


def worker_main_in_process(script, *args, **kw):
    """`main(*args, **kw)` of the worker script `script` (tests/workers/...) called in this process, on one
    thread as a launched rank (OMP_NUM_THREADS=1): the 1-process side of a 1-vs-2-process comparison
    without a process start-up (and the loader's fork server, if any, is this process's, started once)."""
    import importlib.util
    import torch
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(script))[0], script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return module.main(*args, **kw)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- one pinned run per test session
# A tiny whole run, in this process, with the trainings, the KD loss, the augmentation and the distiller
# observed as the run calls them: tests/test_pins.py checks what it selected (against tests/selection_check.py)
# and how each piece was wired (filters on S_{j-1} with KD at the configured temperature, the recipe, seeds).
# Non-default values (temperature, r_bn, flip, scale_min, warm-up) so that a piece that ignores its
# setting shows.
PINNED = ["data.source=digits", "ccfs.difficulty=logits", "teacher.epochs=2", "distill.iterations=8", "distill.r_bn=0.05", "ccfs.ipc=7",
          "ccfs.alpha=0.15", "ccfs.phases=3", "train.epochs=3", "train.temperature=4.0", "train.warmup_epochs=1",
          "train.lr=0.05", "aug.flip=false", "aug.scale_min=0.5", "eval.runs=2", "eval.baselines=false",
          "model.width=8"]


@pytest.fixture(scope="session")
def pinned_run(tmp_path_factory):
    """(run folder, calls): `calls` lists what the run handed to each piece, in call order."""
    import ccfs_dist.ccfs.curriculum as curriculum
    import ccfs_dist.training.evaluate as evaluate
    import ccfs_dist.runtime.jobs as jobs
    import ccfs_dist.training.train as train
    from ccfs_dist import cli

    calls = {"train": [], "kd": [], "augment": [], "recover": []}
    train_model, kd_loss, augment, recover = train.train_model, train.kd_loss, train.Augment, curriculum.recover

    def spy_train(accelerator, model, images, labels, recipe, **kw):
        init = {key: value.detach().clone() for key, value in model.state_dict().items()}
        model, stats = train_model(accelerator, model, images, labels, recipe, **kw)
        calls["train"].append({"desc": kw.get("desc"), "images": torch_copy(images), "labels": torch_copy(labels),
                               "recipe": recipe, "seed": kw.get("seed"), "teacher": kw.get("teacher") is not None,
                               "lrs": stats["lrs"], "steps": stats["steps"], "init": init})
        return model, stats

    def spy_kd(student_logits, teacher_logits, temperature):
        calls["kd"].append(float(temperature))
        return kd_loss(student_logits, teacher_logits, temperature)

    def spy_augment(*args, **kw):
        calls["augment"].append(kw)
        return augment(*args, **kw)

    def spy_recover(*args, **kw):
        calls["recover"].append(kw)
        return recover(*args, **kw)

    out = str(tmp_path_factory.mktemp("pinned") / "run")
    with pytest.MonkeyPatch.context() as mp:
        for module in (jobs, evaluate):
            mp.setattr(module, "train_model", spy_train)
        mp.setattr(train, "kd_loss", spy_kd)
        mp.setattr(train, "Augment", spy_augment)
        mp.setattr(curriculum, "recover", spy_recover)
        assert cli.main(["run", "--out", out, *PINNED]) == 0
    return out, calls


# --------------------------------------------------------------------------- one finished run per test session
# The default config (forgetting scores from 2 short runs), shortened: the run directory that the tests of bad
# input, run directories, ownership and reports start from. They only read it or copy it (run_dir in
# test_bad_input.py), so one run serves the whole session.
FINISHED_RUN = ["teacher.epochs=2", "distill.iterations=5", "ccfs.ipc=6", "ccfs.alpha=0.34", "ccfs.phases=2",
                "train.epochs=2", "eval.runs=1", "eval.baselines=false", "model.width=8", "scores.runs=2",
                "scores.epochs=4"]


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    from ccfs_dist.cli import main
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "--out", str(out)] + FINISHED_RUN) == 0
    return out


def torch_copy(x):
    import numpy as np
    import torch
    return torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x.detach().cpu().clone()
