"""Translate a launcher's environment into torch's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), which is all the trainer reads (docs/ARCHITECTURE.md, "Distributed").

    name = setup_torch_env()   # before hpc.distributed.dist.init(); "torch" under torchrun, "none" alone
    rank, world, local = torch_ranks()

`detect_launcher()` alone decides which launcher started this process (`PRECEDENCE`, first match
wins): torch's own variables (torchrun), MPI (Open MPI / PMI ranks, rank 0's hostname and a free
port broadcast with mpi4py), a submitit job (JobEnvironment), an srun step (SLURM_PROCID/NTASKS/
LOCALID, first host of the step's node list). MPI comes before srun: mpirun inside an allocation
starts its daemons with srun, so its ranks inherit the daemons' SLURM_PROCID/NTASKS (one task per
node). `setup_torch_env()` then exports that launcher's view. Nothing here imports torch, so
`hpc convert` can use `mpi_world()`.
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from typing import NamedTuple

from hpc.distributed.nodelist import first_host
from hpc.errors import ConfigError

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PORT_BASE, PORT_SPAN = 20000, 20000  # MASTER_PORT = base + job id mod span: jobs sharing a node differ
MPI_VARS = {  # MPI launcher -> (rank, size, local rank) variables
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "pmi": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Intel MPI (hydra)
}


class Ranks(NamedTuple):
    rank: int
    world: int
    local: int


def job_port(job_id: str) -> int:
    digits = re.sub(r"\D", "", job_id or "")
    return PORT_BASE + int(digits or 0) % PORT_SPAN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ConfigError(f"environment: {name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment: {name}={raw!r} is not an integer") from None


def local_world(env: Mapping[str, str] = os.environ) -> int:
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE; 1 when unset): how many share its cores."""
    return max(1, _int(env, "LOCAL_WORLD_SIZE", 1))


def mpi_world(env: Mapping[str, str] = os.environ) -> Ranks | None:
    """(rank, size, local rank) from an MPI launcher's variables (mpirun / mpiexec), or None: the
    one MPI detector (a plain run never imports mpi4py)."""
    for rank, size, local in MPI_VARS.values():
        if env.get(rank) and env.get(size):
            return Ranks(_int(env, rank), _int(env, size), _int(env, local, 0))
    return None


# ---------------------------------------------------------------- which launcher
def _is_torch(env: Mapping[str, str]) -> bool:
    return "RANK" in env


def _is_submitit(env: Mapping[str, str]) -> bool:
    return bool(env.get("SUBMITIT_EXECUTOR"))


def _is_srun(env: Mapping[str, str]) -> bool:
    return "SLURM_PROCID" in env and "SLURM_NTASKS" in env


def _is_mpi(env: Mapping[str, str]) -> bool:
    return mpi_world(env) is not None


# First match wins; this order is the one rule. An srun step's variables are inherited by everything
# started inside the job, mpirun's ranks too (sbatch --wrap "mpirun ...", salloc ... mpirun): MPI's
# variables come first whenever they are set. Never compare them with SLURM_*: under `sbatch --wrap
# "mpirun -np 2"` rank 0 (started by mpirun itself) inherits the batch step's SLURM_PROCID=0/NTASKS=2,
# which equal its MPI rank and size, while rank 1 has its daemon's step: a comparison would make the
# two ranks pick different launchers and hang.
PRECEDENCE: tuple[tuple[str, Callable[[Mapping[str, str]], bool]], ...] = (
    ("torch", _is_torch), ("mpi", _is_mpi), ("submitit", _is_submitit), ("srun", _is_srun))


def detect_launcher(env: Mapping[str, str] = os.environ) -> str:
    """The launcher that started this process: torch | mpi | submitit | srun | none."""
    return next((name for name, present in PRECEDENCE if present(env)), "none")


# ---------------------------------------------------------------- each launcher's view
def _set(rank: int, world: int, local: int, addr: str, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local),
                      MASTER_ADDR=addr, MASTER_PORT=os.environ.get("MASTER_PORT") or str(port))


def _check_torch() -> None:
    missing = [v for v in TORCH_VARS if v not in os.environ and v != "LOCAL_RANK"]
    if missing and os.environ.get("WORLD_SIZE", "1") != "1":
        raise ConfigError(f"environment: RANK is set but {', '.join(missing)} is not")


def _from_submitit() -> None:
    import submitit

    env = submitit.JobEnvironment()
    _set(env.global_rank, env.num_tasks, env.local_rank, env.hostnames[0], job_port(env.job_id))


def _from_srun() -> None:
    env = os.environ
    var = "SLURM_STEP_NODELIST" if env.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    addr = first_host(env[var], var) if env.get(var) else "127.0.0.1"
    _set(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID", 0), addr,
         job_port(env.get("SLURM_JOB_ID", "")))


def _from_mpi() -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    # rank 0's host name and a port free on it right now reach every rank in one broadcast
    addr, port = comm.bcast((socket.gethostname(), free_port()) if comm.Get_rank() == 0 else None, root=0)
    _set(comm.Get_rank(), comm.Get_size(), mpi_world().local, addr, port)


EXPORT: dict[str, Callable[[], None]] = {
    "torch": _check_torch, "submitit": _from_submitit, "srun": _from_srun, "mpi": _from_mpi, "none": lambda: None}


def setup_torch_env() -> str:
    """Fill torch's variables from the launcher that started this process; returns its name."""
    name = detect_launcher()
    EXPORT[name]()
    return name


def torch_ranks(env: Mapping[str, str] = os.environ) -> Ranks:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as exported (0, 1, 0 in a plain process), checked."""
    ranks = Ranks(_int(env, "RANK", 0), _int(env, "WORLD_SIZE", 1), _int(env, "LOCAL_RANK", 0))
    if not 0 <= ranks.rank < ranks.world:
        raise ConfigError(f"environment: RANK={ranks.rank} must be in [0, WORLD_SIZE={ranks.world})")
    if env.get("MASTER_PORT") and not 1 <= _int(env, "MASTER_PORT") <= 65535:  # checked even where unused
        raise ConfigError(f"environment: MASTER_PORT={env['MASTER_PORT']} is not a TCP port (1 to 65535)")
    return ranks
