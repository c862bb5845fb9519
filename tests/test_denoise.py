"""Denoising, the package's second task (hpc.baselines.denoise, hpc.evaluate.denoise): the physics
denoisers on cases with a known answer, the training target that is independent of the thinned
input, and `hpc evaluate --task denoise` end to end with a trained denoiser and with bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hpc.baselines import denoise as D
from hpc.cli import main
from hpc.data.loader import build_loader
from hpc.errors import InputError
from hpc.evaluate import denoise as DN
from hpc.evaluate.protocol import as_written
from hpc.evaluate.studies import low_dose_studies
from hpc.io.headers import read_header
from hpc.io.sinogram import SinogramReader
from hpc.physics import geometry as G
from hpc.physics import recon as R
from hpc.physics.projector import default_grid
from hpc.registry import DENOISERS
from hpc.repair.inference import load_repairer
from hpc.simulate import simulate as S

from helpers import TINY, loader_cfg, make_checkpoint, make_dataset, refuse


def _low_dose(shape=(3, 16, 12), dose=0.5, seed=0) -> D.LowDose:
    rng = np.random.default_rng(seed)
    valid = rng.random(shape) > 0.1
    mult = np.where(valid, rng.uniform(0.3, 1.0, shape), 0.0)  # sharp efficiency x attenuation pattern
    randoms = np.where(valid, 2.0, 0.0)
    return D.LowDose(np.zeros(shape), dose, valid, mult, randoms)


def test_gauss_returns_data_whose_activity_is_constant_exactly():
    """m * c + r for a constant line integral c: smoothing c / normalising by the smoothed m gives c
    back, for every width, whatever the factors' pattern and the invalid LORs."""
    d = _low_dose()
    d.y = np.where(d.valid, (d.mult * 7.0 + d.randoms) * d.dose, 0.0)
    planes = np.arange(3)
    want = np.where(d.valid, d.mult * 7.0 + d.randoms, 0.0)
    for sigma in (0.5, 2.0, 4.0):
        np.testing.assert_allclose(D.gauss(d, planes, sigma=sigma), want, rtol=1e-12, atol=1e-12)


def test_smoothing_wraps_views_with_the_radial_mirror():
    """A sinogram rotated by one view (the last view continues as the first, radially mirrored) is
    smoothed into the rotation of the smoothed sinogram: the padding is the sinogram's own geometry."""
    a = np.random.default_rng(1).random((2, 10, 9))

    def rotate(s):
        return np.concatenate([s[:, 1:], s[:, :1, ::-1]], axis=1)

    np.testing.assert_allclose(D.smooth_views(rotate(a), 1.5), rotate(D.smooth_views(a, 1.5)), atol=1e-12)


def test_scaled_is_the_unbiased_full_dose_scale():
    d = _low_dose()
    d.y = np.where(d.valid, 3.0, 0.0)
    assert np.array_equal(D.scaled(d, np.arange(3)), np.where(d.valid, 6.0, 0.0))


def test_reproject_denoiser_recovers_consistent_data_and_one_run_serves_every_count():
    """Data the model can explain exactly (m A x + r of a known image): 24 iterations bring the
    denoiser's output to it; the 2- and 24-iteration outputs from one planned run equal lone runs."""
    sc = G.get_scanner("test")
    st = S.simulate_study(sc, "a", 3, 1e5, (0,))
    mult, rnd = st.means.mult[:2].astype(np.float64), st.means.randoms[0, :2].astype(np.float64)
    grid = default_grid(sc)
    x = torch.from_numpy(grid.fov_mask(sc.fov_radius_mm) * (1.0 + np.arange(grid.nx) / grid.nx))[None].repeat(2, 1, 1)
    exp = R.model_counts(sc, x, mult=torch.from_numpy(mult), add=torch.from_numpy(rnd)).numpy()  # (2, V, X)
    valid = mult > 0
    d = D.LowDose(exp * 0.25, 0.25, valid, mult, rnd, sc, planned={"reproject": [{"iters": 2}, {"iters": 24}]})
    planes = np.arange(2)
    err = {it: ((D.reproject(d, planes, iters=it) - exp)[valid] ** 2).sum() / (exp[valid] ** 2).sum() for it in (2, 24)}
    assert err[24] < err[2] and err[24] < 2e-3, err
    alone = D.reproject(D.LowDose(exp * 0.25, 0.25, valid, mult, rnd, sc), planes, iters=2)
    np.testing.assert_allclose(D.reproject(d, planes, iters=2), alone, rtol=1e-5, atol=1e-6)


