"""The realistic simulation engine (issue 22): exact 3-D lines against numerical integration, the
span convention, detector blur, scatter fraction, estimated factors with their stated errors,
count level, and a slab that the rest of the pipeline reads back with its own ring count."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from hpc.cli import main
from hpc.evaluate.studies import simulation_studies
from hpc.io.shards import Dataset
from hpc.physics import blur as B
from hpc.physics import factors as F
from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.simulate import counts as SC
from hpc.simulate import estimates as E
from hpc.simulate import lines3d as L3
from hpc.simulate import realistic as R
from hpc.simulate.phantom import ellipses_at, random_phantom

DEMO = G.get_scanner("demo")
TOF_DEMO = dataclasses.replace(DEMO, name="tof-demo", tof_bins=5, tof_fwhm_ps=400.0, tof_bin_ps=300.0)
MMR = G.get_scanner("mmr")


def _phantom(sc: G.Scanner, seed: int = 3):
    return random_phantom(sc, np.random.default_rng(seed))


@pytest.mark.parametrize("rd", range(8))
def test_3d_lines_match_numerical_integration_for_every_ring_difference(rd):
    """Activity, mu and attenuated activity along lines from ring 0 to ring rd (and back), at
    sub-positions across the rings' widths, within 1 % of a fine midpoint rule (point tests only)."""
    sc, ph = DEMO, _phantom(DEMO)
    lines = L3.Lines(sc, ph)
    e1, e2 = G.lor_endpoints(sc)
    rng = np.random.default_rng(rd)
    v, x = rng.integers(0, sc.views, 40), rng.integers(0, sc.bins, 40)
    off = L3.sub_offsets(sc, 2)
    for ra, rb in ((0, rd), (rd, 0)):
        for ua, ub in ((off[0], off[1]), (off[1], off[0])):
            za, zb = float(L3.ring_z(sc, ph, ra)) + ua, float(L3.ring_z(sc, ph, rb)) + ub
            act, mu = lines.integrals(za, zb)
            p1 = np.c_[e1[v, x], np.full(v.size, za)]
            p2 = np.c_[e2[v, x], np.full(v.size, zb)]
            n_act, n_mu = L3.numeric_integrals(ph, p1, p2, steps=20000)
            ok = n_act > 0.05 * n_act.max()
            assert ok.sum() > 10
            np.testing.assert_allclose(act[v, x][ok], n_act[ok], rtol=0.01)
            np.testing.assert_allclose(mu[v, x][ok], n_mu[ok], rtol=0.01)
            np.testing.assert_allclose((act * np.exp(-mu))[v, x][ok], (n_act * np.exp(-n_mu))[ok], rtol=0.01)


def test_every_plane_of_a_span_layout_matches_numerical_integration():
    """Each plane of a span-3 layout of a 4-ring slab (ring differences 0..3): the engine's sum over
    its ring pairs of the mean over sub-lines of A exp(-mu), against the same sum by a midpoint rule."""
    sc = G.slab(DEMO, 4)
    ph = _phantom(sc, 6)
    layout = P.cti_layout(sc, 3, 3)
    eff = np.ones((sc.rings, sc.detectors_per_ring))
    pt = R.parts(layout, ph, dataclasses.replace(R.NONE, lines3d=True, sub=2), eff, eff)
    plane, ra, rb = layout.ring_pairs
    e1, e2 = G.lor_endpoints(sc)
    rng = np.random.default_rng(0)
    v, x = rng.integers(0, sc.views, 20), rng.integers(0, sc.bins, 20)
    off = L3.sub_offsets(sc, 2)
    for p in range(layout.planes):
        want = np.zeros(v.size)
        for a, b in zip(ra[plane == p], rb[plane == p], strict=True):
            for ua in off:
                for ub in off:
                    za, zb = float(L3.ring_z(sc, ph, a)) + ua, float(L3.ring_z(sc, ph, b)) + ub
                    act, mu = L3.numeric_integrals(ph, np.c_[e1[v, x], np.full(v.size, za)],
                                                   np.c_[e2[v, x], np.full(v.size, zb)], steps=4000)
                    want += act * np.exp(-mu) / off.size ** 2
        ok = want > 0.05 * want.max()
        np.testing.assert_allclose(pt.trues[0, p][v, x][ok], want[ok], rtol=0.01)
    assert sorted(set(np.abs(rb - ra))) == [0, 1, 2, 3]


