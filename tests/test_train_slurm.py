"""On the real single-node Slurm cluster (tests/cluster/harness.py): `srun -n 2` DDP gives the
union-batch gradients (hpc.distributed.launcher maps SLURM_* to torch's variables), and `srun -n 2 hpc train`
trains to the end with one checkpoint holding both ranks' RNG states."""
from __future__ import annotations

import sys

import pytest
import torch

from hpc.train import checkpoint as ck

from dist_worker import HERE as DIST_WORKER
from dist_worker import check_grads
from helpers import ROOT, TINY, make_dataset, records

pytestmark = pytest.mark.slurm


def srun_env(slurm) -> dict[str, str]:
    # no torch variables from the calling shell: the launcher's must be the ones used
    return {k: v for k, v in slurm.env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                            "MASTER_ADDR", "MASTER_PORT")}


def test_srun_ddp_matches_union_batch(slurm, tmp_path):
    out = tmp_path / "grads.pt"
    r = slurm.srun(["-n", "2", "--cpus-per-task=1", sys.executable, str(DIST_WORKER), "grads", str(out)],
                   timeout=240, env=srun_env(slurm), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    check_grads(out, "srun")


def test_srun_hpc_train_two_ranks(slurm, tmp_path):
    data = make_dataset(tmp_path / "ds", studies=3, views=16, bins=16, mask=True, counts=True)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "hpc", "train", "--config", str(TINY), f"data.path={data}",
           f"train.run_dir={run}", "train.samples=32", "data.split=[0.5,0.5,0.0]", "data.batch_size=2"]
    r = slurm.srun(["-n", "2", "--cpus-per-task=1", *cmd], timeout=300, env=srun_env(slurm), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    state = ck.load(ck.Checkpointer(run).list()[0])
    assert state["step"] == 32 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert records(run, "val")[-1]["step"] == 32
