"""Scanner geometry: LOR <-> sinogram mapping against plane geometry, planes, dead-block masks
against a brute-force enumeration of every crystal pair."""
from __future__ import annotations

import math

import numpy as np
import pytest

from hpc import geometry as G

TEST = G.get_scanner("test")


def _grid(sc: G.Scanner) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(sc.views), np.arange(sc.bins), indexing="ij")


@pytest.mark.parametrize("name", list(G.SCANNERS))
def test_sino_lor_round_trip(name):
    sc = G.SCANNERS[name]
    view, bin = _grid(sc)
    ca, cb = G.sino_to_lor(sc, view, bin)
    assert (ca != cb).all()
    v2, b2 = G.lor_to_sino(sc, ca, cb)
    assert np.array_equal(v2, view) and np.array_equal(b2, bin)
    v3, b3 = G.lor_to_sino(sc, cb, ca)  # an LOR has no direction
    assert np.array_equal(v3, view) and np.array_equal(b3, bin)


def test_every_crystal_pair_in_the_fov_has_exactly_one_bin():
    n = TEST.detectors_per_ring
    ca, cb = np.triu_indices(n, k=1)
    view, bin = G.lor_to_sino(TEST, ca, cb)
    inside = (bin >= 0) & (bin < TEST.bins)
    cells = view[inside] * TEST.bins + bin[inside]
    assert np.array_equal(np.sort(cells), np.arange(TEST.views * TEST.bins))  # a bijection
    a2, b2 = G.sino_to_lor(TEST, view[inside], bin[inside])
    assert np.array_equal(np.minimum(a2, b2), ca[inside]) and np.array_equal(np.maximum(a2, b2), cb[inside])


