"""Re-launching `accelerate launch --cpu --num_processes N` as N connected processes (part of dist.py's
plumbing, in a module of its own because it runs before torch is imported).

Accelerate's launcher starts a single process for `--cpu` (multi-CPU needs mpirun). The entry script calls
`relaunch_cpu_processes` first; this process then becomes a small supervisor that never imports torch: it
starts this machine's share of the ranks itself, with the environment torchrun would give them (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT; torch.distributed's env://
rendezvous, rank 0 hosting the store), stops the others as soon as one fails, and forwards signals (ranks
still running STOP_GRACE_S after a forwarded signal are killed).

Nothing outlives its launcher: the supervisor, and every rank it starts (or torchrun starts), asks the kernel
for a signal when its parent dies (`die_with_parent`), so a launcher killed outright (SIGKILL, which nobody
can forward) still ends its ranks, and a rank's end ends its loader workers (shard_loader.py).
Starting the ranks directly instead of through torchrun saves one torch import on the critical path
(BENCHMARKS.md, "Scale-out"); `CCFS_RELAUNCH=torchrun` switches back to torchrun.
"""
import ctypes
import os
import signal
import subprocess
import sys
import time

STOP_GRACE_S = 10        # after a rank failed or a signal was forwarded: seconds the ranks get before SIGKILL
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SUPERVISOR_ENV = "CCFS_SUPERVISOR_PID"     # set in the ranks the supervisor starts: their parent's pid
PR_SET_PDEATHSIG = 1                       # prctl option, linux/prctl.h


