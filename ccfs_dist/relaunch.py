"""Re-launching `accelerate launch --cpu --num_processes N` as N connected processes (part of dist.py's
plumbing, in a module of its own because it runs before torch is imported).

Accelerate's launcher starts a single process for `--cpu` (multi-CPU needs mpirun). The entry script calls
`relaunch_cpu_processes` first; this process then becomes a small supervisor that never imports torch: it
starts this machine's share of the ranks itself, with the environment torchrun would give them (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT; torch.distributed's env://
rendezvous, rank 0 hosting the store), stops the others as soon as one fails, and forwards signals.
Starting the ranks directly instead of through torchrun saves one torch import on the critical path
(BENCHMARKS.md, "Scale-out"); `CCFS_RELAUNCH=torchrun` switches back to torchrun.
"""
import os
import signal
import subprocess
import sys
import time

STOP_GRACE_S = 10        # after a rank failed: seconds the others get to exit on SIGTERM before SIGKILL
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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


def supervise(argvs, envs):
    """Start one process per (argv, env), wait for all; when one fails, stop the rest (SIGTERM, then SIGKILL
    after STOP_GRACE_S). Returns the exit status: 0, or the first failure's."""
    procs = []

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)
    previous = {s: signal.signal(s, forward) for s in FORWARDED}     # before the first start: none is missed
    try:
        try:
            procs.extend(subprocess.Popen(argv, env=env) for argv, env in zip(argvs, envs))
        except OSError:                  # a rank could not be started: the ones that were must not run on
            for p in procs:
                p.kill()
                p.wait()
            raise
        while True:
            codes = [p.poll() for p in procs]
            failed = next((p for p, code in zip(procs, codes) if code not in (None, 0)), None)
            if failed is not None or all(code == 0 for code in codes):
                break
            wait_for_a_child()
        if failed is None:
            return 0
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return exit_code(failed.returncode)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def relaunch_cpu_processes(script_argv):
    """When CPU processes were asked for but Accelerate started only one (see cpu_launch_requested), run
    this machine's ranks of `script_argv` under `supervise` and exit with their status; else return."""
    asked = cpu_launch_requested()
    if asked is None:
        return
    per_machine, machines, machine_rank = asked
    sys.stdout.flush()
    if os.environ.get("CCFS_RELAUNCH") == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(per_machine),
               "--nnodes", str(machines), "--node_rank", str(machine_rank),
               "--master_addr", os.environ["MASTER_ADDR"], "--master_port", os.environ.get("MASTER_PORT", "29500"),
               *script_argv]
        os.execv(sys.executable, cmd)
    envs = rank_environments(per_machine, machines, machine_rank, os.environ)
    sys.exit(supervise([[sys.executable, *script_argv]] * per_machine, envs))