def test_3d_tof_lines_follow_the_2d_simulators_convention_and_numerical_integration():
    """A direct plane's 3-D TOF split is the 2-D simulator's (hpc.simulate.counts.project) to rounding;
    an oblique line's matches a midpoint rule weighting each point by its TOF bin probability."""
    from scipy.special import ndtr

    sc, ph = TOF_DEMO, _phantom(TOF_DEMO)
    lines = L3.Lines(sc, ph)
    z = float(L3.ring_z(sc, ph, 3))
    act, _ = lines.tof_integrals(z, z, sc)
    phi, s = G.lor_coordinates(sc)
    np.testing.assert_allclose(act, SC.project(sc, ellipses_at(ph, z), phi, s), atol=1e-9 * act.max())
    za, zb = float(L3.ring_z(sc, ph, 0)), float(L3.ring_z(sc, ph, 7))
    act, mu = lines.tof_integrals(za, zb, sc)
    np.testing.assert_allclose(act.sum(0), lines.integrals(za, zb)[0], rtol=1e-10, atol=1e-9)
    e1, e2 = G.lor_endpoints(sc)
    rng = np.random.default_rng(1)
    t = (np.arange(20000) + 0.5) / 20000
    sigma, edges = G.tof_kernel(sc)
    checked = 0
    for vi, xi in zip(rng.integers(0, sc.views, 30), rng.integers(0, sc.bins, 30), strict=True):
        p1, p2 = np.r_[e1[vi, xi], za], np.r_[e2[vi, xi], zb]
        length = np.linalg.norm(p2 - p1)
        dens = L3.point_values(ph, p1[None, :] + t[:, None] * (p2 - p1)[None, :])[0]  # (S,)
        pos = lines.tof_sign[vi, xi] * (t - 0.5) * length  # along d, from the midpoint
        prob = np.diff(ndtr((edges[:, None] - pos[None, :]) / sigma), axis=0)  # (T, S) each point's TOF bins
        want = (prob * dens).sum(1) * length / t.size
        if want.sum() < 0.05 * act.sum(0).max():
            continue
        checked += 1
        np.testing.assert_allclose(act[:, vi, xi], want, rtol=0.01, atol=0.002 * want.sum())
    assert checked > 10


def test_a_compressed_plane_sums_its_ring_pairs_lines():
    """Span 3 on the demo's 8 rings: every plane of every segment is the sum over its ring pairs of
    the mean over sub-lines (the convention of hpc.simulate.layout and projdata.Layout.ring_pairs)."""
    sc, ph = G.slab(DEMO, 8), _phantom(DEMO)
    layout = P.cti_layout(sc, 3, 7)
    preset = dataclasses.replace(R.NONE, lines3d=True, sub=2)
    eff = np.ones((sc.rings, sc.detectors_per_ring))
    pt = R.parts(layout, ph, preset, eff, eff)
    plane, ra, rb = layout.ring_pairs
    lines = L3.Lines(sc, ph)
    for p in range(layout.planes):
        sel = plane == p
        att, _ = L3.pair_attenuated(sc, ph, ra[sel], rb[sel], 2, lines=lines)
        np.testing.assert_allclose(pt.trues[0, p], att.sum(0), rtol=1e-12)
    assert set(np.abs(rb - ra)) == set(range(8))


