"""`hpc convert` of list mode and the scanner's calibration, through the real CLI: the whole chain
(a simulated acquisition written as list mode + norm + mu-map -> dataset with mult / randoms /
delayed / mask -> train -> predict), the converted values against the simulation's own, the mMR's
geometry (virtual crystals), --resume of staged files, and one-line refusals."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpc.io.headers import read_header
from hpc.io.shards import Dataset, ShardArray
from hpc.io.sinogram import SinogramReader
from hpc.physics import geometry as G

from helpers import TINY, run_hpc, snapshot

ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def simulate(out: Path, *args: str) -> list[dict]:
    run_hpc("simulate", "-o", out, "--span", "1", *args, env=ENV, check=True)
    return json.loads((out / "studies.json").read_text())["studies"]


def stored(ds: Path, study: str, role: str) -> np.ndarray:
    """A study's dataset ``role`` (target, delayed, mult, randoms, mask) over all its shards."""
    info = Dataset.open(ds).study(study)
    with ShardArray(info, role) as arr:
        return arr.read(0, info.num_slices)


def sino(header: Path) -> np.ndarray:
    spec = read_header(header)
    with SinogramReader(spec) as r:
        return r.read(0, spec.num_slices)


def assert_mult_close(mult: np.ndarray, truth: np.ndarray) -> None:
    """Efficiencies exact, attenuation from a 4 mm map through the projector vs the simulation's
    exact line integrals (LORs grazing an edge differ most); a map read mirrored would be far off."""
    real = truth > 0
    np.testing.assert_array_equal(mult > 0, real)
    ratio = mult[real] / truth[real]
    assert np.mean(np.abs(ratio - 1) < 0.05) > 0.97 and abs(np.median(ratio) - 1) < 0.01
    mirrored = np.roll(truth[:, :, ::-1], 1, axis=2)  # t -> -t: the object mirrored
    both = real & (mirrored > 0)
    assert np.abs(mult - truth)[both].mean() < 0.2 * np.abs(mult - mirrored)[both].mean()


def test_list_mode_chain_convert_train_predict(tmp_path):
    """demo scanner: 2 studies of 4 s list mode -> 2 frames each; frames add up to the simulated
    sinogram exactly, mult matches the simulation's efficiency x attenuation, randoms its randoms'
    scale; then tiny.yaml trains on the dataset and hpc predict repairs its gaps."""
    sim = tmp_path / "sim"
    studies = simulate(sim, "--studies", "2", "--scanner", "demo", "--counts", "3e5", "--listmode", "4", "--seed", "5")
    assert {"listmode", "norm", "mu_map"} <= set(studies[0]["files"])
    files = [sim / s["files"]["listmode"] for s in studies]
    before = snapshot(sim)
    ds = tmp_path / "ds"
    r = run_hpc("convert", *files, "-o", ds, "--frames", "0:2,2:4", "--norm", sim / studies[0]["files"]["norm"],
                "--mu-map", *[sim / s["files"]["mu_map"] for s in studies], "--dead-blocks", "3,17", env=ENV)
    assert r.returncode == 0, r.stderr
    assert snapshot(sim) == before  # sources never modified
    assert not (ds / "shards" / ".staging").exists()  # staged files go once the manifest is written
    manifest = json.loads((ds / "manifest.json").read_text())
    ids = [s["id"] for s in manifest["studies"]]
    assert ids == ["s000-f0", "s000-f1", "s001-f0", "s001-f1"]
    entry = manifest["studies"][0]
    assert entry["kind"] == "listmode" and entry["source"] == str(files[0].resolve())
    assert entry["listmode"]["frame_ms"] == [0, 2000] and entry["listmode"]["dead_blocks"] == [3, 17]
    assert entry["has_mult"] and entry["has_randoms"] and entry["has_delayed"] and entry["has_mask"]
    for k, s in enumerate(studies):
        full = sino(sim / s["files"]["target"])  # (P, V, X) the simulated prompts
        f0, f1 = stored(ds, f"s00{k}-f0", "target"), stored(ds, f"s00{k}-f1", "target")
        np.testing.assert_array_equal(f0.astype(np.int64) + f1, full)
        assert 0.3 < f0.sum() / full.sum() < 0.7  # the events are spread over the 4 s
        truth_mult = sino(sim / s["files"]["mult"])
        mult = stored(ds, f"s00{k}-f0", "mult")
        assert_mult_close(mult, truth_mult)
        randoms, truth_randoms = stored(ds, f"s00{k}-f0", "randoms"), sino(sim / s["files"]["randoms"]) / 2
        delayed = stored(ds, f"s00{k}-f0", "delayed")  # the frame's delayeds: half the 4 s
        assert randoms.sum() == pytest.approx(delayed.sum(), rel=1e-3)  # ML keeps the total
        assert randoms.sum() == pytest.approx(truth_randoms.sum(), rel=0.05)
        err, err_delayed = (np.sqrt(((x - truth_randoms) ** 2).mean()) for x in (randoms, delayed))
        assert err < 0.5 * err_delayed  # far smoother than the delayeds themselves
    mask = stored(ds, "s000-f0", "mask")
    assert 0 < (mask == 0).mean() < 0.5 and set(np.unique(mask)) <= {0.0, 1.0}
    run = tmp_path / "run"
    r = run_hpc("train", "--config", TINY, f"data.path={ds}", f"train.run_dir={run}", env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_hpc("predict", "--checkpoint", run / "checkpoints" / "best.pt", ds, "-o", tmp_path / "fixed", "--quiet",
                env=ENV)
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "fixed" / "s001-f1_repaired.h5") as f:
        repaired = f["repaired"][()]
    target, gaps = stored(ds, "s001-f1", "target"), mask == 0
    np.testing.assert_array_equal(repaired[~gaps], target[~gaps])  # measured bins keep their counts
    assert repaired[gaps].sum() > 0  # the gaps got the network's counts


