"""The 2-process DDP worker of tests/test_dist.py and tests/test_train_slurm.py, and the check of
its result: `python tests/dist_worker.py grads OUT` under any launcher (torchrun, mpirun, srun)
writes rank 0's gradients to OUT; `check_grads(OUT, launcher)` compares them with one process on
the union batch. `... hang OUT`: rank 1 hangs, rank 0's collective must time out.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))  # the repo root, when run as a worker script

from hpc.config import DistConfig  # noqa: E402
from hpc.distributed import dist  # noqa: E402

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
    from hpc.distributed.launcher import setup_torch_env

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



if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
