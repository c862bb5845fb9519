"""Shared test helpers.

Service tests (Slurm, MPI, DALI) use the real thing. When it is missing they skip on a laptop but
FAIL when CI=true, so a broken CI image can never turn into a green run of skipped tests.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))  # makes `cluster.harness` importable

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(what: str, available: bool, why: str = "") -> None:
    """Skip (laptop) or fail (CI=true) when a real service/dependency is missing."""
    if available:
        return
    msg = f"{what} not available{': ' + why if why else ''}"
    if IN_CI:
        pytest.fail(f"{msg} (CI=true: service tests must not skip)", pytrace=False)
    pytest.skip(msg)


def require_mpi() -> str:
    """Path of mpirun with a working mpi4py, or skip/fail."""
    mpirun = shutil.which("mpirun")
    ok = mpirun is not None
    why = "mpirun not on PATH (apt-get install openmpi-bin libopenmpi-dev)"
    if ok:
        r = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; MPI.COMM_WORLD.Get_rank()"],
                           capture_output=True, text=True, timeout=60)
        ok, why = r.returncode == 0, r.stderr.strip().splitlines()[-1:] or ["mpi4py failed"]
        why = why[0] if isinstance(why, list) else why
    require("MPI", ok, why)
    return mpirun


def mpirun_cmd(np_: int) -> list[str]:
    """mpirun prefix that works as root and on 2 cores."""
    return [require_mpi(), "--allow-run-as-root", "--oversubscribe", "-np", str(np_)]


def require_dali() -> None:
    try:
        import nvidia.dali  # noqa: F401
        ok, why = True, ""
    except Exception as exc:  # ImportError or a broken install
        ok, why = False, repr(exc)
    require("NVIDIA DALI", ok, why)


def hpc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpc", *map(str, args)]


def run_hpc(*args: str, check: bool = False, timeout: float = 600, env: dict | None = None,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (exit codes and stderr are part of the contract)."""
    full_env = {**os.environ, **(env or {})}
    r = subprocess.run(hpc_cmd(*args), capture_output=True, text=True, timeout=timeout,
                       env=full_env, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"hpc {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="session")
def slurm():
    """The real single-node Slurm cluster (tests/cluster/harness.py). Started once per session if
    .ci/run has not started it already; stopped (by PID) at the end if this session started it."""
    from cluster.harness import ensure_cluster

    cluster, why = ensure_cluster()
    require("Slurm", cluster is not None, why)
    yield cluster
    cluster.stop_if_owned()
