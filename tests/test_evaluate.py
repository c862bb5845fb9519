"""hpc evaluate: metrics checked against numpy/scikit-image computed by hand from the files that
`hpc predict` writes, baselines exact where they must be, report + panels + W&B offline run."""
from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from hpc.io.headers import read_header
from hpc.io.sinogram import SinogramReader, write_sinogram

from helpers import make_checkpoint, run_hpc

V, X, S = 16, 16, 4


def ramp_study(tmp_path):
    """Targets linear along the radial axis (so radial interpolation is exact inside the gaps),
    float32, gaps = a band of bins 5..8 in every slice."""
    bins = np.arange(X, dtype=np.float32)
    target = np.stack([10 + (s + 1) * bins + np.arange(V)[:, None] for s in range(S)]).astype("<f4")  # (S, V, X)
    mask = np.ones((S, V, X), np.uint8)
    mask[:, :, 5:9] = 0
    paths = [write_sinogram(tmp_path / "ramp_gaps", target * mask, axial_counts=[S]),
             write_sinogram(tmp_path / "ramp", target, axial_counts=[S]),
             write_sinogram(tmp_path / "ramp_mask", mask, axial_counts=[S])]
    return paths, target, mask.astype(bool)


def test_metrics_match_hand_computed_values(tmp_path):
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, slice_shape=(V, X))
    (gaps, tgt, msk), target, measured = ramp_study(tmp_path)
    r = run_hpc("evaluate", "--checkpoint", ckpt, "--study", gaps, tgt, msk, "-o", tmp_path / "ev",
                "--baselines", "linear,biharmonic", "--quiet", env={"WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "ev" / "metrics.json").read_text())["results"]

    # The UNet's repaired sinogram, as hpc predict writes it (float32: no rounding).
    r = run_hpc("predict", "--checkpoint", ckpt, gaps, "--mask", msk, "-o", tmp_path / "p.s.hdr", "--quiet")
    assert r.returncode == 0, r.stderr
    with SinogramReader(read_header(tmp_path / "p.s.hdr")) as rd:
        pred = rd.read(0, S).astype(np.float64)
    t, gap = target.astype(np.float64), ~measured
    unet = res["ramp"]["unet"]  # no truth files: only `meas` metrics; pooled over every pixel
    assert unet["nmse_gap_meas"] == pytest.approx(((pred - t)[gap] ** 2).sum() / (t[gap] ** 2).sum(), rel=1e-5)
    assert unet["nmse_all_meas"] == pytest.approx(((pred - t) ** 2).sum() / (t**2).sum(), rel=1e-5)
    assert unet["psnr_all_meas"] == pytest.approx(10 * np.log10(t.max() ** 2 / ((pred - t) ** 2).mean()), rel=1e-5)
    assert unet["psnr_gap_meas"] == pytest.approx(10 * np.log10(t.max() ** 2 / ((pred - t)[gap] ** 2).mean()),
                                                  rel=1e-5)
    ssim = [structural_similarity(pred[s], t[s], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                  data_range=t[s].max()) for s in range(S)]
    assert unet["ssim_all_meas"] == pytest.approx(np.mean(ssim), rel=1e-4)
    assert "nmse_gap_true" not in unet
    assert res["overall"]["unet"]["nmse_gap_meas"] == pytest.approx(unet["nmse_gap_meas"])  # one study

    lin = res["ramp"]["linear"]  # exact on a radial ramp: zero error, capped PSNR
    assert lin["nmse_gap_meas"] == pytest.approx(0.0, abs=1e-12) and lin["psnr_all_meas"] == pytest.approx(100.0)
    assert 0 < res["ramp"]["biharmonic"]["nmse_gap_meas"] < 0.05  # smooth data: nearly exact

    report = (tmp_path / "ev" / "report.md").read_text()
    assert "| ramp | linear |" in report and "| overall | unet |" in report
    png = (tmp_path / "ev" / "panels" / "ramp.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_offline_run_and_bad_study(tmp_path):
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, slice_shape=(V, X))
    (gaps, tgt, msk), _, _ = ramp_study(tmp_path)
    r = run_hpc("evaluate", "--checkpoint", ckpt, "--study", gaps, tgt, msk, "-o", tmp_path / "ev",
                "--baselines", "linear", "--slices", "2", "--quiet", env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr
    runs = list((tmp_path / "ev" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert list((tmp_path / "ev" / "wandb").glob("offline-run-*/files/media/images/*.png"))
    short = write_sinogram(tmp_path / "short", np.zeros((S - 1, V, X), "<f4"), axial_counts=[S - 1])
    r = run_hpc("evaluate", "--checkpoint", ckpt, "--study", gaps, short, msk, "-o", tmp_path / "ev2")
    assert r.returncode == 2 and "does not match" in r.stderr and "short" in r.stderr


def test_dataset_studies_score_like_their_source_files(tmp_path):
    """hpc convert the ramp study with its mask; --dataset gives the same numbers as --study."""
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, slice_shape=(V, X))
    (gaps, tgt, msk), _, _ = ramp_study(tmp_path)
    r = run_hpc("convert", tgt, "--mask", msk, "-o", tmp_path / "ds", "--shard-slices", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    common = ["--baselines", "linear", "--quiet"]
    r = run_hpc("evaluate", "--checkpoint", ckpt, "--dataset", tmp_path / "ds", "--split", "all",
                "-o", tmp_path / "a", *common, env={"WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr
    r = run_hpc("evaluate", "--checkpoint", ckpt, "--study", gaps, tgt, msk, "-o", tmp_path / "b", *common,
                env={"WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())["results"]
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())["results"]
    assert a.keys() == b.keys() == {"ramp", "overall"}  # two shards (3 + 1 slices) read as one study
    for method in ("unet", "linear"):
        for metric, value in b["ramp"][method].items():
            assert a["ramp"][method][metric] == pytest.approx(value, rel=1e-9), (method, metric)


def test_simulation_truth_reproject_and_images(tmp_path):
    """--simulation: the held-out test-variant studies with their noise-free truth and lesions; the
    reproject baseline equals hpc.physics.recon.reproject on the files (factors and randoms modelled), the
    image table scores every version against the full-data and noise-free reconstructions."""
    import torch

    from hpc.evaluate.protocol import as_written
    from hpc.physics import geometry as G
    from hpc.physics import recon as R
    from hpc.physics.recon import REPROJECT_SUBSETS

    sim = tmp_path / "sim"
    r = run_hpc("simulate", "-o", sim, "--studies", "2", "--test-studies", "1", "--scanner", "test", "--counts",
                "2e5", "--dead-blocks", "1", "--seed", "3")
    assert r.returncode == 0, r.stderr
    sc = G.get_scanner("test")
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, slice_shape=(sc.views, sc.bins))
    r = run_hpc("evaluate", "--checkpoint", ckpt, "--simulation", sim, "-o", tmp_path / "ev", "--reproject-iters",
                "5", "--quiet", env={"WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(m["results"]) == {"s001", "overall"}  # the test-variant study only
    assert set(m["results"]["s001"]) == {"unet", "reproject", "reproject3d", "axial3d", "biharmonic", "linear"}

    rec = json.loads((sim / "studies.json").read_text())["studies"][1]
    files = {k: read_header(sim / v) for k, v in rec["files"].items()}
    arr = {}
    for k, spec in files.items():
        with SinogramReader(spec) as rd:
            arr[k] = torch.from_numpy(rd.read(0, spec.num_slices).astype(np.float32))
    assert files["target"].segments == (0,)  # direct planes only: one stack, every slice scored
    rep = R.reproject(sc, arr["gaps"], arr["mask"], 5, REPROJECT_SUBSETS, valid=arr["mult"] > 0, mult=arr["mult"],
                      add=arr["randoms"]).double()
    rep = torch.from_numpy(as_written(rep.numpy(), files["gaps"].dtype))  # scored as hpc predict writes it
    ex, gap = arr["expected"].double(), (arr["mask"] == 0) & (arr["mult"] > 0)
    got = m["results"]["s001"]["reproject"]
    assert got["nmse_gap_true"] == pytest.approx(float(((rep - ex)[gap] ** 2).sum() / (ex[gap] ** 2).sum()), rel=1e-4)
    assert got["nmse_gap_true"] < m["results"]["s001"]["linear"]["nmse_gap_true"]
    images = m["images"]["s001"]
    assert set(images) == {"full", "gapped", "unet", "reproject", "reproject3d", "axial3d", "biharmonic", "linear"}
    assert "img_nmse_full" not in images["full"] and images["full"]["img_nmse_true"] > 0
    assert images["reproject"]["img_nmse_full"] < images["gapped"]["img_nmse_full"]
    assert (tmp_path / "ev" / "panels" / "s001.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "## Reconstructed images" in report and "| overall | reproject |" in report



def test_the_network_sees_the_lines_of_response_as_in_predict(tmp_path, monkeypatch):
    """The mMR has a virtual crystal per block: bins that are not lines of response. evaluate must hand
    the network's fill the same lines of response predict and training do: without them a trained
    data.fill=linear network scored 0.91 in-gap NMSE in evaluate where predict's file scores 0.05 (the
    realistic benchmark's first run). Checked at the fill's input, where the difference starts."""
    import torch

    from hpc.evaluate import evaluate as E
    from hpc.evaluate.studies import simulation_studies
    from hpc.repair.inference import load_repairer, windows

    sim = tmp_path / "sim"
    r = run_hpc("simulate", "-o", sim, "--studies", "1", "--scanner", "mmr", "--rings", "2", "--counts-per-bin", "4",
                "--dead-blocks", "1", "--seed", "5")
    assert r.returncode == 0, r.stderr
    st = simulation_studies(sim)[0]
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, slice_shape=(st.layout.views, st.layout.bins), fill="linear")
    rep = load_repairer(ckpt, "cpu")
    seen = []
    fill = rep.pre.fill
    monkeypatch.setattr(rep.pre, "fill",  # a spy on the real fill: records what it is given, then runs it
                        lambda raw, mask, aux, valid: seen.append(valid) or fill(raw, mask, aux, valid))
    data, stack = E._read_stack(st.open(), st, E.geometry(rep, st.layout), 0, 3)
    assert not stack.valid.all()  # the virtual crystals' bins
    E._unet(rep, st, 0, data, stack, np.arange(3), 8)
    assert seen and seen[0] is not None
    ids = windows(rep, st.layout, np.arange(3))
    np.testing.assert_array_equal(seen[0].numpy() > 0, stack.valid[ids])
    assert torch.is_tensor(seen[0])
