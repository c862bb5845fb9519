"""Simulator: exact projections, TOF split, Poisson statistics, determinism, uint16 guard, and
files that hpc.io.sinogram reads back to the simulated arrays."""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest

from hpc.errors import InputError, OutputError
from hpc.io.headers import read_header
from hpc.io.sinogram import SinogramReader
from hpc.physics import factors as F
from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.simulate import counts as SC
from hpc.simulate import phantom as PT
from hpc.simulate import simulate as S

from helpers import run_hpc

TEST, DEMO = G.get_scanner("test"), G.get_scanner("demo")
TOF_TEST = dataclasses.replace(TEST, name="tof-test", tof_bins=5, tof_fwhm_ps=400.0, tof_bin_ps=300.0)


def test_projection_of_a_disk_is_its_chord_length():
    phi, s = G.lor_coordinates(DEMO)
    r, act = 80.0, 2.5
    got = SC.project(DEMO, np.array([[0.0, 0.0, r, r, 0.3, act]]), phi, s)[0]  # (V, X)
    np.testing.assert_allclose(got, act * 2 * np.sqrt(np.maximum(r * r - s * s, 0)), atol=1e-9)


def test_projection_of_a_shifted_ellipse_follows_its_centre():
    """A point-like ellipse at (x0, y0) lands on s = x0 cos(phi) + y0 sin(phi) in every view."""
    phi, s = G.lor_coordinates(DEMO)
    x0, y0 = 60.0, -40.0
    got = SC.project(DEMO, np.array([[x0, y0, 12.0, 6.0, 0.7, 1.0]]), phi, s)[0]
    peak = s[np.arange(DEMO.views), got.argmax(axis=1)]
    expected = x0 * np.cos(phi[:, 0]) + y0 * np.sin(phi[:, 0])
    assert np.abs(peak - expected).max() < 1.5 * DEMO.bin_size_mm


def test_tof_split_sums_to_the_non_tof_projection():
    phi, s = G.lor_coordinates(TOF_TEST)
    ell = np.array([[10.0, -5.0, 50.0, 30.0, 0.4, 1.0], [-20.0, 10.0, 10.0, 10.0, 0.0, 4.0]])
    tof = SC.project(TOF_TEST, ell, phi, s)  # (5, V, X)
    assert tof.shape == (5, TOF_TEST.views, TOF_TEST.bins) and (tof >= 0).all()
    np.testing.assert_allclose(tof.sum(axis=0), SC.project(TEST, ell, phi, s)[0], rtol=1e-9, atol=1e-9)
    assert (tof.max(axis=0) < 0.9 * tof.sum(axis=0) + 1e-12).all()  # really split along the LOR


def test_tof_weights_centre_on_the_emission_point():
    w = SC.tof_weights(TOF_TEST, np.array([-0.01, 44.96]), np.array([0.01, 44.98]))  # (T, 2) tiny segments
    np.testing.assert_allclose(w.sum(axis=0), 1.0)
    assert w[:, 0].argmax() == 2 and w[:, 1].argmax() == 3  # 300 ps bins are 45 mm long


def test_phantoms_differ_and_vary_smoothly_along_the_axis():
    a = SC.expected_counts(DEMO, PT.random_phantom(DEMO, np.random.default_rng(1)), (0,))[0]  # (P, V, X)
    b = SC.expected_counts(DEMO, PT.random_phantom(DEMO, np.random.default_rng(2)), (0,))[0]
    assert np.corrcoef(a[0].ravel(), b[0].ravel())[0, 1] < 0.99  # another patient
    step = np.abs(np.diff(a, axis=0)).mean(axis=(1, 2)) / a.mean()
    assert (step > 1e-3).all() and (step < 0.5).all()  # every plane differs, but smoothly


def test_poisson_and_binomial_thinning_statistics():
    seed, counts, dose = 11, 4e5, 0.3
    st = S.simulate_study(TEST, "p", seed, counts, (0,), low_dose=dose)
    rng = np.random.default_rng(seed)  # the study's phantom is the first draw of its generator
    mean = SC.study_means(TEST, PT.random_phantom(TEST, rng), (0,), counts).expected
    np.testing.assert_allclose(mean, st.means.expected)
    assert mean.sum() == pytest.approx(counts)
    full, low = st.full.astype(float), st.low.astype(float)
    assert abs(full.sum() - counts) < 5 * np.sqrt(counts)
    # Pearson chi-square per bin ~ 1 for Poisson (mean = variance); sd of the average ~ sqrt(2 / n)
    used = mean > 5
    assert abs(((full[used] - mean[used]) ** 2 / mean[used]).mean() - 1) < 6 * np.sqrt(2 / used.sum())
    # thinned counts are Poisson with mean dose x mean
    used = mean * dose > 5
    chi = ((low[used] - dose * mean[used]) ** 2 / (dose * mean[used])).mean()
    assert abs(chi - 1) < 6 * np.sqrt(2 / used.sum()) and (low <= full).all()
    assert abs(low.sum() / full.sum() - dose) < 5 * np.sqrt(dose * (1 - dose) / full.sum())


