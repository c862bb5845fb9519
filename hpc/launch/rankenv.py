"""Print the distributed environment this process resolves, as one line:

    RANK=r WORLD_SIZE=w LOCAL_RANK=l MASTER_ADDR=a MASTER_PORT=p LAUNCHER=name

Run it exactly like the training (same allocation, same launcher) when a job hangs at start: each
task prints what it would use. Different WORLD_SIZEs, repeated ranks or a MASTER_ADDR that some node
cannot resolve explain most hangs. LAUNCHER is torch (torchrun), mpi (mpirun / mpiexec), submitit,
srun, or none (a plain process); "-" marks a variable a single process does not need.

examples:
  srun -N2 --ntasks-per-node=4 hpc env
  salloc -N2 -n8 mpirun -np 8 hpc env
  torchrun --standalone --nproc_per_node 2 -m hpc env
"""
from __future__ import annotations

import argparse
import os
import sys

from hpc.distributed.launcher import setup_torch_env, torch_ranks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options: the environment is the input


def line() -> str:
    """Resolve the launcher's environment (setup_torch_env) and describe it in one line."""
    name = setup_torch_env()
    rank, world, local = torch_ranks()
    addr, port = os.environ.get("MASTER_ADDR") or "-", os.environ.get("MASTER_PORT") or "-"
    return f"RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local} MASTER_ADDR={addr} MASTER_PORT={port} LAUNCHER={name}"


def run(args: argparse.Namespace) -> int:
    # one write(2) of a line shorter than PIPE_BUF: under mpirun/srun every rank writes into one
    # forwarded stream, and print()'s separate text and newline writes could interleave with another
    # rank's (seen under load: 'LAUNCHER=mpiRANK=1 ...')
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line() + "\n").encode())
    return 0