def test_a_study_is_the_same_with_or_without_its_low_dose_twin():
    sc = G.get_scanner("test")
    a = S.simulate_study(sc, "a", 5, 1e5, (0,), dead_blocks=2)
    b = S.simulate_study(sc, "a", 5, 1e5, (0,), dead_blocks=2, low_dose=0.25)
    assert np.array_equal(a.full, b.full) and np.array_equal(a.mask, b.mask) and a.dead == b.dead
    assert b.low is not None and (b.low <= b.full).all() and 0.2 < b.low.sum() / b.full.sum() < 0.3


def test_thinned_input_is_trained_against_the_counts_it_did_not_keep(tmp_path):
    """dose_target rest: input * dose + target * (1 - dose) is the full scan, count for count (the
    same draws as dose_target full, whose target is the full scan), and the target never holds the
    input's counts."""
    root = make_dataset(tmp_path / "d", studies=2, axial=(6,), counts=True, scanner="")
    batches = {}
    for mode in ("rest", "full"):
        cfg = loader_cfg(root)
        cfg.corrupt.dose, cfg.corrupt.dose_target = 0.3, mode
        loader = build_loader(cfg, "train", 0, 1, torch.device("cpu"))
        loader.set_epoch(0)
        batches[mode] = list(loader)
    for rest, full in zip(batches["rest"], batches["full"], strict=True):
        assert torch.equal(rest.input, full.input)
        x = rest.input[:, 1:2] * 0.3  # the kept counts of the centre slice
        torch.testing.assert_close(x + rest.target * 0.7, full.target, rtol=0, atol=1e-3)
        assert not torch.allclose(rest.target, full.target)