def test_the_engine_blurs_the_attenuated_projection_with_the_scanners_kernel():
    sc, ph = G.slab(MMR, 1), _phantom(MMR)
    layout = P.cti_layout(sc, 1, 0)
    eff = np.ones((sc.rings, sc.detectors_per_ring))
    sharp = R.parts(layout, ph, R.NONE, eff, eff)
    blurred = R.parts(layout, ph, dataclasses.replace(R.NONE, blur_fwhm_mm=B.FWHM0_MM), eff, eff)
    k = B.blur_matrix(sc)
    np.testing.assert_allclose(blurred.smooth, sharp.smooth @ k.T, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(B.fwhm_mm(np.array([0.0, 100.0, 200.0])), [4.3, 4.76, 5.93], atol=0.01)
    assert blurred.smooth.sum() == pytest.approx(sharp.smooth.sum(), rel=1e-3)  # the outer bins keep the tails


@pytest.fixture(scope="module")
def demo_study():
    sc = G.slab(DEMO, 4)
    layout = P.cti_layout(sc, 1, 3)
    out: dict = {}
    means, info = R.realistic_means(layout, _phantom(sc, 5), R.REALISTIC, np.random.default_rng(2), out)
    return layout, means, info, out


def test_scatter_randoms_and_count_level_are_what_was_asked(demo_study):
    _, means, info, t = demo_study
    body = t["body"]
    prompts = means.expected[0][body].sum(dtype=np.float64)
    assert t["scatter"][body].sum() / prompts == pytest.approx(0.35, rel=1e-6)
    assert t["randoms"][body].sum() / prompts == pytest.approx(0.25, rel=1e-6)
    assert means.expected[0][body].mean(dtype=np.float64) == pytest.approx(R.REALISTIC.counts_per_bin, rel=1e-5)
    np.testing.assert_allclose(means.expected[0], t["trues"] + t["scatter"] + t["randoms"], rtol=1e-5)
    assert info["scatter_fraction"] == pytest.approx(0.35, rel=1e-6)
    # scatter is smooth and reaches past the body, but only real crystals
    assert (t["scatter"][~body & (t["lors"] > 0)] > 0).any()
    assert (t["scatter"][t["lors"] == 0] == 0).all()


def test_the_files_hold_the_estimates_with_their_stated_errors(demo_study):
    _, means, info, t = demo_study
    body = t["body"]
    assert t["scatter_hat"][body].sum() / t["scatter"][body].sum() == pytest.approx(0.85, rel=1e-9)
    np.testing.assert_allclose(means.randoms[0], t["randoms_hat"] + t["scatter_hat"], rtol=1e-5)
    ratio = t["randoms_hat"][body].sum() / t["randoms"][body].sum()
    assert ratio == pytest.approx(1.0, abs=0.02)  # unbiased: ML singles of Poisson delayeds
    assert 0.0 < info["randoms_error_rms"] < 0.15
    real = t["eff"] > 0
    assert np.std(np.log(t["eff_hat"][real] / t["eff"][real])) == pytest.approx(0.02, rel=0.3)  # 4 x 128 crystals


def test_estimated_efficiencies_have_the_stated_error():
    eff = F.crystal_efficiencies(MMR)
    hat = E.efficiencies(eff, 0.02, np.random.default_rng(0))
    real = eff > 0
    assert np.std(np.log(hat[real] / eff[real])) == pytest.approx(0.02, rel=0.03)
    assert (hat[~real] == 0).all()


def test_estimated_mu_map_has_no_bone_and_is_shifted_by_the_stated_mm():
    sc = G.slab(MMR, 1)
    ph = _phantom(sc)
    bone = F.MU["bone"] - F.MU["soft tissue"]
    assert np.isclose(ph.organs[:, 8], bone).any()  # the spine
    hat = E.mu_phantom(ph, 3.0)
    assert not np.isclose(hat.organs[:, 8], bone).any()
    no_bone = E.mu_phantom(ph, 0.0)
    z = float(L3.ring_z(sc, ph, 0))
    g = np.arange(-300, 300, 0.5)  # a 0.5 mm raster of the mu-maps' slice through ring 0
    pts = np.stack([*np.meshgrid(g, g, indexing="ij"), np.full((g.size, g.size), z)], axis=-1)
    centroid = []
    for p in (no_bone, hat):
        mu = L3.point_values(p, pts)[1]  # (x, y)
        centroid.append(float((mu.sum(1) * g).sum() / mu.sum()))
    assert centroid[1] - centroid[0] == pytest.approx(3.0, abs=0.02)
    # and the estimated attenuation factors move with it: the view whose normal is x, s = x
    lines, lines_hat = L3.Lines(sc, no_bone), L3.Lines(sc, hat)
    even = np.arange(0, sc.bins, 2)  # view 0's even bins sit at phi = 0 exactly
    s = G.lor_coordinates(sc)[1][0, even]
    p0, p1 = lines.integrals(z, z)[1][0, even], lines_hat.integrals(z, z)[1][0, even]
    assert np.trapezoid(s * p1, s) / np.trapezoid(p1, s) - np.trapezoid(s * p0, s) / np.trapezoid(p0, s) == \
        pytest.approx(3.0, abs=0.3)  # 4 mm samples of kinked profiles: a coarse measure


def test_slab_round_trip_through_simulate_convert_and_evaluate(tmp_path):
    out = tmp_path / "sim"
    assert main(["simulate", "-o", str(out), "--studies", "1", "--scanner", "demo", "--preset", "realistic",
                 "--rings", "4", "--dead-blocks", "1", "--seed", "4"]) == 0
    meta = json.loads((out / "studies.json").read_text())
    assert meta["scanner"] == "demo-slab4" and meta["realistic"]["rings"] == 4
    assert meta["realistic"]["scatter"] == 0.35 and meta["realistic"]["blur_fwhm_mm_at_0_100_200"][0] == 4.3
    rec = meta["studies"][0]["realistic"]
    assert rec["scatter_fraction"] == pytest.approx(0.35) and rec["scatter_estimate_ratio"] == pytest.approx(0.85)
    (st,) = simulation_studies(out)
    assert st.layout.layout().scanner.rings == 4
    readers = st.open()
    assert {"expected", "randoms", "mult"} <= set(readers)
    ds = tmp_path / "ds"
    files = meta["studies"][0]["files"]
    assert main(["convert", str(out / files["target"]), "--mask", str(out / files["mask"]), "-o", str(ds)]) == 0
    d = Dataset.open(ds)
    assert G.get_scanner(d.studies[0].scanner).rings == d.studies[0].layout().scanner.rings == 4
    fixed = tmp_path / "fixed.s.hdr"  # a geometry-aware method reads the slab's factor files
    assert main(["predict", "--method", "axial3d", str(out / files["gaps"]), "--mask", str(out / files["mask"]),
                 "--mult", str(out / files["mult"]), "--randoms", str(out / files["randoms"]), "-o", str(fixed),
                 "--quiet"]) == 0
    assert fixed.exists()


def test_slab_names_resolve_and_bad_values_are_refused():
    assert G.get_scanner("Siemens mMR slab 8") == G.slab(MMR, 8) == G.get_scanner("mmr-slab8")
    assert G.slab(MMR, 64) is MMR
    assert (G.slab(MMR, 8).span, G.slab(MMR, 8).max_ring_diff) == (11, 7)
    assert G.slab(MMR, 2).span == 3  # span 11 needs 6 rings: the slab takes the largest its rings allow
    assert P.default_layout(G.slab(MMR, 2)).planes == 3
    with pytest.raises(ValueError, match="1..64"):
        G.slab(MMR, 65)
    with pytest.raises(ValueError, match="sum < 1"):
        R.check(dataclasses.replace(R.REALISTIC, scatter=0.8))


def test_tof_engine_splits_the_truth_and_keeps_the_fractions():
    """TOF layouts: (T, P, V, X) expected prompts whose TOF sum obeys the fractions and count level;
    the additive estimate spreads randoms evenly and scatter as each TOF bin's smoothed trues."""
    sc = G.slab(TOF_DEMO, 2)
    layout = P.cti_layout(sc, 1, 1, 1, 1)
    t: dict = {}
    means, info = R.realistic_means(layout, _phantom(sc, 7), R.REALISTIC, np.random.default_rng(3), t)
    assert means.expected.shape == means.randoms.shape == (5, layout.planes, sc.views, sc.bins)
    body = t["body"]
    np.testing.assert_allclose(means.expected.sum(0), t["expected"], rtol=1e-5)
    assert t["scatter"][body].sum() / t["expected"][body].sum() == pytest.approx(0.35, rel=1e-6)
    assert t["expected"][body].mean() == pytest.approx(R.REALISTIC.counts_per_bin, rel=1e-5)
    np.testing.assert_allclose(means.randoms.sum(0), t["randoms_hat"] + t["scatter_hat"], rtol=1e-5)
    profile = means.expected.sum(axis=(1, 2, 3), dtype=np.float64)
    assert profile.std() > 0.05 * profile.mean()  # not the randoms' flat split: the trues' TOF profile
    assert info["scatter_estimate_ratio"] == pytest.approx(0.85)


def test_2d_engine_with_tof_uses_non_tof_attenuation_for_the_estimate():
    """--lines 2d on a TOF layout: with exact factors (R.NONE) the mult estimate is the truth's."""
    sc = G.slab(TOF_DEMO, 2)
    layout = P.cti_layout(sc, 1, 1, 1, 1)
    means, _ = R.realistic_means(layout, _phantom(sc, 8), R.NONE, np.random.default_rng(0))
    ph = _phantom(sc, 8)
    _, ra, rb = layout.ring_pairs
    flat = dataclasses.replace(sc, tof_bins=1, tof_mashing=1)
    acf = np.exp(-SC.plane_integrals(flat, ph, ra, rb, SC.mu_at)[0])
    want = F.lor_product(sc, F.crystal_efficiencies(sc), ra, rb) * acf
    np.testing.assert_allclose(means.mult, want, rtol=1e-5, atol=1e-7)
