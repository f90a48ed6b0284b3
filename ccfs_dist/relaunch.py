"""Re-launching `accelerate launch --cpu --num_processes N` as N connected processes (part of dist.py's
plumbing, in a module of its own because it runs before torch is imported: an entry script that calls it
first starts ~1.4 s sooner, since the process it replaces never imports torch).
"""
import os
import sys


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


def relaunch_cpu_processes(script_argv):
    """Replace this process by `torchrun --nproc_per_node N/M --nnodes M --node_rank R` over the same
    script when CPU processes were asked for but Accelerate started only one (see cpu_launch_requested)."""
    asked = cpu_launch_requested()
    if asked is None:
        return
    per_machine, machines, machine_rank = asked
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(per_machine),
           "--nnodes", str(machines), "--node_rank", str(machine_rank),
           "--master_addr", os.environ["MASTER_ADDR"], "--master_port", os.environ.get("MASTER_PORT", "29500"),
           *script_argv]
    sys.stdout.flush()
    os.execv(sys.executable, cmd)
