"""Randoms from delayeds (hpc.physics.randoms): ML singles from fan sums, exact without noise, far
less noisy than the delayeds with it, wired to the list-mode reader's fan sums. The real mMR
delayeds' checks are bench/listmode_real.py."""
from __future__ import annotations

import numpy as np
import pytest

from hpc.io import listmode as L
from hpc.io.lmhistogram import histogram
from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.physics import randoms as R
from hpc.simulate import listmode as S


def singles(sc, rng):
    s = rng.uniform(0.5, 1.5, (sc.rings, sc.detectors_per_ring)) * 0.6
    s[:, G.virtual_crystal(sc, np.arange(sc.detectors_per_ring))] = 0
    return s


def test_noise_free_recovery(sc, rng):
    lay = P.cti_layout(sc, 1, 6)
    s = singles(sc, rng)
    truth = R.randoms(s, lay)
    est, it = R.ml_singles(R.delayed_fan_sums(truth, lay), lay, iterations=500, tol=1e-11)
    assert it < 500
    np.testing.assert_allclose(est, s, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(R.randoms(est, lay), truth, rtol=1e-5, atol=1e-7)


def test_poisson_delayeds(sc, rng):
    lay = P.cti_layout(sc, 1, 7)
    truth = R.randoms(singles(sc, rng), lay)
    d = rng.poisson(truth)
    est = R.randoms(R.ml_singles(R.delayed_fan_sums(d, lay), lay)[0], lay)
    assert est.sum() == pytest.approx(d.sum(), rel=1e-4)  # ML keeps the total
    rmse = lambda x: np.sqrt(((x - truth)[truth > 0] ** 2).mean())  # noqa: E731
    assert rmse(est) < rmse(d) / 5


def test_compressed_layout_sums_span1(sc, rng):
    s = singles(sc, rng)
    src, dst = P.cti_layout(sc, 1, 7), P.cti_layout(sc, 3, 7, view_mashing=2)
    one, comp = R.randoms(s, src), R.randoms(s, dst)
    plane, ra, rb = dst.ring_pairs
    want = np.zeros((dst.planes, sc.views, sc.bins))
    np.add.at(want, plane, one[src.plane_of(rb - ra, np.minimum(ra, rb))])
    np.testing.assert_allclose(comp, want.reshape(dst.planes, dst.views, 2, -1).sum(2), rtol=1e-5)


def test_from_list_mode_fan_sums(tmp_path, sc, rng):
    lay = P.cti_layout(sc, 1, 7)
    d = rng.poisson(R.randoms(singles(sc, rng), lay))
    header = S.write_listmode(tmp_path / "r", lay, [(0, 100, np.zeros_like(d), d)], rng)
    (h,) = histogram(L.read_header(header, scanner=sc), fansums=True)
    np.testing.assert_array_equal(h.fansums, R.delayed_fan_sums(d, lay))
    est, _ = R.ml_singles(h.fansums, lay)
    assert R.randoms(est, P.cti_layout(sc, 3, 7)).sum() == pytest.approx(d.sum(), rel=1e-4)
