"""What only a GPU can show (bench/gpu_check.sh runs these first): the DALI GPU pipeline equals
the torch backend, bf16 + channels_last + compile steps train, predict on the GPU equals the CPU,
and a steady-state training step never waits for the device (torch's sync debug mode errors on
any host synchronisation). Skipped without CUDA (these machines have none)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import loader_cfg, make_dataset

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


def _dataset(tmp_path):
    from hpc.physics import geometry as G
    from hpc.physics import projdata as P

    sc = G.get_scanner("test")
    segs = P.segment_sequence(sc.rings - 1)
    return make_dataset(tmp_path / "d", studies=3, segments=segs, axial=P.axial_counts(sc, segs), views=sc.views,
                        bins=sc.bins, counts=True, scanner="test", shard_slices=7)


def test_dali_gpu_pipeline_equals_the_torch_backend(tmp_path):
    from hpc.data import build_loader

    from helpers import require_dali

    require_dali()
    root = _dataset(tmp_path)
    out = {}
    for backend in ("torch", "dali"):
        cfg = loader_cfg(root, backend=backend, device="cuda", workers=2, context=1, batch_size=4, normalize="max")
        cfg.corrupt.dead_blocks = 2
        loader = build_loader(cfg, "train", 0, 1, torch.device("cuda"))
        out[backend] = [(b.index.cpu(), b.input.cpu(), b.mask.cpu()) for epoch in (0, 1)
                        for b in (loader.set_epoch(epoch) or loader)]
    assert len(out["torch"]) == len(out["dali"])
    for (i1, x1, m1), (i2, x2, m2) in zip(out["torch"], out["dali"], strict=True):
        assert torch.equal(i1, i2) and torch.equal(x1, x2) and torch.equal(m1, m2)


def _trainer(tmp_path, **train):
    from hpc.config import load_config
    from hpc.train.train import Trainer

    root = _dataset(tmp_path)
    over = [f"data.path={root}", f"train.run_dir={tmp_path / 'run'}", "data.device=cuda", "data.workers=0",
            "data.batch_size=4", "data.context=1", "data.split=[0.7, 0.3, 0.0]", "corrupt.dead_blocks=2",
            "model.name=unet", "model.base=8", "model.depth=1", "train.samples=64", "train.val_every=0",
            "checkpoint.every=0", "log.progress=false", "log.images=false",
            *(f"train.{k}={v}" for k, v in train.items())]
    return Trainer(load_config("configs/tiny.yaml", over))


def test_bf16_channels_last_compile_steps_train(tmp_path):
    tr = _trainer(tmp_path, precision="bf16", channels_last="true", compile="true")
    result = tr.run()
    assert result["step"] == 64 and (tmp_path / "run" / "checkpoints").is_dir()


def test_steady_state_steps_never_synchronise_with_the_host(tmp_path):
    tr = _trainer(tmp_path, precision="bf16")
    batches = tr._batches()
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator, first batches
        tr.train_step(batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [tr.train_step(batches) for _ in range(5)]  # device tensors, never read here
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(loss.is_cuda for loss in losses) and all(torch.isfinite(torch.stack(losses)).tolist())


def test_predict_on_the_gpu_equals_the_cpu(tmp_path):
    from hpc.config import Config, to_dict
    from hpc.repair.inference import load_repairer, model_output
    from hpc.train.models import build_model

    cfg = Config()
    cfg.data.context, cfg.model.name, cfg.model.base, cfg.model.norm = 1, "light", 8, "none"
    model = build_model(cfg.model, cfg.in_channels())
    torch.save({"model": model.state_dict(), "optim": {}, "step": 0, "epoch": 0, "config": to_dict(cfg),
                "data": {"scale": 100.0, "slice_shape": [12, 16], "scanner": ""}}, tmp_path / "m.pt")
    rng = np.random.default_rng(0)
    raw = rng.poisson(30.0, (6, 3, 12, 16)).astype(np.float32)
    mask = (rng.random((6, 3, 12, 16)) > 0.2).astype(np.float32)
    cpu = model_output(load_repairer(tmp_path / "m.pt", torch.device("cpu")), raw, mask)
    gpu = model_output(load_repairer(tmp_path / "m.pt", torch.device("cuda")), raw, mask)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-3)
