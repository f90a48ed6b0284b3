#!/usr/bin/env python
"""Entry script: `accelerate launch launch/ccfs.py --config configs/<x>.yaml [key.sub=value ...]`.

Same as `ccfs run`; see `python launch/ccfs.py --help`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ccfs_dist.cli import main  # noqa: E402
from ccfs_dist.runtime.relaunch import relaunch_cpu_processes  # noqa: E402

if __name__ == "__main__":
    relaunch_cpu_processes([os.path.abspath(__file__), *sys.argv[1:]])
    sys.exit(main(["run", *sys.argv[1:]]))
