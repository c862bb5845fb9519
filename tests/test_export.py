"""hpc export: the TorchScript / ONNX model gives the checkpoint's own repair (hpc.repair.inference) on
batches of other sizes than the one traced, and the sidecar JSON records the preprocessing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hpc.repair.inference import load_repairer, model_output

from helpers import make_checkpoint, make_reproject_checkpoint, run_hpc

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


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_reproject_fill_model_exports_with_its_fill_outside(tmp_path, capsys, fmt):
    """data.fill=reproject: the exported graph takes the filled stacks as an input; given the fill the
    sidecar's command writes (and its Python recipe computes), it repairs as `hpc predict` does,
    partly measured bin and modelled factors included."""
    from hpc.cli import main
    from hpc.io.headers import read_header
    from hpc.io.sinogram import SinogramReader, write_sinogram
    from hpc.physics import projdata as P
    from hpc.physics.geometry import get_scanner
    from hpc.physics.recon import ReprojectFill
    from hpc.repair.inference import windows

    sc, rng = get_scanner("test"), np.random.default_rng(5)
    lay = P.span1_layout(sc, [0])
    mask = P.dead_block_mask(sc, [1]).astype(np.float32)  # (4, 12, 12)
    mask[2, 5, 0] = 0.5  # a partly measured bin
    files = {"gaps": rng.poisson(30.0, mask.shape) * (mask > 0), "mask": mask,
             "mult": rng.uniform(0.5, 1.0, mask.shape), "randoms": np.full(mask.shape, 1.5)}
    f = {k: write_sinogram(tmp_path / k, v.astype(np.float32), fmt="stir", layout=lay) for k, v in files.items()}
    ckpt = make_reproject_checkpoint(tmp_path / "m.pt", iters=3, fill_iters=2)
    out = tmp_path / ("model.ts" if fmt == "torchscript" else "model.onnx")
    assert main(["export", "--checkpoint", str(ckpt), "--format", fmt, "-o", str(out)]) == 0
    meta = json.loads((tmp_path / (out.name + ".json")).read_text())
    fill = meta["fill"]
    assert list(meta["inputs"]) == ["raw", "mask", "filled"] and meta["inputs"]["filled"] == ["batch", 3, 12, 12]
    assert (fill["data.fill"], fill["in_graph"], fill["fill_iters"], fill["subsets"], fill["scanner"],
            fill["hybrid_iters"]) == ("reproject", False, 2, 4, "test", 3)
    # the sidecar's own command, its placeholders replaced
    cmd = fill["command"].replace("[--mult MULT --randoms RANDOMS]", f"--mult {f['mult']} "
                                                  f"--randoms {f['randoms']}")
    cmd = cmd.replace("INPUT", str(f["gaps"])).replace("MASK", str(f["mask"])).replace("FILLED", str(tmp_path / "f.hs"))
    assert cmd.startswith("hpc predict --method reproject --method-param iters=2 --scanner test ")
    assert main([*cmd.split()[1:], "--quiet"]) == 0
    assert main(["predict", "--checkpoint", str(ckpt), str(f["gaps"]), "--mask", str(f["mask"]), "--mult",
                 str(f["mult"]), "--randoms", str(f["randoms"]), "-o", str(tmp_path / "net.hs"), "--quiet"]) == 0
    capsys.readouterr()
    data = {}
    for k, path in (*f.items(), ("filled", tmp_path / "f.hs"), ("net", tmp_path / "net.hs")):
        with SinogramReader(read_header(path)) as r:
            data[k] = r.read(0, 4)
    rep = load_repairer(ckpt, torch.device("cpu"))
    ids = windows(rep, read_header(f["gaps"]), np.arange(4))  # (4, 3): the context stacks predict builds
    raw, m, filled = (torch.from_numpy(np.ascontiguousarray(data[k][ids])) for k in ("gaps", "mask", "filled"))
    recipe = ReprojectFill(sc, iters=2, subsets=4)(raw, m, {k: torch.from_numpy(data[k][ids]) for k in
                                                            ("mult", "randoms")})
    torch.testing.assert_close(recipe, filled, rtol=1e-5, atol=1e-4)  # the Python recipe is that fill
    if fmt == "torchscript":
        with torch.no_grad():
            got = torch.jit.load(str(out))(raw, m, filled).numpy()[:, 0]
    else:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        (got,) = sess.run(None, {"raw": raw.numpy(), "mask": m.numpy(), "filled": filled.numpy()})
        got = got[:, 0]
    repaired = mask < 1
    assert repaired.sum() > 10 and not np.allclose(data["net"][repaired], data["filled"][repaired], rtol=1e-3)
    np.testing.assert_allclose(got[repaired], data["net"][repaired], rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(got[~repaired], data["gaps"][~repaired])
