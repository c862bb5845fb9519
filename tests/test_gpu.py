"""What the GPU must show, written once and run on every device (the ``device`` fixture: the CPU
in every CI run, CUDA where there is one, `pytest -m gpu` in bench/gpu_check.sh): the DALI pipeline
equals the torch backend, bf16 + channels_last + compile steps train, predict equals a float64
reference, and a steady-state training step never waits for the device. Only what exists on a GPU
alone is skipped on the CPU: torch's sync debug mode, DALI's GPU operators and bf16 kernels run in
the CUDA case only, so configuration rot (a config key the fixtures no longer satisfy, say) fails
CI instead of waiting for the next GPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import TINY, loader_cfg, make_dataset


def _dataset(tmp_path):
    from hpc.physics import geometry as G
    from hpc.physics import projdata as P

    sc = G.get_scanner("test")
    segs = P.segment_sequence(sc.rings - 1)
    return make_dataset(tmp_path / "d", studies=3, segments=segs, axial=P.axial_counts(sc, segs), views=sc.views,
                        bins=sc.bins, counts=True, scanner="test", shard_slices=7)


def test_dali_pipeline_equals_the_torch_backend(tmp_path, device):
    from hpc.data import build_loader

    from helpers import require_dali

    require_dali()
    root = _dataset(tmp_path)
    out = {}
    for backend in ("torch", "dali"):
        cfg = loader_cfg(root, backend=backend, device=device.type, workers=2, context=1, batch_size=4,
                         normalize="max")
        cfg.corrupt.dead_blocks = 2
        loader = build_loader(cfg, "train", 0, 1, device)
        out[backend] = [(b.index.cpu(), b.input.cpu(), b.mask.cpu()) for epoch in (0, 1)
                        for b in (loader.set_epoch(epoch) or loader)]
    assert len(out["torch"]) == len(out["dali"]) > 0
    for (i1, x1, m1), (i2, x2, m2) in zip(out["torch"], out["dali"], strict=True):
        assert torch.equal(i1, i2) and torch.equal(x1, x2) and torch.equal(m1, m2)


def _trainer(tmp_path, device, **train):
    """The tiny config with dead blocks drawn from the scanner geometry (the fixture has no stored
    masks, so corrupt.use_stored_mask goes off) and GPU-run numerics: non-deterministic algorithms,
    as every GPU config uses (several CUDA backward kernels refuse deterministic mode)."""
    from hpc.config import load_config
    from hpc.train.train import Trainer

    root = _dataset(tmp_path)
    over = [f"data.path={root}", f"train.run_dir={tmp_path / 'run'}", f"data.device={device.type}",
            "data.workers=0", "data.batch_size=4", "data.context=1", "data.split=[0.7, 0.3, 0.0]",
            "corrupt.dead_blocks=2", "corrupt.use_stored_mask=false", "model.name=unet", "model.base=8",
            "model.depth=1", "train.samples=64", "train.val_every=0", "train.deterministic=false",
            "checkpoint.every=0", "log.progress=false", "log.images=false",
            *(f"train.{k}={v}" for k, v in train.items())]
    return Trainer(load_config(TINY, over))


@pytest.mark.slow  # a cold torch.compile: ~45 s on 2 CPU cores
def test_bf16_channels_last_compile_steps_train(tmp_path, device):
    tr = _trainer(tmp_path, device, precision="bf16", channels_last="true", compile="true")
    assert tr.amp == torch.bfloat16
    result = tr.run()
    assert result["step"] == 64 and (tmp_path / "run" / "checkpoints" / "step-00000064.pt").is_file()
    assert next(tr.model.parameters()).device.type == device.type


def test_steady_state_steps_never_synchronise_with_the_host(tmp_path, device):
    tr = _trainer(tmp_path, device, precision="bf16" if device.type == "cuda" else "fp32")
    batches = tr._batches()
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator, first batches
        tr.train_step(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation now raises
    try:
        losses = [tr.train_step(batches) for _ in range(5)]  # device tensors, never read here
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert all(isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.device.type == device.type
               for loss in losses)
    assert all(torch.isfinite(torch.stack(losses)).tolist())


class _Float64(torch.nn.Module):
    """The same weights in float64: the reference a device's float32 (or TF32) output is held to."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.double()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(x.double(), mask.double())


def test_predict_on_the_device_equals_a_float64_reference(tmp_path, device):
    from hpc.config import Config, to_dict
    from hpc.repair.inference import load_repairer, model_output
    from hpc.train.models import build_model

    cfg = Config()
    cfg.data.context, cfg.model.name, cfg.model.base, cfg.model.norm = 1, "light", 8, "none"
    model = build_model(cfg.model, cfg.in_channels())
    torch.save({"model": model.state_dict(), "optim": {}, "step": 0, "epoch": 0, "config": to_dict(cfg),
                "data": {"scale": 100.0, "slice_shape": [12, 16], "scanner": ""}}, tmp_path / "m.pt")
    rng = np.random.default_rng()
    raw = rng.poisson(30.0, (6, 3, 12, 16)).astype(np.float32)
    mask = (rng.random((6, 3, 12, 16)) > 0.2).astype(np.float32)
    ref = load_repairer(tmp_path / "m.pt", torch.device("cpu"))
    ref.model = _Float64(ref.model)
    want = model_output(ref, raw, mask)
    got = model_output(load_repairer(tmp_path / "m.pt", device), raw, mask)
    # float32 lands far under 1e-5; cuDNN runs float32 convolutions in TF32 by default (~3e-4)
    limit = 3e-3 if device.type == "cuda" else 1e-5
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < limit
    assert np.isfinite(got).all() and got.shape == (6, 12, 16)
