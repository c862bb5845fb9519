"""Shared fixtures (plain helper functions are in tests/helpers.py).

Service tests (Slurm, MPI, DALI) use the real thing. When it is missing they skip on a laptop but
FAIL when CI=true, so a broken CI image can never turn into a green run of skipped tests.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # makes `helpers` and `cluster.harness` importable

from helpers import lm_scanner, require  # noqa: E402


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


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Each test that takes ``device`` runs on the CPU (every CI run) and on CUDA (marked ``gpu``:
    `pytest -m gpu` on a GPU node, skipped without one), so a GPU test's body cannot rot unseen."""
    import torch

    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return torch.device(request.param)


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size="1m", readonly=False) -> Path``: a real small filesystem (tmpfs) to fill up or
    to find read-only. Mounting needs root (CI is root); elsewhere the test skips, since a full
    disk cannot be produced without privileges (and CI=true fails instead)."""
    mounted = []

    def mount(size: str = "1m", readonly: bool = False) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        opts = f"size={size}" + (",ro" if readonly else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True, text=True)
        require("a tmpfs mount (root)", r.returncode == 0, r.stderr.strip())
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture
def sc():
    """The small list-mode scanner of tests/helpers.py (test_listmode, test_norm, test_randoms)."""
    return lm_scanner()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261207)