def test_lor_coordinates_match_the_chord_between_the_crystals():
    sc = G.get_scanner("demo")
    phi, s = G.lor_coordinates(sc)
    ca, cb = G.sino_to_lor(sc, *_grid(sc))
    ang = 2 * np.pi / sc.detectors_per_ring
    pa = sc.radius_mm * np.stack([np.cos(ca * ang), np.sin(ca * ang)])  # (2, V, X) crystal positions
    pb = sc.radius_mm * np.stack([np.cos(cb * ang), np.sin(cb * ang)])
    normal = np.stack([np.cos(phi), np.sin(phi)])
    # both crystals lie on the line {p : p . n = s}
    np.testing.assert_allclose((pa * normal).sum(0), s, atol=1e-9)
    np.testing.assert_allclose((pb * normal).sum(0), s, atol=1e-9)
    # views step by 180 / views degrees, bins by about bin_size at the centre
    assert np.all((phi >= 0) & (phi < np.pi))
    np.testing.assert_array_equal(np.floor(phi[:, 0] / (np.pi / sc.views) + 1e-9), np.arange(sc.views))
    assert abs(np.diff(s[0])[sc.bins // 2] - sc.bin_size_mm) < 0.05 * sc.bin_size_mm


def test_mmr_bin_size_matches_stir():
    sc = G.get_scanner("Siemens mMR")
    assert sc is G.SCANNERS["mmr"]
    assert math.isclose(math.pi * sc.radius_mm / sc.detectors_per_ring, sc.bin_size_mm, rel_tol=2e-3)


def test_get_scanner_aliases_and_errors():
    assert G.get_scanner("MCT") is G.get_scanner("biograph mct") is G.SCANNERS["mct"]
    with pytest.raises(ValueError, match="unknown scanner 'nope'; valid: test, demo, mmr, mct"):
        G.get_scanner("nope")
    with pytest.raises(ValueError, match="views 10 must be detectors_per_ring / 2"):
        G.Scanner("bad", 2, 24, 4, 2, 10, 12, 100.0, 13.0, 4.0)


def test_planes_round_trip_in_storage_order():
    segs = G.segment_sequence(3)
    assert segs == (0, -1, 1, -2, 2, -3, 3)
    assert G.axial_counts(TEST, segs) == (4, 3, 3, 2, 2, 1, 1)
    ra, rb = G.plane_list(TEST, segs)
    assert len(set(zip(ra.tolist(), rb.tolist(), strict=True))) == TEST.rings ** 2  # every ring pair once
    seg, ax = G.plane_index(TEST, ra, rb)
    assert np.array_equal(seg, rb - ra)
    ra2, rb2 = G.plane_rings(TEST, seg, ax)
    assert np.array_equal(ra2, ra) and np.array_equal(rb2, rb)
    with pytest.raises(ValueError, match=r"plane \(segment 2, axial 2\) does not exist"):
        G.plane_rings(TEST, [0, 2], [1, 2])


def _brute_force_mask(sc: G.Scanner, dead: set[int], segments) -> np.ndarray:
    """Mark every crystal pair (crystal, ring) x (crystal, ring) touching a dead block."""
    ra_list, rb_list = G.plane_list(sc, segments)
    plane_of = {(a, b): p for p, (a, b) in enumerate(zip(ra_list.tolist(), rb_list.tolist(), strict=True))}
    n = sc.detectors_per_ring
    mask = np.full((len(plane_of), sc.views, sc.bins), 2, np.uint8)  # 2 = never visited
    for c1 in range(n):
        for c2 in range(n):
            if c1 == c2:
                continue
            (v,), (x,) = G.lor_to_sino(sc, [c1], [c2])
            if not 0 <= x < sc.bins:
                continue
            end_a, _ = G.sino_to_lor(sc, v, x)
            for r1 in range(sc.rings):
                for r2 in range(sc.rings):
                    # the plane's ring_a holds the LOR's end a
                    key = (r1, r2) if c1 == end_a else (r2, r1)
                    if key not in plane_of:
                        continue
                    lost = int(G.block_of(sc, c1, r1)) in dead or int(G.block_of(sc, c2, r2)) in dead
                    mask[plane_of[key], v, x] = 0 if lost else 1
    assert (mask != 2).all()
    return mask


@pytest.mark.parametrize("dead", [[0], [3, 7], [5, 6, 11]])
def test_dead_block_mask_matches_brute_force(dead):
    segs = G.segment_sequence(2)
    got = G.dead_block_mask(TEST, dead, segs)
    assert got.dtype == np.uint8 and got.shape == (sum(G.axial_counts(TEST, segs)), TEST.views, TEST.bins)
    np.testing.assert_array_equal(got, _brute_force_mask(TEST, set(dead), segs))


def test_transaxial_block_masks_give_dead_block_mask():
    """The loader's formula: lost where (axial block of ring_a, end a's block) or (ring_b, end b) is dead."""
    sc, segs = G.get_scanner("demo"), G.segment_sequence(2)
    n_trans, n_blocks = G.block_counts(sc)
    tm = G.transaxial_block_masks(sc)  # (T, 2, V, X)
    assert tm.shape == (n_trans, 2, sc.views, sc.bins)
    assert (tm.sum(axis=0) == 1).all()  # each end lies in exactly one block
    ra, rb = G.plane_list(sc, segs)
    dead = G.random_blocks(sc, 3, np.random.default_rng(4))
    lost = np.zeros((ra.size, sc.views, sc.bins), bool)
    for blk in dead:
        ax, tr = divmod(int(blk), n_trans)
        assert G.block_id(sc, ax, tr) == blk
        lost |= (G.axial_block(sc, ra) == ax)[:, None, None] & tm[tr, 0]
        lost |= (G.axial_block(sc, rb) == ax)[:, None, None] & tm[tr, 1]
    np.testing.assert_array_equal(G.dead_block_mask(sc, dead, segs), (~lost).astype(np.uint8))


def test_dead_block_is_a_diagonal_band_not_a_rectangle():
    sc = G.get_scanner("mmr")
    missing = G.dead_block_mask(sc, [G.block_id(sc, 0, 10)])[0] == 0  # plane 0: ring 0 in axial block 0
    v, x = np.nonzero(missing)
    assert 0 < missing.sum() < missing.size
    box = (v.max() - v.min() + 1) * (x.max() - x.min() + 1)
    assert missing.sum() < 0.2 * box  # far from filling its bounding rectangle
    per_view = missing.sum(axis=1)
    assert per_view.max() <= 2 * sc.block_trans + 2  # a block-wide band in every view it crosses
    rows = np.unique(v)
    shifted = {tuple(np.flatnonzero(missing[row])) for row in rows}
    assert len(shifted) > 0.9 * len(rows)  # the band moves from view to view: diagonal
    # a block in axial block 1 does not touch plane 0 (rings 0, 0)
    assert G.dead_block_mask(sc, [G.block_id(sc, 1, 10)])[0].all()


def test_gap_mask_removes_virtual_crystals():
    sc = G.get_scanner("mmr")
    gap = G.gap_mask(sc)
    ca, cb = G.sino_to_lor(sc, *_grid(sc))
    assert (gap[(ca % 9 == 8) | (cb % 9 == 8)] == 0).all() and (gap[(ca % 9 < 8) & (cb % 9 < 8)] == 1).all()
    assert G.gap_mask(TEST).all()


def test_random_blocks():
    rng = np.random.default_rng(0)
    b = G.random_blocks(TEST, 5, rng)
    assert len(set(b.tolist())) == 5 and b.min() >= 0 and b.max() < G.block_counts(TEST)[1]
    with pytest.raises(ValueError, match="13 requested, scanner 'test' has 12 blocks"):
        G.random_blocks(TEST, 13, rng)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 12\)"):
        G.dead_block_mask(TEST, [12])
