"""mpirun inside a Slurm allocation on two real nodes (tests/cluster/harness.py --nodes 2). mpirun
starts its daemons through srun, so every rank inherits SLURM_PROCID/SLURM_NTASKS of the daemons'
step (one per node): the MPI variables must win, or `salloc -N2 -n4 mpirun -np 4` gives ranks
0,0,0,1 of 2. `hpc env` prints what each rank resolved; DDP across the nodes gives the union-batch
gradients."""
from __future__ import annotations

import sys

import pytest

from dist_worker import HERE as DIST_WORKER
from dist_worker import check_grads
from helpers import ROOT, env_lines, hpc_cmd, require_mpi

pytestmark = [pytest.mark.slurm, pytest.mark.multinode, pytest.mark.mpi]
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def job_env(cluster) -> dict[str, str]:
    env = {k: v for k, v in cluster.env.items() if k not in TORCH_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    return env | {"SLURM_CONF": str(cluster.conf), "OMP_NUM_THREADS": "1"}


def test_salloc_two_nodes_mpirun_four_ranks_are_0_to_3(slurm2):
    require_mpi()
    r = slurm2.run(["salloc", "-N2", "-n4", *MPIRUN, "-np", "4", "bash", "-c",
                    'echo "$(hostname) $SLURM_PROCID $(exec "$@")"', "sh", *hpc_cmd("env")],
                   env=job_env(slurm2), timeout=180, check=False, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = []
    for ln in r.stdout.splitlines():
        host, procid, rest = ln.split(" ", 2)
        rows.append({"host": host, "SLURM_PROCID": procid, **dict(kv.split("=", 1) for kv in rest.split())})
    rows.sort(key=lambda row: int(row["RANK"]))
    assert [row["RANK"] for row in rows] == ["0", "1", "2", "3"]
    assert {row["WORLD_SIZE"] for row in rows} == {"4"} and {row["LAUNCHER"] for row in rows} == {"mpi"}
    assert {row["host"] for row in rows} == {"node1", "node2"}  # the ranks really span both nodes
    assert {row["SLURM_PROCID"] for row in rows} == {"0", "1"}  # what used to win: the daemons' step
    assert len({(row["MASTER_ADDR"], row["MASTER_PORT"]) for row in rows}) == 1
    assert rows[0]["MASTER_ADDR"] == rows[0]["host"]  # rank 0's host name
    for host in ("node1", "node2"):  # local ranks count per node
        local = sorted(int(row["LOCAL_RANK"]) for row in rows if row["host"] == host)
        assert local == list(range(len(local)))


def test_sbatch_wrap_mpirun_two_ranks_are_0_and_1(slurm2, tmp_path):
    require_mpi()
    out = tmp_path / "wrap.out"
    cmd = " ".join([*MPIRUN, "-np", "2", *hpc_cmd("env")])
    job = slurm2.sbatch(f"#!/bin/bash\n#SBATCH -N2 --ntasks-per-node=1 -o {out}\ncd {ROOT}\n{cmd}\n",
                        env=job_env(slurm2))
    assert slurm2.wait(job, timeout=120) == "COMPLETED", out.read_text() if out.exists() else ""
    rows = env_lines(out.read_text())
    # rank 0 runs in the batch step itself (SLURM_PROCID=0, SLURM_NTASKS=2), rank 1 in its daemon's
    assert [(row["RANK"], row["WORLD_SIZE"], row["LAUNCHER"]) for row in rows] == [("0", "2", "mpi"), ("1", "2", "mpi")]


def test_mpirun_ddp_across_two_nodes_matches_union_batch(slurm2, tmp_path):
    require_mpi()
    out = tmp_path / "grads.pt"
    r = slurm2.run(["salloc", "-N2", "--ntasks-per-node=1", *MPIRUN, "-np", "2", sys.executable, str(DIST_WORKER),
                    "grads", str(out)], env=job_env(slurm2), timeout=240, check=False, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    check_grads(out, "mpi")
