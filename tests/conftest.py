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


@pytest.fixture(scope="session")
def slurm2():
    """A real 2-node Slurm cluster (node1, node2: network + UTS namespaces on a private bridge,
    tests/cluster/netns.py) under $HPC_SLURM_MULTI_DIR (default: the single-node dir + "-multi").
    Started/reused like `slurm`; it does not set SLURM_CONF in os.environ (the single-node cluster
    owns that): pass `slurm2.env` to every subprocess."""
    from cluster.harness import ensure_cluster

    cluster, why = ensure_cluster(nodes=2)
    require("2-node Slurm", cluster is not None, why)
    yield cluster
    cluster.stop_if_owned()


def shard_differences(a: str | os.PathLike, b: str | os.PathLike, exact: bool = True) -> list[str]:
    """Compare the shards of two converted datasets; say *what* differs (names, datasets, dtypes,
    chunks, filters, attributes, values) in a few short lines, so a failure in CI's log tail is
    readable instead of a dump of raw HDF5 bytes. ``exact`` also requires equal bytes: right for
    none/gzip/blosc, wrong for lzf, whose bytes depend on what the process compressed before
    (h5py's liblzf leaves its hash table uninitialised; decoded values are always the same)."""
    import h5py
    import numpy as np

    def files(root):
        return {p.name: p for p in sorted((Path(root) / "shards").glob("*.h5"))}

    fa, fb = files(a), files(b)
    if fa.keys() != fb.keys():
        return [f"shard names differ: only in {a}: {sorted(fa.keys() - fb.keys())}, "
                f"only in {b}: {sorted(fb.keys() - fa.keys())}"]
    problems = []
    for name, pa in fa.items():
        da, db = pa.read_bytes(), fb[name].read_bytes()
        if da == db:
            continue
        first = next((i for i, (x, y) in enumerate(zip(da, db, strict=False)) if x != y), min(len(da), len(db)))
        why = [f"{name}: bytes differ ({len(da)} vs {len(db)} bytes, first at offset {first}):"]
        with h5py.File(pa, "r") as ha, h5py.File(fb[name], "r") as hb:
            if dict(ha.attrs).keys() != dict(hb.attrs).keys() or any(
                    np.any(ha.attrs[k] != hb.attrs[k]) for k in ha.attrs):
                why.append("  root attributes differ")
            for key in sorted(set(ha) | set(hb)):
                if key not in ha or key not in hb:
                    why.append(f"  dataset {key} only in one file")
                    continue
                x, y = ha[key], hb[key]
                for what in ("shape", "dtype", "chunks", "compression", "shuffle"):
                    if getattr(x, what) != getattr(y, what):
                        why.append(f"  {key}.{what}: {getattr(x, what)} vs {getattr(y, what)}")
                if dict(x.attrs) != dict(y.attrs):
                    why.append(f"  {key} attributes: {dict(x.attrs)} vs {dict(y.attrs)}")
                if x.shape == y.shape and not np.array_equal(x[()], y[()]):
                    why.append(f"  {key} values differ")
        if len(why) > 1:
            problems += why
        elif exact:
            problems += [*why, "  same datasets, attributes, chunks and filters: only the encoding differs"]
    return problems
