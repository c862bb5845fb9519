"""hpc export: the TorchScript / ONNX model gives the checkpoint's own repair (hpc.repair.inference) on
batches of other sizes than the one traced, and the sidecar JSON records the preprocessing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hpc.repair.inference import load_repairer, model_output

from helpers import make_checkpoint, run_hpc

V, X = 8, 12


def reference(ckpt, raw: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """What hpc predict computes from the checkpoint (before casting to the file dtype)."""
    rep = load_repairer(ckpt, torch.device("cpu"))
    pred = model_output(rep, raw.numpy(), mask.numpy())
    k = raw.shape[1] // 2
    return np.where(mask[:, k].numpy() > 0.5, raw[:, k].numpy(), pred)[:, None]


def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    raw = torch.poisson(torch.full((batch, 3, V, X), 30.0), generator=g)
    mask = (torch.rand(raw.shape, generator=g) > 0.3).float()
    return raw, mask


@pytest.mark.parametrize("fmt,fill", [("torchscript", "zero"), ("onnx", "zero"), ("torchscript", "linear"),
                                      ("onnx", "linear")])
def test_exported_model_matches_checkpoint(tmp_path, fmt, fill):
    """fill=linear: the radial pre-fill (cummax, gather) and the mask channel are in the graph too."""
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, fill=fill)
    out = tmp_path / ("model.ts" if fmt == "torchscript" else "model.onnx")
    r = run_hpc("export", "--checkpoint", ckpt, "--format", fmt, "-o", out)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / (out.name + ".json")).read_text())
    assert meta["inputs"]["raw"] == ["batch", 3, V, X] and meta["normalize"] == "max"
    assert meta["context"] == 1 and meta["scale"] == 100.0
    for batch in (1, 5):
        raw, mask = inputs(batch)
        if fmt == "torchscript":
            with torch.no_grad():
                got = torch.jit.load(str(out))(raw, mask).numpy()
        else:
            import onnxruntime as ort

            sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            (got,) = sess.run(None, {"raw": raw.numpy(), "mask": mask.numpy()})
        want = reference(ckpt, raw, mask)
        assert got.shape == (batch, 1, V, X)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
        measured = mask[:, 1:2].numpy() > 0.5
        np.testing.assert_array_equal(got[measured], raw[:, 1:2].numpy()[measured])


def test_export_needs_a_slice_shape(tmp_path):
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, slice_shape=())
    r = run_hpc("export", "--checkpoint", ckpt, "--format", "torchscript", "-o", tmp_path / "m.ts")
    assert r.returncode == 2 and "--slice-shape" in r.stderr
    assert not (tmp_path / "m.ts").exists()
