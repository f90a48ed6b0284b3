"""`ccfs run` whose phase-2 pool scoring announces itself (touches $CCFS_TEST_MARKER) and then stalls,
so a test can SIGKILL the run in the middle of scoring."""
import os
import sys
import time

from ccfs_dist.ccfs import curriculum
from ccfs_dist.cli import main

real_predict = curriculum.predict


def stalling_predict(accelerator, model, split, index, **kwargs):
    if kwargs.get("desc") == "phase 2 score":
        open(os.environ["CCFS_TEST_MARKER"], "w").close()
        time.sleep(600)
    return real_predict(accelerator, model, split, index, **kwargs)


if __name__ == "__main__":
    curriculum.predict = stalling_predict
    sys.exit(main(["run", *sys.argv[1:]]))
