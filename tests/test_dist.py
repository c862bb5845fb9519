"""hpc.distributed.dist: a plain process, and 2-process gloo DDP (launched by torchrun and by mpirun) giving the
same gradients as one process on the union batch (also with 2 accumulated micro-batches per rank);
a hung rank ends the job within dist.timeout_s.

The worker is tests/dist_worker.py (tests/test_train_slurm.py runs it under `srun -n 2` too).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from hpc.config import DistConfig
from hpc.distributed import dist
from hpc.errors import ConfigError

from dist_worker import HERE, check_grads, tiny_model

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_"))}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def test_plain_process_without_env(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    ctx = dist.init(DistConfig(), "cpu")
    assert (ctx.rank, ctx.world, ctx.distributed, dist.is_main()) == (0, 1, False, True)
    t = torch.arange(3.0)
    assert torch.equal(dist.all_reduce_sum(t), torch.arange(3.0))
    model = tiny_model()
    assert dist.wrap(model, DistConfig(), ctx) is model and dist.unwrap(model) is model
    assert dist.gather_objects({"a": 1}) == [{"a": 1}]


def test_sync_bn_on_cpu_ranks_is_refused_clearly():
    ctx = dist.Context(rank=0, world=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="dist.sync_bn: SyncBatchNorm needs GPU ranks"):
        dist.wrap(tiny_model(), DistConfig(sync_bn=True), ctx)


def test_torchrun_ddp_matches_union_batch(tmp_path):
    out = tmp_path / "grads.pt"
    r = subprocess.run(torchrun(str(HERE), "grads", str(out)), capture_output=True, text=True,
                       timeout=180, env=clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    check_grads(out, "torch")


@pytest.mark.mpi
def test_mpirun_ddp_matches_union_batch(tmp_path):
    from helpers import mpirun_cmd

    out = tmp_path / "grads.pt"
    r = subprocess.run([*mpirun_cmd(2), sys.executable, str(HERE), "grads", str(out)],
                       capture_output=True, text=True, timeout=180, env=clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    check_grads(out, "mpi")


def test_hung_rank_times_out(tmp_path):
    t0 = time.monotonic()
    r = subprocess.run(torchrun(str(HERE), "hang", str(tmp_path / "unused")), capture_output=True,
                       text=True, timeout=170, env=clean_env())
    assert r.returncode != 0
    assert time.monotonic() - t0 < 120  # the 5 s collective timeout, plus start-up and teardown
