"""The one module that calls torch.distributed (docs/ARCHITECTURE.md, "Distributed").

It reads only torch's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
hpc.distributed.launcher maps torchrun / srun / submitit / MPI onto them. With none set, everything
runs as one plain process and every collective is a no-op.

    ctx = init(cfg.dist, device)          # nccl on GPU, gloo on CPU, timeout from cfg
    model = wrap(model, cfg.dist, ctx, compile=False)
    all_reduce_sum(sums)                  # in place, sums across ranks
    shutdown(0)                           # barrier -> flush -> MPI.Finalize -> os._exit
"""
from __future__ import annotations

import contextlib
import datetime
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from hpc.config import DistConfig
from hpc.distributed.device import resolve_device
from hpc.distributed.launcher import local_world, torch_ranks
from hpc.errors import EXIT_REQUEUE, ConfigError


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init(cfg: DistConfig, device_name: str = "auto") -> Context:
    """Join the process group described by torch's env variables (or run alone without them)."""
    rank, world, local = torch_ranks()
    device = resolve_device(device_name, local)
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(cpu_threads(local_world()))
    if world > 1 and not tdist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise ConfigError(f"environment: WORLD_SIZE={world} but {var} is not set "
                                  "(launch with torchrun, srun, mpirun or hpc submit)")
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        # the timeout bounds every collective: a dead or hung rank ends the job instead of hanging
        tdist.init_process_group(backend, rank=rank, world_size=world,
                                 timeout=datetime.timedelta(seconds=cfg.timeout_s),
                                 device_id=device if backend == "nccl" else None)
    return Context(rank, world, local, device)


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` across ranks in place (and return it); unchanged in a single process."""
    if tdist.is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s picklable object on every rank (used for small control values only)."""
    if not tdist.is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: object) -> list:
    """Every rank's object, in rank order, on every rank (e.g. RNG states for a checkpoint)."""
    if not tdist.is_initialized():
        return [obj]
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int, rank_: int) -> None:
    """Distinct, reproducible streams per rank (python, numpy, torch CPU and CUDA)."""
    s = seed * 1000 + rank_
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


BUCKETS = 8  # gradient buckets per step: the first all-reduces start while backward still runs


def bucket_mb_for(model: nn.Module) -> float:
    """DDP bucket size giving about BUCKETS buckets for this model's gradients (1-25 MB). DDP
    all-reduces a bucket as soon as its gradients are ready, so with one bucket (e.g. 100 MB for
    badblock's 25 MB) communication only starts after the whole backward pass."""
    grad_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    return float(min(25.0, max(1.0, grad_mb / BUCKETS)))


def cpu_threads(local_world: int) -> int:
    """torch threads for a CPU rank: the cores this process may run on (its affinity mask, which
    srun/taskset set), shared by the ranks of the node when nothing bound them (torchrun); never
    more threads than cores, which on a busy node made steps 5x slower (docs/BENCHMARKS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores >= (os.cpu_count() or cores) and local_world > 1:  # not bound: every rank sees the whole node
        cores //= local_world
    return max(1, cores)


def wrap(model: nn.Module, cfg: DistConfig, ctx: Context, compile: bool = False) -> nn.Module:
    """SyncBatchNorm (optional) -> DDP (when distributed) -> torch.compile (optional)."""
    if ctx.distributed:
        if cfg.sync_bn:
            if ctx.device.type != "cuda":
                raise ConfigError("dist.sync_bn: SyncBatchNorm needs GPU ranks (torch supports it only "
                                  "on CUDA); set dist.sync_bn=false for CPU runs")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=ids, bucket_cap_mb=cfg.bucket_mb or bucket_mb_for(model),
            find_unused_parameters=cfg.find_unused, gradient_as_bucket_view=True, static_graph=cfg.static_graph)
        if cfg.grad_compression == "bf16":  # half the bytes on the wire; the optimizer still sees fp32
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    if compile:
        model = torch.compile(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DDP (what checkpoints store)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, skip: bool):
    """DDP's no_sync() while accumulating gradients (skip=True), else a null context."""
    inner = getattr(model, "_orig_mod", model)
    if skip and isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner.no_sync()
    return contextlib.nullcontext()


# What a collective's exception says when the other ranks did not answer in time (gloo: "Timed out
# waiting 15000ms for recv", NCCL's watchdog: "collective operation timeout") or went away.
_TIMEOUT_WORDS = ("timed out", "timeout")
_GONE_WORDS = ("closed by peer", "reset by peer", "broken pipe", "connection refused", "was aborted")


def collective_failure(exc: BaseException, timeout_s: int) -> tuple[str, int] | None:
    """(one-line message, exit code) when ``exc`` is a collective of this process group that failed
    because the other ranks did not answer within ``timeout_s`` (a node or its link is down, or a
    rank hangs: EXIT_REQUEUE, the job is requeued and resumes) or went away (a rank crashed or was
    killed: 1); None for any other error, and always in a single process."""
    if not tdist.is_initialized() or not isinstance(exc, RuntimeError):
        return None
    text = " ".join(str(exc).split())
    if any(w in text.lower() for w in _TIMEOUT_WORDS):
        return (f"no answer from the other ranks within dist.timeout_s={timeout_s} (a node or its network "
                f"link is down, or a rank hangs); exiting with {EXIT_REQUEUE} to be requeued: {text[:200]}",
                EXIT_REQUEUE)
    if any(w in text.lower() for w in _GONE_WORDS):
        return f"another rank went away (it crashed or was killed): {text[:200]}", 1
    return None


def shutdown(code: int) -> None:
    """End the process cleanly (docs/ARCHITECTURE.md, "Shutting down": gloo aborts ~1 run in 8 at
    interpreter exit without this): barrier -> flush -> MPI.Finalize when under MPI -> os._exit(code). Never returns.

    A failing run (code != 0) skips the barrier: the other ranks may be gone.
    """
    if tdist.is_initialized() and code == 0:
        try:
            tdist.barrier()
        except Exception as exc:  # a peer died after finishing; still exit with our own code
            print(f"hpc: final barrier failed: {exc}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    os._exit(code)
