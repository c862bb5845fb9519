"""Siemens component normalisation: write -> read round trip (hpc.io.normfile), the expansion
(hpc.physics.norm) against a bin-by-bin evaluation of the components for every span / mashing
tested, zeros through virtual crystals only, one-line refusals. The real mMR norm's checks are
bench/listmode_real.py (SIRF's file is not in the repository)."""
from __future__ import annotations

import numpy as np
import pytest

from hpc.errors import InputError
from hpc.io import normfile as NF
from hpc.physics import geometry as G
from hpc.physics import norm as N
from hpc.physics import projdata as P


def components(sc, rng, span=3, mrd=7) -> N.NormComponents:
    lay = P.cti_layout(sc, span, mrd)
    return N.NormComponents(sc, rng.uniform(0.5, 2, (2 * sc.rings - 1, sc.bins)),
                            rng.uniform(0.6, 1.3, (sc.bins, sc.block_trans)),
                            rng.uniform(0.8, 1.2, (sc.rings, sc.detectors_per_ring)),
                            rng.uniform(0.9, 1.3, lay.planes), lay,
                            {"paralyzing ring dt parameters": rng.normal(0, 1e-6, sc.rings),
                             "additional axial effects": rng.uniform(0.99, 1.01, lay.planes)})


def direct(comp: N.NormComponents, layout, plane: int, view: int, b: int, shift: int) -> float:
    """One bin, straight from the formula: mashed views x ring pairs with a + b fixed by the plane."""
    sc = comp.scanner
    seg, ax = layout.plane_segment_axial()
    k = layout.segments.index(seg[plane])
    lo, hi = layout.min_rd[k], layout.max_rd[k]
    pl, ra, rb = layout.ring_pairs
    total = int(ra[pl == plane][0] + rb[pl == plane][0])
    eff = np.roll(comp.crystal, shift, axis=1)
    npl, nra, nrb = comp.norm_layout.ring_pairs
    out = 0.0
    for u in range(view * layout.view_mashing, (view + 1) * layout.view_mashing):
        ca, cb = (int(x) for x in G.sino_to_lor(sc, u, b))
        lor = 0.0
        for d in range(lo, hi + 1):
            a, bb = (total - d) // 2, (total + d) // 2
            if (total + d) % 2 or not (0 <= a < sc.rings and 0 <= bb < sc.rings):
                continue
            if G.virtual_crystal(sc, ca) or G.virtual_crystal(sc, cb):
                continue  # efficiency 0
            hit = np.flatnonzero((nra == a) & (nrb == bb))
            axial = comp.axial[npl[hit[0]]] if hit.size else 1.0
            lor += eff[a, ca] * eff[bb, cb] * comp.geometric[a + bb, b] / axial
        out += lor * comp.interference[b, u % sc.block_trans]
    return out


def test_write_read_round_trip(tmp_path, sc, rng):
    comp = components(sc, rng)
    back = NF.read_norm(NF.write_norm(tmp_path / "scan", comp), scanner=sc)
    for name in ("geometric", "interference", "crystal", "axial"):
        np.testing.assert_allclose(getattr(back, name), getattr(comp, name).astype(np.float32))
    assert set(back.extra) == set(comp.extra) and back.norm_layout.planes == comp.norm_layout.planes


@pytest.mark.parametrize("span,mash,shift", [(1, 1, 0), (3, 1, 1), (5, 2, 1)])
def test_expansion_matches_the_components_bin_by_bin(tmp_path, sc, rng, span, mash, shift):
    comp = NF.read_norm(NF.write_norm(tmp_path / "scan", components(sc, rng)), scanner=sc)
    lay = P.cti_layout(sc, span, 7, view_mashing=mash)
    eff = N.bin_efficiencies(comp, lay, shift=shift)
    picks = zip(rng.integers(0, lay.planes, 60), rng.integers(0, lay.views, 60), rng.integers(0, 48, 60), strict=True)
    for plane, view, b in picks:
        assert eff[plane, view, b] == pytest.approx(direct(comp, lay, plane, view, b, shift), rel=1e-5, abs=1e-6)


def test_zero_through_virtual_crystals_only(sc, rng):
    comp = components(sc, rng)
    lay = P.cti_layout(sc, 3, 7)
    eff = N.bin_efficiencies(comp, lay)
    valid = G.transaxial_valid(sc)
    assert (eff[:, ~valid] == 0).all() and (eff[:, valid] > 0).all()
    assert (N.bin_efficiencies(comp, lay, use=("geometric",))[:, ~valid] > 0).all()  # gaps come from crystals


def test_mmr_crystal_shift_default():
    sc = G.get_scanner("mmr")
    stored = np.arange(64 * 504, dtype=float).reshape(64, 504) + 1
    comp = N.NormComponents(sc, np.ones((127, 344)), np.ones((344, 9)), stored, np.ones(837), P.cti_layout(sc))
    eff = N.crystal_efficiencies(comp, gaps=False)
    assert eff[0, 1] == stored[0, 0] and eff[0, 0] == stored[0, 503]  # crystal c takes stored c - 1
    assert (N.crystal_efficiencies(comp)[:, ::9] == 0).all()


def test_truncated_and_wrong_sizes(tmp_path, sc, rng):
    header = NF.write_norm(tmp_path / "scan", components(sc, rng))
    data = tmp_path / "scan.n"
    data.write_bytes(data.read_bytes()[:-4])
    with pytest.raises(InputError, match="truncated"):
        NF.read_norm(header, scanner=sc)
    header = NF.write_norm(tmp_path / "b", components(sc, rng))
    header.write_text(header.read_text().replace("{48,15}", "{47,15}").replace(":= 0\n", ":= 0\n"))
    with pytest.raises(InputError):
        NF.read_norm(header, scanner=sc)