def test_mmr_geometry_virtual_crystals_and_exact_values(tmp_path):
    """mMR (504 crystals, a virtual one per block), direct planes: the converted span-1 target is
    the simulated sinogram, mult = the simulated efficiencies exactly (0 on every virtual-crystal
    LOR, the norm's one-crystal shift undone), span 11 keeps every count of segment 0."""
    sim = tmp_path / "sim"
    (st,) = simulate(sim, "--scanner", "mmr", "--max-segment", "0", "--studies", "1",
                     "--counts", "2e5", "--listmode", "2", "--no-attenuation")
    lm, norm = sim / st["files"]["listmode"], sim / st["files"]["norm"]
    ds = tmp_path / "ds"
    run_hpc("convert", lm, "-o", ds, "--span", "1", "--max-segment", "0", "--norm", norm, "--quiet", env=ENV,
            check=True)
    full = sino(sim / st["files"]["target"])
    np.testing.assert_array_equal(stored(ds, "s000", "target"), full)
    mult, truth = stored(ds, "s000", "mult"), sino(sim / st["files"]["mult"])
    virtual = ~G.transaxial_valid(G.get_scanner("mmr"))
    assert (mult[:, virtual] == 0).all() and (mult[:, ~virtual] > 0).all()
    np.testing.assert_allclose(mult, truth, rtol=2e-6, atol=1e-7)
    ds11 = tmp_path / "ds11"
    run_hpc("convert", lm, "-o", ds11, "--max-segment", "0", "--quiet", env=ENV, check=True)
    t11 = stored(ds11, "s000", "target")
    assert t11.shape == (127, 252, 344) and t11.sum() == full.sum()
    assert t11[:, virtual].sum() == 0 and stored(ds11, "s000", "delayed")[:, virtual].sum() == 0


def test_sinogram_input_gets_mult_from_norm_and_mu_map(tmp_path):
    sim = tmp_path / "sim"
    (st,) = simulate(sim, "--studies", "1", "--scanner", "demo", "--listmode", "1", "--counts", "3e5")
    ds = tmp_path / "ds"
    run_hpc("convert", sim / st["files"]["target"], "-o", ds, "--norm", sim / st["files"]["norm"], "--mu-map",
            sim / st["files"]["mu_map"], "--quiet", env=ENV, check=True)
    entry = json.loads((ds / "manifest.json").read_text())["studies"][0]
    assert entry["kind"] == "siemens" and entry["has_mult"] and set(entry["factors"]) == {"norm", "mu_map"}
    r = run_hpc("convert", sim / st["files"]["target"], "-o", tmp_path / "ds2", "--frames", "0:1", env=ENV)
    assert r.returncode == 2 and "--frames: applies to list-mode inputs (.l.hdr) only" in r.stderr
    truth = sino(sim / st["files"]["mult"])
    mult = stored(ds, "s000", "mult")
    assert_mult_close(mult, truth)