def test_same_seed_same_study_and_seeds_independent_of_study_count():
    assert S.study_seeds(3, 2) == S.study_seeds(3, 5)[:2]
    seed = S.study_seeds(3, 1)[0]
    one = S.simulate_study(DEMO, "a", seed, 1e5, (0,), dead_blocks=2, low_dose=0.5)
    two = S.simulate_study(DEMO, "a", seed, 1e5, (0,), dead_blocks=2, low_dose=0.5)
    for x, y in ((one.full, two.full), (one.low, two.low), (one.mask, two.mask)):
        assert np.array_equal(x, y)
    assert one.dead == two.dead
    other = S.simulate_study(DEMO, "b", seed + 1, 1e5, (0,))
    assert not np.array_equal(one.full, other.full)


def test_counts_beyond_uint16_are_an_error_naming_the_maximum():
    with pytest.raises(InputError, match=r"--counts: p7 has a bin with \d+ counts, above the uint16 maximum 65535"):
        S.simulate_study(TEST, "p7", 1, 1e9, (0,))


def _args(tmp_path, **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    S.add_arguments(p)
    argv = ["-o", str(tmp_path / "sim")]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return p.parse_args(argv)


def _read(header) -> np.ndarray:
    spec = read_header(header)
    with SinogramReader(spec) as r:
        return r.read(0, spec.num_slices)


def test_cli_files_read_back_to_the_simulated_arrays(tmp_path):
    png = tmp_path / "sim.png"
    args = _args(tmp_path, studies=2, scanner="demo", counts=2e5, dead_blocks=2, low_dose=0.25, seed=5, png=png)
    assert S.run(args) == 0
    out = tmp_path / "sim"
    meta = json.loads((out / "studies.json").read_text())
    assert [s["id"] for s in meta["studies"]] == ["s000", "s001"] and meta["scanner"] == "demo"
    seeds = S.study_seeds(5, 2)
    for rec, seed in zip(meta["studies"], seeds, strict=True):
        st = S.simulate_study(DEMO, rec["id"], seed, 2e5, (0,), 2, 0.25)
        assert rec["seed"] == seed and rec["dead_blocks"] == st.dead and rec["counts"] == int(st.full.sum())
        spec = read_header(out / rec["files"]["target"])
        assert spec.scanner == "hpc demo" and G.get_scanner(spec.scanner) is DEMO  # STIR-style name
        assert spec.slice_shape == (DEMO.views, DEMO.bins) and spec.dtype == np.dtype("<u2")
        np.testing.assert_array_equal(_read(out / rec["files"]["target"]), st.full[0])
        np.testing.assert_array_equal(_read(out / rec["files"]["input"]), st.low[0])
        np.testing.assert_array_equal(_read(out / rec["files"]["gaps"]), st.full[0] * st.mask)
        np.testing.assert_array_equal(_read(out / rec["files"]["mask"]), st.mask)
        np.testing.assert_array_equal(st.mask, P.dead_block_mask(DEMO, st.dead))
        for role, want in (("expected", st.means.expected[0]), ("randoms", st.means.randoms[0]),
                           ("mult", st.means.mult)):
            got = _read(out / rec["files"][role])
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=1e-6)
        assert rec["variant"] == "train" and rec["lesions"] == st.lesions and rec["lesions"]
    assert meta["physics"] == {"attenuation": True, "normalisation": True, "randoms": 0.25}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OutputError, match="already holds a simulation"):
        S.run(args)


