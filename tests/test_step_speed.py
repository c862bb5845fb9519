"""The training step's speed settings: DDP buckets from the parameter count, CPU threads from the
cores a rank owns, a step that returns its loss on the device, preemption agreed every N steps.
(No host sync on a GPU: tests/test_gpu.py, with torch's sync debug mode.)"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from hpc.config import load_config
from hpc.distributed import dist
from hpc.errors import ConfigError


def _params(mb: float) -> nn.Module:
    return nn.Linear(int(mb * 2**20 / 4), 1, bias=False)  # fp32 weights of `mb` MiB


@pytest.mark.parametrize("mb, bucket", [(0.1, 1.0), (24.0, 3.0), (400.0, 25.0)])
def test_bucket_size_follows_the_gradients(mb, bucket):
    assert dist.bucket_mb_for(_params(mb)) == pytest.approx(bucket, rel=1e-3)


def test_cpu_threads_are_the_cores_a_rank_owns(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert dist.cpu_threads(1) == 16
    assert dist.cpu_threads(4) == 4  # torchrun on one node, nothing bound: the node is shared
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3})
    assert dist.cpu_threads(4) == 2  # srun/taskset bound this rank to 2 cores: they are its own


def test_bf16_gradient_compression_needs_nccl():
    with pytest.raises(ConfigError, match="dist.grad_compression='bf16': needs NCCL ranks"):
        load_config(overrides=["dist.grad_compression=bf16", "data.device=cpu"])
    cfg = load_config(overrides=["dist.grad_compression=bf16", "data.device=cuda", "dist.static_graph=true"])
    assert cfg.dist.static_graph and cfg.dist.bucket_mb == 0


def test_ddp_gets_the_derived_bucket_and_static_graph(monkeypatch):
    """dist.wrap hands DDP the derived bucket size and static_graph (DDP itself replaced by a
    recorder: a real process group is exercised by tests/test_dist.py)."""
    seen = {}

    class Recorder(nn.Module):
        def __init__(self, module, **kwargs):
            super().__init__()
            seen.update(kwargs)

    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", Recorder)
    ctx = dist.Context(rank=0, world=2, local_rank=0, device=torch.device("cpu"))
    cfg = load_config(overrides=["dist.static_graph=true"]).dist
    dist.wrap(_params(24.0), cfg, ctx)
    assert seen["bucket_cap_mb"] == pytest.approx(3.0, rel=1e-3) and seen["static_graph"] is True


def test_step_returns_the_loss_on_the_device_and_preemption_waits_for_its_step(tmp_path):
    from hpc.train.train import Trainer

    from helpers import make_dataset

    root = make_dataset(tmp_path / "d", studies=3, axial=(16,), counts=True, views=8, bins=8)
    cfg = load_config(ROOT_TINY, [f"data.path={root}", f"train.run_dir={tmp_path / 'run'}", "data.workers=0",
                                  "data.batch_size=2", "data.context=1", "data.split=[1.0, 0.0, 0.0]",
                                  "corrupt.dead_blocks=0", "corrupt.use_stored_mask=false", "model.name=light",
                                  "model.base=2", "train.samples=64",
                                  "train.val_every=0", "checkpoint.every=0", "log.progress=false"])
    tr = Trainer(cfg)
    loss = tr.train_step(tr._batches())
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0  # not a float: nothing waited for it
    tr.stop.signal = 12  # as if SIGUSR2 had arrived; one process reads its own flag every step
    with pytest.raises(SystemExit) as stop:
        tr.run()
    assert stop.value.code == 75 and tr.state.step == 2  # the first step after the signal: checkpoint, exit
    assert (tmp_path / "run" / "checkpoints" / "step-00000002.pt").is_file()


ROOT_TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