def test_resume_reuses_staged_files(tmp_path):
    """A run that fails on the second input (an address outside its layout, found while
    histogramming) leaves the first input's staged files; --resume keeps them (nothing is
    histogrammed again) and finishes."""
    sim = tmp_path / "sim"
    studies = simulate(sim, "--studies", "2", "--scanner", "demo", "--listmode", "2", "--counts", "3e5")
    a, b = (sim / s["files"]["listmode"] for s in studies)
    good = b.with_suffix("").read_bytes()
    words = np.frombuffer(good, "<u4").copy()
    last = np.flatnonzero(words < 1 << 31)[-1]  # the last event (in the second frame)
    words[last] = 1 << 30 | 1 << 29  # a prompt at address 2**29
    b.with_suffix("").write_bytes(words.tobytes())
    ds = tmp_path / "ds"
    r = run_hpc("convert", a, b, "-o", ds, "--frames", "0:1,1:2", env=ENV)
    errors = [line for line in r.stderr.splitlines() if "error" in line]  # (the rest: progress lines)
    assert r.returncode == 2 and len(errors) == 1
    assert "s001.l: word" in errors[0] and "outside the header's" in errors[0]
    assert not (ds / "manifest.json").exists()
    assert len(list((ds / "shards" / ".staging").glob("s000-f?.s"))) == 2  # the first input's frames
    assert "s000.l.hdr frame 1:2 s" in r.stdout
    b.with_suffix("").write_bytes(good)
    r = run_hpc("convert", a, b, "-o", ds, "--frames", "0:1,1:2", "--resume", env=ENV)
    assert r.returncode == 0, r.stderr
    assert "s000.l.hdr frame" not in r.stdout  # kept: not histogrammed again
    assert "s001.l.hdr frame 0:1 s" in r.stdout  # its file changed: its key with it
    assert len(Dataset.open(ds).studies) == 4 and not (ds / "shards" / ".staging").exists()
    kept = json.loads((ds / "manifest.json").read_text())["studies"][0]["listmode"]["counts"]
    assert kept["prompts"] == stored(ds, "s000-f0", "target").sum()  # the earlier run's counts, recorded


@pytest.fixture(scope="module")
def small_sims(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(a demo study's list-mode header, its mu-map, the norm of another scanner): simulated once."""
    root = tmp_path_factory.mktemp("lm")
    (st,) = simulate(root / "demo", "--studies", "1", "--scanner", "demo", "--listmode", "1", "--counts", "3e5")
    (ot,) = simulate(root / "test", "--studies", "1", "--scanner", "test", "--listmode", "1", "--counts", "1e4")
    return (root / "demo" / st["files"]["listmode"], root / "demo" / st["files"]["mu_map"],
            root / "test" / ot["files"]["norm"])


@pytest.mark.parametrize("args,match", [
    (["--frames", "5:1"], "time frame"),
    (["--frames", "0:1", "--input", "{lm}"], "--input: not with list-mode inputs"),
    (["--span", "4"], "--span/--view-mashing/--max-segment"),
    (["--dead-blocks", "999"], "dead blocks"),
    (["--norm", "{other_norm}"], "a normalisation of hpc test, the data is hpc demo"),
    (["--mu-map", "{lm}"], "not a mu-map"),
    (["--norm", "{mu}"], "not a Siemens normalisation"),
    (["--lm-workers", "0"], "--lm-workers"),
])
def test_refusals_are_one_line(tmp_path, small_sims, args, match):
    lm, mu, other_norm = small_sims
    before = snapshot(lm.parent)
    fill = {"lm": str(lm), "mu": str(mu), "other_norm": str(other_norm)}
    r = run_hpc("convert", lm, "-o", tmp_path / "ds", *[a.format(**fill) for a in args], env=ENV)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert match in r.stderr
    assert not (tmp_path / "ds").exists() and snapshot(lm.parent) == before


def test_truncated_list_mode_is_refused_before_anything_is_written(tmp_path, small_sims):
    lm = tmp_path / "cut.l.hdr"
    data = small_sims[0].with_suffix("")
    lm.write_text(small_sims[0].read_text().replace(data.name, "cut.l"))
    (tmp_path / "cut.l").write_bytes(data.read_bytes()[:-2])
    r = run_hpc("convert", lm, "-o", tmp_path / "ds", env=ENV)
    assert r.returncode == 2 and "truncated" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ds").exists()
    r = run_hpc("simulate", "-o", tmp_path / "s", "--scanner", "demo", "--view-mashing", "2", "--listmode", "1",
                env=ENV)
    assert r.returncode == 2 and "--listmode" in r.stderr and "unmashed" in r.stderr