def die_with_parent(signum=signal.SIGTERM, parent=None):
    """Have the kernel send this process `signum` when its parent ends (Linux prctl PR_SET_PDEATHSIG; the
    request survives exec). `parent`: the pid the parent must still have, else it ended before the request
    took effect and `signum` is raised at once. Returns False where the platform has no such request (the
    callers then rely on their own checks of the parent)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ok = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if ok and parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signum)
    return ok


def watch_launcher():
    """In a rank: end with the process that started it. A rank of our supervisor (SUPERVISOR_ENV names its
    parent) or of torchrun (TORCHELASTIC_RUN_ID) gets SIGTERM when that parent ends, however it ends; its
    default action ends the rank at once, wherever it waits (a collective, a loader)."""
    env = os.environ
    supervisor = env.pop(SUPERVISOR_ENV, "")     # popped: a program this rank runs is not the supervisor's rank
    if supervisor.isdigit():
        die_with_parent(signal.SIGTERM, parent=int(supervisor))
    elif "TORCHELASTIC_RUN_ID" in env and "RANK" in env:
        die_with_parent(signal.SIGTERM)


def _flag_value(argv, flag):
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def cpu_launch_requested():
    """(processes on this machine, machines, this machine's rank) when we were started by
    `accelerate launch --cpu --num_processes N [--num_machines M --machine_rank R]` without MPI and
    N > 1, else None. N counts the processes of all machines (Accelerate's meaning), N / M run here.

    Accelerate's launcher starts a single process in that case (multi-CPU needs mpirun) but sets
    MASTER_ADDR; the requested counts are read from the launcher's command line (Linux /proc).
    """
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1") or "MASTER_ADDR" not in env:
        return None
    if any(k in env for k in ("LOCAL_RANK", "RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        return None
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any("accelerate" in a for a in parent):
        return None
    values = [_flag_value(parent, flag) for flag in ("--num_processes", "--num_machines", "--machine_rank")]
    total, machines, machine_rank = (int(v) if v and v.isdigit() else d for v, d in zip(values, (1, 1, 0)))
    if total <= 1 or total % machines:
        return None
    return total // machines, machines, machine_rank


def rank_environments(per_machine, machines, machine_rank, env):
    """The environment of each rank this machine starts: torchrun's variables for the env:// rendezvous."""
    world = per_machine * machines
    common = dict(env, WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(per_machine), GROUP_RANK=str(machine_rank),
                  GROUP_WORLD_SIZE=str(machines), MASTER_PORT=env.get("MASTER_PORT", "29500"))
    # torchrun's default: one thread per rank unless the user chose; several ranks must not oversubscribe
    common.setdefault("OMP_NUM_THREADS", "1")
    return [dict(common, RANK=str(machine_rank * per_machine + i), LOCAL_RANK=str(i), ROLE_RANK=str(i))
            for i in range(per_machine)]


def exit_code(status):
    """A child's returncode as a shell would report it (killed by signal s: 128 + s)."""
    return 128 - status if status < 0 else status


def wait_for_a_child():
    """Block until a child of this process has exited, leaving it for Popen.poll to reap (WNOWAIT), so the
    supervisor notices a rank's end at once instead of at its next poll. A forwarded signal's handler runs
    meanwhile (the call is retried after it, PEP 475)."""
    if not hasattr(os, "waitid"):            # no waitid (not Linux): poll
        time.sleep(0.05)
        return
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:                # every child has been reaped already
        pass


class _Stop(Exception):
    """Raised by the signal handler to end a wait for a rank early (see supervise)."""


def supervise(argvs, envs):
    """Start one process per (argv, env) (each gets SUPERVISOR_ENV = this pid), wait for all; when one fails,
    stop the rest (SIGTERM, then SIGKILL after STOP_GRACE_S). A forwarded signal starts the same clock: ranks
    still running STOP_GRACE_S after it are killed. Returns the exit status: 0, or the first failure's."""
    procs, signalled, waiting = [], [], [False]

    def forward(signum, _frame):
        signalled.append(time.monotonic())
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)
        if waiting[0]:                   # leave the wait for a child: the grace period runs from now
            waiting[0] = False           # (once: a second signal must not raise where nothing catches it)
            raise _Stop
    previous = {s: signal.signal(s, forward) for s in FORWARDED}     # before the first start: none is missed
    try:
        try:
            mark = {SUPERVISOR_ENV: str(os.getpid())}
            for argv, env in zip(argvs, envs):
                if signalled:            # stopped while starting: start no more
                    break
                procs.append(subprocess.Popen(argv, env=dict(env, **mark)))
        except OSError:                  # a rank could not be started: the ones that were must not run on
            for p in procs:
                p.kill()
                p.wait()
            raise
        while True:
            codes = [p.poll() for p in procs]
            failed = next((p for p, code in zip(procs, codes) if code not in (None, 0)), None)
            if failed is not None or all(code == 0 for code in codes) or signalled:
                break
            try:
                waiting[0] = True
                if not signalled:        # a signal between the check above and here: no wait
                    wait_for_a_child()
                waiting[0] = False
            except _Stop:
                pass
        if failed is None and not signalled:
            return 0
        if not signalled:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        deadline = (signalled[0] if signalled else time.monotonic()) + STOP_GRACE_S
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        failed = failed or next((p for p in procs if p.returncode != 0), None)
        return exit_code(failed.returncode) if failed is not None else 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def relaunch_cpu_processes(script_argv):
    """When CPU processes were asked for but Accelerate started only one (see cpu_launch_requested), run
    this machine's ranks of `script_argv` under `supervise` and exit with their status; else return."""
    asked = cpu_launch_requested()
    if asked is None:
        watch_launcher()                 # a rank (of ours or torchrun's), or a single process: nothing
        return
    per_machine, machines, machine_rank = asked
    # the launcher (`accelerate launch`) may be killed outright: then this supervisor is told, and stops
    # the ranks as for a forwarded SIGTERM (also after exec into torchrun, whose agent stops its workers)
    die_with_parent(signal.SIGTERM, parent=os.getppid())
    sys.stdout.flush()
    if os.environ.get("CCFS_RELAUNCH") == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(per_machine),
               "--nnodes", str(machines), "--node_rank", str(machine_rank),
               "--master_addr", os.environ["MASTER_ADDR"], "--master_port", os.environ.get("MASTER_PORT", "29500"),
               *script_argv]
        os.execv(sys.executable, cmd)
    envs = rank_environments(per_machine, machines, machine_rank, os.environ)
    sys.exit(supervise([[sys.executable, *script_argv]] * per_machine, envs))
