"""Simulated studies in compressed layouts (span, view mashing, TOF mashing, a plane cut), dead
blocks in compressed data (binomial thinning by the surviving fraction), and how the loader and
`hpc predict` treat partly measured bins and virtual crystals."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hpc.data import build_loader
from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.repair.inference import Counts, compose
from hpc.simulate import counts as SC
from hpc.simulate import layout as SL
from hpc.simulate import phantom as PT
from hpc.simulate import simulate as S

from helpers import loader_cfg, make_dataset

SMALL = G.Scanner("small", "hpc small", rings=8, detectors_per_ring=48, block_trans=4, block_axial=4, bins=24,
                  inner_radius_mm=150.0, doi_mm=5.0, bin_size_mm=9.7, ring_spacing_mm=6.0, virtual_trans=1,
                  virtual_axial=1, tof_bins=6, tof_bin_ps=200.0, tof_fwhm_ps=400.0)
PHYS = SC.Physics(attenuation=True, normalisation=True, randoms=0.0)


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setitem(G.SCANNERS, "small", SMALL)
    return SMALL


def test_compressed_planes_are_sums_of_their_ring_pairs(small):
    """A span-3, view-mashed, TOF-mashed plane = the sum over its ring pairs (study_means of each
    pair as a span-1 plane) and its uncompressed views, TOF bins summed in pairs."""
    lay = P.cti_layout(small, span=3, max_ring_diff=4, view_mashing=2, tof_mashing=2)
    ph = PT.random_phantom(small, np.random.default_rng(1))
    got = SL.layout_means(lay, ph, 1e6, PHYS).expected  # (3, P, 12, 24)
    plane, ra, rb = lay.ring_pairs
    per_pair = SC.study_means(small, ph, (), None, PHYS, pairs=(ra, rb)).expected  # (6, M, 24, 24)
    want = np.zeros((3, lay.planes, 12, 24))
    for p, m in zip(plane, per_pair.transpose(1, 0, 2, 3), strict=True):
        want[:, p] += m.reshape(3, 2, 12, 2, 24).sum((1, 3))
    np.testing.assert_allclose(got / got.sum(), want / want.sum(), rtol=2e-4, atol=1e-9)
    assert got.sum() == pytest.approx(1e6, rel=1e-5)
    assert (got[:, :, ~lay.valid_bins] == 0).all()  # virtual crystals record nothing
    assert (got[:, ~lay.valid_planes] == 0).all() and (~lay.valid_planes).any()  # nor do virtual rings


def test_plane_cut_and_dead_blocks_thin_by_the_surviving_fraction():
    sc = dataclasses.replace(SMALL, virtual_axial=0)  # no virtual ring between axial blocks: partial bins
    lay = P.cti_layout(sc, span=3, max_ring_diff=4, view_mashing=2)
    st = S.simulate_study(sc, "s", 7, 4e6, (), dead_blocks=3, layout=lay, planes=5,
                          phys=dataclasses.replace(PHYS, attenuation=False))
    assert st.full[:, 5:].sum() == 0 and st.full[:, :5].sum() > 0  # only the first 5 planes have counts
    frac = P.dead_fractions(lay, st.dead)
    assert np.array_equal(st.mask, frac.astype(st.mask.dtype)) and ((frac > 0) & (frac < 1)).any()
    full, gaps = st.full[0].astype(float), st.gaps[0].astype(float)
    assert (gaps[frac == 0] == 0).all() and np.array_equal(gaps[frac == 1], full[frac == 1])
    part = (frac > 0) & (frac < 1) & (full > 0)
    if part.sum() > 30:  # the thinned counts keep the fraction on average (binomial thinning)
        assert gaps[part].sum() / (frac[part] * full[part]).sum() == pytest.approx(1.0, abs=0.15)


def test_tof_storage_order():
    x = np.arange(5)[:, None] * np.ones((5, 2))
    assert SL.storage_tof(x, "siemens")[:, 0].tolist() == [2, 3, 1, 4, 0]  # timing positions 0, +1, -1, +2, -2
    assert SL.storage_tof(x, "stir")[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_predict_composition_of_partial_bins():
    src = np.array([[10, 4, 0, 7, 3]], np.uint16)
    pred = np.array([[50.0, 12.0, 9.0, 20.0, 8.0]])
    m = np.array([[1.0, 0.5, 0.0, 0.25, 1.0]], np.float32)
    v = np.array([[True, True, True, True, False]])
    counts = Counts()
    out = compose(src, pred, m, v, np.dtype(np.uint16), counts)
    # measured kept; partial: c + (1 - m) pred = 4 + 6, 7 + 15; gap: pred; no LOR: 0
    assert out.tolist() == [[10, 10, 9, 22, 0]] and counts.replaced == 3


def test_loader_corrupts_compressed_data_with_fractions_and_marks_virtual_lors(tmp_path, monkeypatch):
    sc = dataclasses.replace(SMALL, name="small2", stir_name="hpc small2", virtual_axial=0)  # partial bins exist
    monkeypatch.setitem(G.SCANNERS, sc.name, sc)
    lay = P.cti_layout(sc, span=3, max_ring_diff=4, view_mashing=2)
    root = make_dataset(tmp_path / "d", studies=1, segments=lay.segments, axial=lay.axial_counts,
                        views=lay.views, bins=lay.bins, counts=True, scanner="hpc small2", shard_slices=64)
    cfg = loader_cfg(root, context=0)
    cfg.corrupt.dead_blocks = 3
    seen = 0
    for batch in build_loader(cfg, "train", 0, 1, torch.device("cpu")):
        m, v, x, t = batch.mask[:, 0], batch.valid[:, 0], batch.input[:, 0], batch.target[:, 0]
        planes = batch.index.numpy() % lay.planes
        assert torch.equal(v, torch.from_numpy(lay.valid(planes)).float())
        assert (x[v == 0] == 0).all()  # no counts where there is no line of response
        ok = v > 0
        assert torch.equal(x[ok & (m >= 1)], t[ok & (m >= 1)]) and (x[ok & (m == 0)] == 0).all()
        part = ok & (m > 0) & (m < 1)
        assert (x[part] <= t[part]).all()  # binomially thinned
        seen += int(part.sum())
    assert seen > 0