def test_a_users_files_of_the_same_names_are_never_replaced(tmp_path):
    """-o into a directory that holds files named like the simulation's own (no studies.json): one
    line naming the first, exit 2, every file untouched; other files do not matter."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    (out / "s001_mask.s").write_bytes(b"my mask")
    (out / "s000.hs").write_text("my header")
    r = run_hpc("simulate", "-o", out, "--studies", "2", "--scanner", "test", "--counts", "1e4")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "would replace s000.hs and 1 more; choose another -o" in r.stderr and str(out) in r.stderr
    assert (out / "s000.hs").read_text() == "my header" and (out / "s001_mask.s").read_bytes() == b"my mask"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "s000.hs", "s001_mask.s"]
    for name in ("s000.hs", "s001_mask.s"):
        (out / name).unlink()
    assert run_hpc("simulate", "-o", out, "--studies", "1", "--scanner", "test", "--counts", "1e4").returncode == 0
    assert (out / "notes.txt").read_text() == "keep" and (out / "studies.json").is_file()


def test_cli_stir_with_oblique_segments_and_tof(tmp_path, monkeypatch):
    monkeypatch.setitem(G.SCANNERS, "tof-test", TOF_TEST)
    assert S.run(_args(tmp_path, scanner="tof-test", studies=1, counts=5e4, max_ring_diff=1, format="stir",
                       dead_blocks=1)) == 0
    header = tmp_path / "sim" / "s000.hs"
    spec = read_header(header)
    assert spec.segments == (0, -1, 1) and spec.axial_counts == (4, 3, 3) and spec.tof_bins == 5
    st = S.simulate_study(TOF_TEST, "s000", S.study_seeds(0, 1)[0], 5e4, (0, -1, 1), dead_blocks=1)
    np.testing.assert_array_equal(_read(header), st.full.reshape(-1, TOF_TEST.views, TOF_TEST.bins))
    mask = _read(tmp_path / "sim" / "s000_mask.hs")  # one mask slice per data slice
    np.testing.assert_array_equal(mask, np.tile(P.dead_block_mask(TOF_TEST, st.dead, (0, -1, 1)), (5, 1, 1)))


@pytest.mark.parametrize("kw, message", [
    ({"max_ring_diff": 8}, "--span/--max-ring-diff/--view-mashing/--tof-mashing on demo: span 1 with maximum ring "
                           "difference 8 is impossible on 8 rings"),
    ({"view_mashing": 3}, "view mashing 3 must divide the 64 views"),
    ({"planes": 0}, "--planes must be >= 1"),
    ({"dead_blocks": 33}, r"--dead-blocks must be in \[0, 32\] on demo"),
    ({"low_dose": 1.5}, r"--low-dose must be in \(0, 1\)"),
    ({"scanner": "petra"}, "--scanner: unknown scanner 'petra'; valid: test, demo, mmr, mct"),
    ({"counts": "lots"}, "--counts must be a number > 0 or one of low, clinical, high, very-high, got 'lots'"),
    ({"randoms": 1.0}, r"--randoms must be in \[0, 1\)"),
    ({"test_studies": 5}, r"--test-studies must be in \[0, 4\]"),
])
def test_cli_rejects_bad_arguments(tmp_path, kw, message):
    with pytest.raises(InputError, match=message):
        S.run(_args(tmp_path, **kw))
    assert not (tmp_path / "sim").exists()


def _cylinder(sc: G.Scanner, radius: float) -> PT.Phantom:
    """A uniform soft-tissue cylinder on the axis, longer than the scanner (no organs, no lesions)."""
    body = np.array([0.0, 0.0, radius, radius, 0.0, -np.pi / 2, 0.0])  # wobble 1 + 0.04 (1 + sin(-pi/2)) = 1
    return PT.Phantom(body, np.zeros((0, 9)), 0.0)


def test_uniform_cylinder_attenuation_factor_is_exp_minus_mu_l():
    r, mu = 90.0, F.MU["soft tissue"]
    segs = (0, -1, 1)
    means = SC.study_means(TEST, _cylinder(TEST, r), segs, 1e5, SC.Physics(normalisation=False, randoms=0.0))
    phi, s = G.lor_coordinates(TEST)
    chord = 2 * np.sqrt(np.maximum(r * r - s * s, 0))  # (V, X) in-plane path through the cylinder
    ra, rb = P.plane_list(TEST, segs)
    lor = 2 * np.sqrt(TEST.radius_mm ** 2 - s ** 2)
    tilt = np.sqrt(1 + (((rb - ra) * TEST.ring_spacing_mm)[:, None, None] / lor) ** 2)  # (P, V, X)
    np.testing.assert_allclose(means.mult, np.exp(-mu * chord * tilt), rtol=1e-12)
    assert means.mult.min() == pytest.approx(np.exp(-mu * 2 * r), rel=0.02)  # the central LOR: ~0.18
    # the counts are the attenuated trues: expected / geometric trues = the attenuation factor
    trues = SC.expected_counts(TEST, _cylinder(TEST, r), segs)[0]
    inside = trues > 0
    ratio = means.expected[0][inside] / trues[inside]
    np.testing.assert_allclose(ratio / ratio.max(), (means.mult[inside] / means.mult[inside].max()), rtol=1e-9)


def test_normalisation_is_the_product_of_fixed_crystal_efficiencies():
    sc = G.Scanner("vc", "vc", rings=2, detectors_per_ring=48, block_trans=4, block_axial=2, bins=24,
                   inner_radius_mm=120.0, doi_mm=0.0, bin_size_mm=7.85, ring_spacing_mm=4.0, virtual_trans=1)
    eff = F.crystal_efficiencies(sc)
    virtual = np.arange(48) % 4 == 0  # STIR: the first crystal of each block
    assert (eff[:, virtual] == 0).all() and eff[:, ~virtual].mean() == pytest.approx(1.0)
    assert 0.03 < eff[:, ~virtual].std() < 0.2
    np.testing.assert_array_equal(eff, F.crystal_efficiencies(sc))  # the scanner's, not the study's
    means = SC.study_means(sc, _cylinder(sc, 60.0), (0, -1, 1), 1e5, SC.Physics(attenuation=False, randoms=0.0))
    ra, rb = P.plane_list(sc, (0, -1, 1))
    rng = np.random.default_rng(0)
    for p, v, x in zip(rng.integers(0, 4, 50), rng.integers(0, 24, 50), rng.integers(0, 24, 50), strict=True):
        ca, cb = G.sino_to_lor(sc, v, x)  # brute force, one LOR at a time
        assert means.mult[p, v, x] == pytest.approx(eff[ra[p], ca] * eff[rb[p], cb], rel=1e-12)
    assert (means.mult * (1 - G.gap_mask(sc)) == 0).all() and (means.expected[0][:, G.gap_mask(sc) == 0] == 0).all()


def test_randoms_are_a_smooth_background_of_the_requested_fraction():
    sc = TOF_TEST
    means = SC.study_means(sc, PT.random_phantom(sc, np.random.default_rng(3)), (0, -1, 1), 2e5,
                          SC.Physics(randoms=0.3))
    r, e = means.randoms, means.expected
    assert r.sum() / e.sum() == pytest.approx(0.3, rel=1e-9) and e.sum() == pytest.approx(2e5)
    np.testing.assert_allclose(r, np.broadcast_to(r[:1], r.shape))  # the same in every TOF bin
    trues = e - r
    outside = (trues.sum(0) == 0) & (G.gap_mask(sc) > 0)  # LORs that miss the body
    assert outside.any() and (r[0][outside] > 0).all()
    # smooth: neighbouring bins differ by far less than the trues do (efficiencies aside)
    eff_free = SC.study_means(sc, PT.random_phantom(sc, np.random.default_rng(3)), (0,), 2e5,
                             SC.Physics(normalisation=False, randoms=0.3))
    rr, tt = eff_free.randoms[:, 0].sum(0), (eff_free.expected - eff_free.randoms)[:, 0].sum(0)
    assert np.abs(np.diff(rr, axis=1)).mean() / rr.mean() < 0.25 * np.abs(np.diff(tt, axis=1)).mean() / tt.mean()


def test_count_levels_set_the_mean_prompts_per_lor_through_the_body():
    ph = PT.random_phantom(DEMO, np.random.default_rng(4))
    means = SC.study_means(DEMO, ph, (0,), "clinical")
    body = SC.expected_counts(DEMO, ph, (0,)).sum(0) > 0
    per_lor = F.COUNT_LEVELS["clinical"] * DEMO.bin_size_mm * DEMO.ring_spacing_mm / F.MMR_LOR_MM2
    assert means.expected.sum(0)[body].mean() == pytest.approx(per_lor)
    assert 10 < per_lor < 30  # the demo's LORs are ~12 times an mMR LOR


def test_lesions_have_their_recorded_contrast_and_test_phantoms_differ():
    for seed in range(5):
        for variant in ("train", "test"):
            ph = PT.random_phantom(DEMO, np.random.default_rng(seed), variant)
            lo, hi = PT.VARIANTS[variant]["contrast"]
            assert 1 <= len(ph.lesions) <= 4
            for les in ph.lesions:
                assert lo <= les["contrast"] <= hi and 0 <= les["z"] <= DEMO.rings * DEMO.ring_spacing_mm
                ell = PT.ellipses_at(ph, ph.z0 + les["z"])
                here = ell[PT._inside(ell, les["x"], les["y"]), 5].sum()
                assert here == pytest.approx(les["contrast"] * les["background"], rel=1e-9)
            arms = (np.abs(ph.organs[:, 0] - ph.body[0]) > ph.body[2] * 1.08).sum()
            assert arms == (2 if variant == "test" else 0)


def test_cli_count_level_test_variant_and_no_truth(tmp_path):
    assert S.run(_args(tmp_path, studies=2, scanner="test", counts="clinical", test_studies=1, randoms=0.1)) == 0
    meta = json.loads((tmp_path / "sim" / "studies.json").read_text())
    assert [s["variant"] for s in meta["studies"]] == ["train", "test"] and meta["counts"] == "clinical"
    assert set(meta["studies"][1]["files"]) == {"target", "expected", "randoms", "mult"}
    args = _args(tmp_path / "b", studies=1, scanner="test")
    args.no_truth = True
    assert S.run(args) == 0
    meta = json.loads((tmp_path / "b" / "sim" / "studies.json").read_text())
    assert set(meta["studies"][0]["files"]) == {"target"}