@pytest.mark.parametrize("dose", [1.0, 0.3])
def test_data_target_expected_trains_against_the_noise_free_counts(tmp_path, dose):
    """data.target=expected: the same input (same draws), the target the centre slice's stored
    noise-free counts (with or without thinning); a dataset without them is refused in one line."""
    root = make_dataset(tmp_path / "d", studies=2, axial=(6,), counts=True, scanner="", expected=True)
    batches = {}
    for target in ("measured", "expected"):
        cfg = loader_cfg(root, target=target)
        cfg.corrupt.dose = dose
        loader = build_loader(cfg, "train", 0, 1, torch.device("cpu"))
        loader.set_epoch(0)
        batches[target] = list(loader)
    for meas, exp in zip(batches["measured"], batches["expected"], strict=True):
        assert torch.equal(meas.input, exp.input) and torch.equal(meas.index, exp.index)
        full = meas.input[:, 1:2] if dose == 1 else None  # unthinned: the input's centre is the stored target
        if full is not None:
            torch.testing.assert_close(exp.target, full + 0.25, rtol=0, atol=1e-6)
        assert torch.all(exp.target % 1 == 0.25)  # the stored float32 expected counts, not the measured
    plain = make_dataset(tmp_path / "p", studies=2, axial=(6,), counts=True, scanner="")
    with pytest.raises(InputError, match=r"store no noise-free `expected` counts \(data.target=expected"):
        build_loader(loader_cfg(plain, target="expected"), "train", 0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def low_dose_sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("lowdose")
    sim = root / "sim"
    assert main(["simulate", "-o", str(sim), "--studies", "7", "--test-studies", "2", "--scanner", "test",
                 "--low-dose", "0.25", "--format", "stir", "--seed", "2", "--counts", "clinical"]) == 0
    studies = json.loads((sim / "studies.json").read_text())["studies"]
    files = [str(sim / s["files"]["target"]) for s in studies[:5]]
    assert main(["convert", *files, "-o", str(root / "ds"), "--quiet"]) == 0
    return root


@pytest.fixture(scope="module")
def denoiser(low_dose_sim):
    root = low_dose_sim
    assert main(["train", "--config", str(TINY), f"data.path={root / 'ds'}", f"train.run_dir={root / 'run'}",
                 "data.train_studies=[s000,s001]", "data.val_studies=[s002,s003,s004]", "corrupt.use_stored_mask=false",
                 "corrupt.dose=0.25", "model.inpaint=false", "train.best_metric=nmse"]) == 0
    return root / "run" / "checkpoints" / "best.pt"


def test_evaluate_denoise_scores_a_trained_denoiser_against_tuned_physics(low_dose_sim, denoiser, tmp_path):
    root, ckpt = low_dose_sim, denoiser
    out = tmp_path / "ev"
    assert main(["evaluate", "--task", "denoise", "--checkpoint", str(ckpt), "--simulation", str(root / "sim"),
                 "--tune-on", "s002,s003,s004", "-o", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "denoise" and m["doses"] == [0.25, 0.25]
    overall = m["results"]["overall"]
    assert {"unet", "reproject", "gauss", "scaled"} <= set(overall)
    assert overall["reproject"]["nmse_all_true"] < overall["scaled"]["nmse_all_true"]  # physics denoises
    assert overall["gauss"]["nmse_all_true"] < overall["scaled"]["nmse_all_true"]
    comp = m["comparison"]["nmse_all_true"]
    assert comp["reference"] in ("reproject", "gauss")
    assert comp["methods"]["unet"]["verdict"] in ("wins", "ties", "loses")
    assert {"iters", "sigma"} == {k for p in m["tuning"]["params"].values() for k in p}
    assert m["images"]["overall"]["full"]["img_nmse_true"] > 0  # the full scan's own image: the noise floor
    report = (out / "report.md").read_text()
    assert "unet" in report
    held = sorted(s for s in m["results"] if s != "overall")
    for sid in held:  # a panel per held-out study, in the report, a real PNG
        png = out / "panels" / f"{sid}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(panels/{sid}.png)" in report
    rec = m["recommend"]
    params = m["tuning"]["params"].get(rec["method"], {})
    want = "".join(f" --method-param {k}={v['value']}" for k, v in params.items())
    assert rec["command"].startswith(f"hpc predict --dose 0.25 --method {rec['method']}{want} INPUT") \
        if rec["method"] != "unet" else rec["command"].startswith(f"hpc predict --dose 0.25 --checkpoint {ckpt}")
    assert set(m["energy"]) == {*held, "overall"} and m["energy"]["overall"]["all_true"] > 0


def test_evaluate_denoise_logs_a_wandb_run_read_back(low_dose_sim, tmp_path):
    """--wandb offline: one W&B run (job type evaluate, named after the output, task and doses in its
    config) with the metrics table and a panel per held-out study, read back from its offline file."""
    from test_logger import written_records

    out = tmp_path / "dn"
    assert main(["evaluate", "--task", "denoise", "--simulation", str(low_dose_sim / "sim"), "--baselines",
                 "scaled,gauss", "--tune-on", "s002,s003,s004", "--no-images", "--wandb", "offline", "-o", str(out),
                 "--quiet"]) == 0
    (path,) = out.glob("wandb/offline-run-*/run-*.wandb")
    records = written_records(path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.job_type, run.display_name) == ("evaluate", "dn-eval-denoise")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["task"] == "denoise" and config["doses"] == [0.25, 0.25] and config["checkpoint"] == ""
    assert "sigma" in config["tuning"]["gauss"]
    logged = {i.key or i.nested_key[0] for r in records if r.WhichOneof("record_type") == "history"
              for i in r.history.item}
    assert {"metrics", "panels"} <= logged
    assert len(list(out.glob("wandb/offline-run-*/files/media/images/*.png"))) == 2


def test_evaluate_denoise_refuses_what_it_cannot_score(low_dose_sim, tmp_path, capsys):
    sim = str(low_dose_sim / "sim")
    refuse(capsys, ["evaluate", "--task", "denoise", "--simulation", sim, "--tune-on", "s000", "-o",
                    str(tmp_path / "a")], words=["at least 3"])
    refuse(capsys, ["evaluate", "--task", "denoise", "--simulation", sim, "--tune-on", "s000,s001,s005", "-o",
                    str(tmp_path / "b")], words=["s005", "held-out"])
    refuse(capsys, ["evaluate", "--task", "denoise", "--simulation", sim, "--tune-on", "s000,s001,s002",
                    "--param", "gauss.width=2", "-o", str(tmp_path / "c")], words=["gauss.sigma"])
    refuse(capsys, ["evaluate", "--task", "denoise", "--dataset", str(low_dose_sim / "ds"), "-o",
                    str(tmp_path / "d")], words=["--simulation"])
    plain = tmp_path / "plain"
    assert main(["simulate", "-o", str(plain), "--studies", "2", "--scanner", "test", "--format", "stir"]) == 0
    capsys.readouterr()
    refuse(capsys, ["evaluate", "--task", "denoise", "--simulation", str(plain), "--studies", "s000", "-o",
                    str(tmp_path / "e")], words=["--low-dose"])


def _held_out(root):
    st = json.loads((root / "sim" / "studies.json").read_text())["studies"][-1]
    return st, {k: root / "sim" / v for k, v in st["files"].items()}


def _read(path) -> np.ndarray:
    spec = read_header(path)
    with SinogramReader(spec) as r:
        return r.read(0, spec.num_slices)


def test_predict_dose_writes_what_evaluate_scores(low_dose_sim, denoiser, tmp_path):
    """`hpc predict --dose` (a physics denoiser, the network) writes the very numbers `hpc evaluate
    --task denoise` scored for the same study: the same method, parameters, scale and rounding."""
    st, f = _held_out(low_dose_sim)
    for name, param in (("gauss", "sigma=1.5"), ("scaled", None)):
        out = tmp_path / f"{name}.hs"
        assert main(["predict", "--dose", "0.25", "--method", name, *(["--method-param", param] if param else []),
                     str(f["input"]), "--mult", str(f["mult"]), "--randoms", str(f["randoms"]), "-o", str(out),
                     "--quiet"]) == 0
        low, mult = _read(f["input"]).astype(np.float64), _read(f["mult"]).astype(np.float64)
        d = D.LowDose(low, 0.25, mult > 0, mult, _read(f["randoms"]).astype(np.float64))
        kwargs = {"sigma": 1.5} if param else {}
        want = as_written(np.maximum(DENOISERS.get(name)(d, np.arange(len(low)), **kwargs), 0),
                          read_header(f["input"]).dtype)
        np.testing.assert_array_equal(_read(out), want)
    rep = load_repairer(denoiser, torch.device("cpu"))
    study, dose = low_dose_studies(low_dose_sim / "sim", [st["id"]])[0]
    readers = study.open()
    data = {k: r.read(0, study.layout.num_slices).astype(np.float64) for k, r in readers.items()}
    for r in readers.values():
        r.close()
    want = as_written(np.maximum(DN._network(rep, study, 0, data, data["mult"] > 0, np.arange(len(data["input"])),
                                             dose, 8), 0), study.layout.dtype)
    out = tmp_path / "unet.hs"
    assert main(["predict", "--dose", "0.25", "--checkpoint", str(denoiser), str(f["input"]), "--mult", str(f["mult"]),
                 "-o", str(out), "--quiet"]) == 0
    np.testing.assert_array_equal(_read(out), want)


def test_predict_dose_refuses_what_it_cannot_do(low_dose_sim, denoiser, tmp_path, capsys):
    st, f = _held_out(low_dose_sim)
    repairer = tmp_path / "repair.pt"
    make_checkpoint(repairer)
    cases = [(["--dose", "1.5", "--method", "gauss"], ["--dose", "(0, 1)"]),
             (["--dose", "0.25", "--method", "linear"], ["linear", "does not denoise"]),
             (["--dose", "0.25", "--method", "gauss", "--mask", str(f["input"])], ["--mask"]),
             (["--dose", "0.25", "--method", "gauss", "--method-param", "width=2"], ["sigma="]),
             (["--dose", "0.25", "--checkpoint", str(repairer)], ["not a denoising network"]),
             (["--dose", "0.25", "--method", "unet"], ["--checkpoint"])]
    for i, (extra, words) in enumerate(cases):
        out = tmp_path / f"o{i}.hs"
        refuse(capsys, ["predict", str(f["input"]), *extra, "-o", str(out)], words=words, outputs=[out],
               sources=[low_dose_sim / "sim"])


def test_predict_dose_denoises_a_converted_datasets_studies(low_dose_sim, denoiser, tmp_path, capsys):
    """A paired dataset (the full scan, its low-dose twin as `input`, factors, a gap mask) denoised
    study by study: `<study>_denoised.h5` holds what the same method writes for the study's own
    files (the gap mask is not applied: nothing is kept "as measured"); dead blocks are refused."""
    import h5py

    st, f = _held_out(low_dose_sim)
    ds = tmp_path / "paired"
    gaps = ["--mask", str(f["mask"])] if "mask" in f else []
    assert main(["convert", str(f["target"]), "--input", str(f["input"]), "--mult", str(f["mult"]), "--randoms",
                 str(f["randoms"]), *gaps, "-o", str(ds), "--quiet"]) == 0
    factors = ["--mult", str(f["mult"]), "--randoms", str(f["randoms"])]
    for name, how in (("gauss", ["--method", "gauss", "--method-param", "sigma=1.5"]),
                      ("unet", ["--checkpoint", str(denoiser)])):
        from_files = tmp_path / f"{name}.hs"
        assert main(["predict", "--dose", "0.25", *how, str(f["input"]), *factors, "-o", str(from_files),
                     "--quiet"]) == 0
        out = tmp_path / f"den-{name}"
        assert main(["predict", "--dose", "0.25", *how, str(ds), "-o", str(out), "--quiet"]) == 0
        (written,) = out.iterdir()
        assert written.name.endswith("_denoised.h5")
        with h5py.File(written) as h:
            got = h["repaired"][()]
        want = _read(from_files)
        np.testing.assert_array_equal(got.reshape(want.shape), want)
        assert not np.array_equal(want, _read(f["input"]))  # denoised, not copied
    out = tmp_path / "refused"
    refuse(capsys, ["predict", "--dose", "0.25", "--method", "gauss", str(ds), "--dead-blocks", "1", "-o", str(out)],
           words=["--dead-blocks", "whole scan"], outputs=[out], sources=[ds])
