"""`ccfs run` in which one rank SIGKILLs itself at a chosen point (the others are then stopped by the launcher).

Usage (under accelerate launch, or alone: then its one process is the one killed):
kill_worker.py POINT [ccfs run args ...]; POINT is one of KILLS:
  teacher       rank 0 (the teacher's rank in the 2-process plan), after the teacher's 4th epoch
                (its 3-epoch checkpoint exists)
  distillation  rank 1, after its first recovery batch (nothing of the distilled set is written)
  scoring       rank 1, when phase 2's pool scoring starts (phase 1 finished, filter 2 trained)
  evaluation    rank 1, after the 4th epoch of CCFS evaluation model 2 (the one rank 1 trains in the
                2-process plan)
  fused         rank 0, after the 4th epoch of the fused training of CCFS evaluation models 1 and 2
                (plan.fuse >= 2; the group's states of an earlier epoch exist with train.checkpoint_every 2)
"""
import os
import signal
import sys

from ccfs_dist.ccfs import curriculum
from ccfs_dist.training import evaluate
from ccfs_dist.runtime import jobs
from ccfs_dist.cli import main
from ccfs_dist.runtime.dist import relaunch_cpu_processes

KILLS = {"teacher": 0, "distillation": 1, "scoring": 1, "evaluation": 1, "fused": 0}


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def killing_training(real, prefix):
    def train(*args, desc="", on_epoch_end=None, **kwargs):
        def hook(epoch, model):
            if on_epoch_end is not None:
                on_epoch_end(epoch, model)
            if epoch == 3:
                die()
        return real(*args, desc=desc, on_epoch_end=hook if desc.startswith(prefix) else on_epoch_end, **kwargs)
    return train


def killing_fused(real, prefix):
    """train_fused, killed after its 4th epoch (the first model's hook) when its desc starts with `prefix`."""
    def train(*args, desc="", on_epoch_end=None, **kwargs):
        if desc.startswith(prefix):
            first = on_epoch_end[0]

            def hook(epoch, model):
                first(epoch, model)
                if epoch == 3:
                    die()
            on_epoch_end = [hook, *on_epoch_end[1:]]
        return real(*args, desc=desc, on_epoch_end=on_epoch_end, **kwargs)
    return train


def killing_recover(real):
    def recover(*args, **kwargs):
        out = real(*args, **kwargs)
        die()
        return out
    return recover


def killing_predict(real):
    def predict(*args, desc="", **kwargs):
        if desc == "phase 2 score":
            die()
        return real(*args, desc=desc, **kwargs)
    return predict


if __name__ == "__main__":
    relaunch_cpu_processes([os.path.abspath(__file__), *sys.argv[1:]])
    point = sys.argv[1]
    victim = KILLS[point] if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    if int(os.environ.get("RANK", "0")) == victim:
        if point == "teacher":
            jobs.train_model = killing_training(jobs.train_model, "teacher")
        elif point == "distillation":
            curriculum.recover = killing_recover(curriculum.recover)
        elif point == "scoring":
            curriculum.predict = killing_predict(curriculum.predict)
        elif point == "fused":
            evaluate.train_fused = killing_fused(evaluate.train_fused, "eval fused ccfs")
        else:
            evaluate.train_model = killing_training(evaluate.train_model, "eval ccfs 2/")
    sys.exit(main(["run", *sys.argv[2:]]))
