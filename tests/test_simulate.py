"""Simulator: exact projections, TOF split, Poisson statistics, determinism, uint16 guard, and
files that hpc.io.sinogram reads back to the simulated arrays."""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest

from hpc import geometry as G
from hpc import simulate as S
from hpc.errors import InputError, OutputError
from hpc.io.sinogram import SinogramReader, read_header

TEST, DEMO = G.get_scanner("test"), G.get_scanner("demo")
TOF_TEST = dataclasses.replace(TEST, name="tof-test", tof_bins=5, tof_fwhm_ps=400.0, tof_bin_ps=300.0)


def test_projection_of_a_disk_is_its_chord_length():
    phi, s = G.lor_coordinates(DEMO)
    r, act = 80.0, 2.5
    got = S.project(DEMO, np.array([[0.0, 0.0, r, r, 0.3, act]]), phi, s)[0]  # (V, X)
    np.testing.assert_allclose(got, act * 2 * np.sqrt(np.maximum(r * r - s * s, 0)), atol=1e-9)


def test_projection_of_a_shifted_ellipse_follows_its_centre():
    """A point-like ellipse at (x0, y0) lands on s = x0 cos(phi) + y0 sin(phi) in every view."""
    phi, s = G.lor_coordinates(DEMO)
    x0, y0 = 60.0, -40.0
    got = S.project(DEMO, np.array([[x0, y0, 12.0, 6.0, 0.7, 1.0]]), phi, s)[0]
    peak = s[np.arange(DEMO.views), got.argmax(axis=1)]
    expected = x0 * np.cos(phi[:, 0]) + y0 * np.sin(phi[:, 0])
    assert np.abs(peak - expected).max() < 1.5 * DEMO.bin_size_mm


def test_tof_split_sums_to_the_non_tof_projection():
    phi, s = G.lor_coordinates(TOF_TEST)
    ell = np.array([[10.0, -5.0, 50.0, 30.0, 0.4, 1.0], [-20.0, 10.0, 10.0, 10.0, 0.0, 4.0]])
    tof = S.project(TOF_TEST, ell, phi, s)  # (5, V, X)
    assert tof.shape == (5, TOF_TEST.views, TOF_TEST.bins) and (tof >= 0).all()
    np.testing.assert_allclose(tof.sum(axis=0), S.project(TEST, ell, phi, s)[0], rtol=1e-9, atol=1e-9)
    assert (tof.max(axis=0) < 0.9 * tof.sum(axis=0) + 1e-12).all()  # really split along the LOR


def test_tof_weights_centre_on_the_emission_point():
    w = S.tof_weights(TOF_TEST, np.array([-0.01, 44.96]), np.array([0.01, 44.98]))  # (T, 2) tiny segments
    np.testing.assert_allclose(w.sum(axis=0), 1.0)
    assert w[:, 0].argmax() == 2 and w[:, 1].argmax() == 3  # 300 ps bins are 45 mm long


def test_phantoms_differ_and_vary_smoothly_along_the_axis():
    a = S.expected_counts(DEMO, S.random_phantom(DEMO, np.random.default_rng(1)), (0,))[0]  # (P, V, X)
    b = S.expected_counts(DEMO, S.random_phantom(DEMO, np.random.default_rng(2)), (0,))[0]
    assert np.corrcoef(a[0].ravel(), b[0].ravel())[0, 1] < 0.99  # another patient
    step = np.abs(np.diff(a, axis=0)).mean(axis=(1, 2)) / a.mean()
    assert (step > 1e-3).all() and (step < 0.5).all()  # every plane differs, but smoothly


def test_poisson_and_binomial_thinning_statistics():
    seed, counts, dose = 11, 4e5, 0.3
    st = S.simulate_study(TEST, "p", seed, counts, (0,), low_dose=dose)
    rng = np.random.default_rng(seed)  # the study's phantom is the first draw of its generator
    mean = S.expected_counts(TEST, S.random_phantom(TEST, rng), (0,))
    mean *= counts / mean.sum()
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
        assert spec.fields["originating system"] == "demo" and G.get_scanner(spec.fields["originating system"])
        assert spec.slice_shape == (DEMO.views, DEMO.bins) and spec.dtype == np.dtype("<u2")
        np.testing.assert_array_equal(_read(out / rec["files"]["target"]), st.full[0])
        np.testing.assert_array_equal(_read(out / rec["files"]["input"]), st.low[0])
        np.testing.assert_array_equal(_read(out / rec["files"]["gaps"]), st.full[0] * st.mask)
        np.testing.assert_array_equal(_read(out / rec["files"]["mask"]), st.mask)
        np.testing.assert_array_equal(st.mask, G.dead_block_mask(DEMO, st.dead))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OutputError, match="already holds a simulation"):
        S.run(args)


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
    np.testing.assert_array_equal(mask, np.tile(G.dead_block_mask(TOF_TEST, st.dead, (0, -1, 1)), (5, 1, 1)))


@pytest.mark.parametrize("kw, message", [
    ({"max_ring_diff": 1}, "--max-ring-diff > 0 needs --format stir"),
    ({"dead_blocks": 33}, r"--dead-blocks must be in \[0, 32\] on demo"),
    ({"low_dose": 1.5}, r"--low-dose must be in \(0, 1\)"),
    ({"scanner": "petra"}, "--scanner: unknown scanner 'petra'; valid: test, demo, mmr, mct"),
])
def test_cli_rejects_bad_arguments(tmp_path, kw, message):
    with pytest.raises(InputError, match=message):
        S.run(_args(tmp_path, **kw))
    assert not (tmp_path / "sim").exists()
