"""hpc.dist: a plain process, and 2-process gloo DDP (launched by torchrun and by mpirun) giving the
same gradients as one process on the union batch (also with 2 accumulated micro-batches per rank);
a hung rank ends the job within dist.timeout_s.

This file is also the worker: `python tests/test_dist.py grads OUT` under any launcher writes rank
0's gradients to OUT (tests/test_train_slurm.py runs it under `srun -n 2`).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))  # the repo root, when run as a worker script

from hpc import dist  # noqa: E402
from hpc.config import DistConfig  # noqa: E402
from hpc.errors import ConfigError  # noqa: E402

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
UNION = 8  # samples in the union batch; each of W ranks gets UNION // W


def tiny_model() -> nn.Module:
    torch.manual_seed(0)  # identical weights on every rank and in the reference
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.Conv2d(4, 1, 3, padding=1))


def union_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(UNION, 2, 6, 6, generator=g), torch.randn(UNION, 1, 6, 6, generator=g)


def reference_grads() -> dict[str, torch.Tensor]:
    model = tiny_model()
    x, y = union_batch()
    F.mse_loss(model(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def worker(mode: str, out: str) -> None:
    from hpc.launch.env import setup_torch_env

    launcher = setup_torch_env()
    ctx = dist.init(DistConfig(timeout_s=5 if mode == "hang" else 120), "cpu")
    if mode == "hang":
        if ctx.rank == 1:
            time.sleep(600)  # a hung rank: rank 0's collective must time out, not wait forever
        dist.all_reduce_sum(torch.ones(1))
        dist.shutdown(0)
    net = dist.wrap(tiny_model(), DistConfig(bucket_mb=1), ctx)
    x, y = union_batch()
    part = slice(ctx.rank * UNION // ctx.world, (ctx.rank + 1) * UNION // ctx.world)
    F.mse_loss(net(x[part]), y[part]).backward()  # DDP averages the ranks' gradients
    # the trainer's accumulation: 2 micro-batches per rank, gradients all-reduced on the last only
    acc = dist.wrap(tiny_model(), DistConfig(bucket_mb=1), ctx)
    xs, ys = x[part].chunk(2), y[part].chunk(2)
    for i in range(2):
        with dist.no_sync(acc, skip=i == 0):
            (F.mse_loss(acc(xs[i]), ys[i]) / 2).backward()
    if dist.is_main():
        grads = {n: p.grad for n, p in dist.unwrap(net).named_parameters()}
        accumulated = {n: p.grad for n, p in dist.unwrap(acc).named_parameters()}
        torch.save({"grads": grads, "accumulated": accumulated, "world": ctx.world, "launcher": launcher}, out)
    dist.shutdown(0)


def check_grads(out: Path, launcher: str) -> None:
    got = torch.load(out, weights_only=True)
    assert (got["world"], got["launcher"]) == (2, launcher)
    ref = reference_grads()
    assert got["grads"].keys() == ref.keys()
    for name, g in ref.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(got["accumulated"][name], g, rtol=1e-5, atol=1e-6, msg=name)


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
    from conftest import mpirun_cmd

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


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
