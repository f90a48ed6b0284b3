"""Processes and the run: distributed plumbing, the CPU relaunch, the plan and its jobs, the run directory, atomic I/O, seed streams, progress."""
