"""One `hpc train` per run directory: ``run_dir/train.lock`` names the holder (host, pid, the pid's
start time, Slurm job id). A second trainer is refused with one line naming the holder; a lock
whose holder is dead is taken over with a message. The mechanism (and why a lock file, not
``fcntl``/``flock``, on Lustre, GPFS and NFS) is hpc.io.dirlock, which `hpc convert` shares.

    with RunLock(run_dir):      # OutputError when another live trainer holds it
        ...
"""
from __future__ import annotations

import os

from hpc.io.dirlock import ALIVE_STATES, DirLock, _start_time, dead_because, describe, me  # noqa: F401

NAME = "train.lock"


class RunLock(DirLock):
    conflict = "two would interleave metrics.jsonl and checkpoints"

    def __init__(self, run_dir: str | os.PathLike, report=None):
        super().__init__(run_dir, NAME, "hpc train", "run directory", report)
