"""Child processes of a benchmark: a free port for a launcher's rendezvous, a process's memory counters."""
import socket


def free_port():
    """A TCP port free on this machine now (for a child launcher's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(field, path="/proc/self/status"):
    """A kB field of /proc/<pid>/status (VmRSS, VmHWM, ...); 0 where there is none."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0
