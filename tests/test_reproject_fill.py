"""data.fill=reproject and the validation's reproject baseline: the network's input gaps are the
reprojection of the measured bins (multiplicative factors and randoms modelled when the dataset
stores them), the validation picks reproject's iteration count and records it in the metrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc.config import load_config
from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.physics import recon as R

from helpers import ROOT, make_checkpoint, run_hpc

SC = G.get_scanner("test")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three simulated 'test'-scanner studies converted with their mult/randoms/expected."""
    root = tmp_path_factory.mktemp("rf")
    sim = root / "sim"
    r = run_hpc("simulate", "-o", sim, "--studies", "3", "--scanner", "test", "--counts", "3e5", "--seed", "2")
    assert r.returncode == 0, r.stderr
    files = [sim / f"s00{i}" for i in range(3)]
    truth = [a for role in ("expected", "randoms", "mult")
             for a in (f"--{role}", *[f"{f}_{role}.s.hdr" for f in files])]
    r = run_hpc("convert", *[f"{f}.s.hdr" for f in files], *truth, "-o", root / "ds", "--quiet")
    assert r.returncode == 0, r.stderr
    return root / "ds"


def test_fill_equals_the_reconstruction_baseline_slice_by_slice():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.poisson(20.0, (2, 3, SC.views, SC.bins))).float()
    mask = torch.from_numpy(P.dead_block_mask(SC, [1])[:3]).float().expand(2, 3, -1, -1)
    mult = torch.full_like(x, 0.5)
    fill = R.ReprojectFill(SC, iters=3)
    out = fill(x * mask, mask, {"mult": mult})
    assert out.shape == x.shape and torch.equal(out[mask > 0], (x * mask)[mask > 0])
    want = R.reproject(SC, (x * mask)[1, 2:3], mask[1, 2:3], 3, 4, valid=mult[1, 2:3] > 0, mult=mult[1, 2:3])
    torch.testing.assert_close(out[1, 2:3], want)
    with pytest.raises(ValueError, match="reproject fill"):
        fill(torch.zeros(1, 1, 5, 5), torch.ones(1, 1, 5, 5), {})


def _cfg(dataset, tmp_path, *extra):
    return load_config(ROOT / "configs" / "tiny.yaml",
                       [f"data.path={dataset}", f"train.run_dir={tmp_path / 'run'}", "corrupt.use_stored_mask=false",
                        "corrupt.dead_blocks=1", "data.normalize=none", "data.pad_multiple=4",
                        "checkpoint.resume=false", "data.fill=reproject", "data.fill_iters=2", *extra])


def test_training_batches_get_the_reprojection_with_the_stored_factors(dataset, tmp_path):
    from hpc.data import build_loader

    cfg = _cfg(dataset, tmp_path)
    loader = build_loader(cfg, "train", 0, 1, torch.device("cpu"))
    assert loader.reader.spec.aux == ("mult", "randoms")
    batch = next(iter(loader))
    raw = loader.reader.read(0)  # the same planned batch, as stored
    k = raw["target"].shape[1] // 2
    m = batch.mask[:, :, :SC.views, :SC.bins]
    x = batch.input[:, k:k + 1, :SC.views, :SC.bins]  # normalize=none: counts; padding cropped
    assert (m == 0).any()
    want = R.reproject(SC, torch.from_numpy(raw["target"][:, k]).float() * m[:, 0], m[:, 0], 2, 4,
                       valid=torch.from_numpy(raw["mult"][:, k]) > 0, mult=torch.from_numpy(raw["mult"][:, k]),
                       add=torch.from_numpy(raw["randoms"][:, k]))
    torch.testing.assert_close(x[:, 0], want, rtol=1e-4, atol=1e-4)


def test_validation_chooses_reproject_iterations_and_records_them(dataset, tmp_path):
    from hpc.train.train import Trainer
    from hpc.train.validate import reproject_iters

    t = Trainer(_cfg(dataset, tmp_path, "train.val_batches=0"))
    t.net.eval()
    metrics, _ = t.validator(t._forward)
    rep = t.validator.baselines["reproject"]
    assert rep["iters"] in reproject_iters() and metrics["reproject_iters"] == rep["iters"]
    assert rep["nmse_gap"] < t.validator.baselines["linear"]["nmse_gap"]  # physics beats interpolation here
    t.log.close()


def test_predict_models_the_given_factors(tmp_path):
    """hpc predict --mult/--randoms feeds them to a reproject-fill model: the gaps change with them,
    the measured values never do; the library equals the CLI."""
    from hpc.io.headers import read_header
    from hpc.io.sinogram import SinogramReader
    from hpc.repair.files import predict_file
    from hpc.repair.inference import load_repairer

    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, slice_shape=(SC.views, SC.bins))
    state = torch.load(ckpt, weights_only=True)
    state["config"]["data"]["fill"], state["data"]["scanner"] = "reproject", "test"
    torch.save(state, ckpt)
    r = run_hpc("simulate", "-o", tmp_path / "s", "--studies", "1", "--scanner", "test", "--dead-blocks", "1",
                "--counts", "3e5", "--seed", "9")
    assert r.returncode == 0, r.stderr
    s = tmp_path / "s" / "s000"
    common = ["--checkpoint", ckpt, f"{s}_gaps.s.hdr", "--mask", f"{s}_mask.s.hdr", "--quiet"]
    r = run_hpc("predict", *common, "--mult", f"{s}_mult.s.hdr", "--randoms", f"{s}_randoms.s.hdr",
                "-o", tmp_path / "with.s.hdr")
    assert r.returncode == 0, r.stderr
    r = run_hpc("predict", *common, "-o", tmp_path / "without.s.hdr")
    assert r.returncode == 0, r.stderr
    out = {}
    for name in ("with", "without", "s000_gaps", "s000_mask"):
        path = tmp_path / f"{name}.s.hdr" if name in ("with", "without") else tmp_path / "s" / f"{name}.s.hdr"
        with SinogramReader(read_header(path)) as rd:
            out[name] = rd.read(0, SC.rings)
    gap = out["s000_mask"] == 0
    assert gap.any() and (out["with"][~gap] == out["s000_gaps"][~gap]).all()
    assert (out["with"][gap] != out["without"][gap]).any()
    rep = load_repairer(ckpt, torch.device("cpu"))
    aux = {k: read_header(f"{s}_{k}.s.hdr") for k in ("mult", "randoms")}
    from hpc.repair.inference import file_mask
    spec = read_header(f"{s}_gaps.s.hdr")
    path, _ = predict_file(rep, spec, tmp_path / "lib.s.hdr", "source", file_mask(spec, read_header(f"{s}_mask.s.hdr")),
                           8, quiet=True, aux=aux)
    with SinogramReader(read_header(path)) as rd:
        assert np.array_equal(rd.read(0, SC.rings), out["with"])
