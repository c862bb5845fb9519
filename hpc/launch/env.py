"""Translate a launcher's environment into torch's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), which is all the trainer reads (docs/ARCHITECTURE.md, "Distributed").

    setup_torch_env()   # before hpc.dist.init(); a no-op under torchrun or in a plain process

Order: torch's own variables (torchrun) win; then a submitit job (JobEnvironment), an srun step
(SLURM_PROCID/NTASKS/LOCALID, first host of SLURM_JOB_NODELIST), and MPI (Open MPI / PMI ranks,
rank 0's hostname broadcast with mpi4py). Returns the launcher's name ("none" when alone).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

from hpc.errors import ConfigError

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PORT_BASE, PORT_SPAN = 20000, 20000  # MASTER_PORT = base + job id mod span: jobs sharing a node differ


def job_port(job_id: str) -> int:
    digits = re.sub(r"\D", "", job_id or "")
    return PORT_BASE + int(digits or 0) % PORT_SPAN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> host names: "gpu[01-03,07],cpu5" -> gpu01 gpu02 gpu03 gpu07 cpu5.

    Handles one bracket group per host name (the form Slurm emits); zero padding is preserved.
    """
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot parse range {part!r}")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (scontrol when available, else expand_nodelist)."""
    if shutil.which("scontrol"):
        r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                           text=True, timeout=30)
        if r.returncode == 0 and r.stdout.split():
            return r.stdout.split()[0]
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: no host names")
    return hosts[0]


def _set(rank: int, world: int, local: int, addr: str, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local),
                      MASTER_ADDR=addr, MASTER_PORT=os.environ.get("MASTER_PORT") or str(port))


def _from_submitit() -> bool:
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return False
    import submitit

    env = submitit.JobEnvironment()
    _set(env.global_rank, env.num_tasks, env.local_rank, env.hostnames[0], job_port(env.job_id))
    return True


def _from_srun() -> bool:
    if "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return False
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    addr = first_host(nodelist) if nodelist else "127.0.0.1"
    _set(int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
         int(os.environ.get("SLURM_LOCALID", "0")), addr, job_port(os.environ.get("SLURM_JOB_ID", "")))
    return True


MPI_VARS = {  # launcher -> (rank, size, local rank)
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "pmi": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
}


def _from_mpi() -> bool:
    names = next((v for v in MPI_VARS.values() if v[0] in os.environ and v[1] in os.environ), None)
    if names is None:
        return False
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    # rank 0's host name and a port free on it right now reach every rank in one broadcast
    addr, port = comm.bcast((socket.gethostname(), free_port()) if comm.Get_rank() == 0 else None, root=0)
    _set(comm.Get_rank(), comm.Get_size(), int(os.environ.get(names[2], "0")), addr, port)
    return True


def setup_torch_env() -> str:
    """Fill torch's variables from the launcher; returns which launcher was found."""
    if "RANK" in os.environ:
        missing = [v for v in TORCH_VARS if v not in os.environ and v != "LOCAL_RANK"]
        if missing and os.environ.get("WORLD_SIZE", "1") != "1":
            raise ConfigError(f"environment: RANK is set but {', '.join(missing)} is not")
        return "torch"
    for name, probe in (("submitit", _from_submitit), ("srun", _from_srun), ("mpi", _from_mpi)):
        if probe():
            return name
    return "none"
