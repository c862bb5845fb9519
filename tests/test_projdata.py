"""Sinogram layouts as STIR builds them (span, segments, ring pairs per plane, view mashing) and the
fractions of every pixel a dead block leaves, against a brute-force enumeration of ring pairs x
detector pairs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc.physics import geometry as G
from hpc.physics import projdata as P

MMR, MCT = G.SCANNERS["mmr"], G.SCANNERS["mct"]
# small, with everything real scanners have: virtual crystals and rings, span 3, view mashing 2
SMALL = G.Scanner("small", "small", rings=8, detectors_per_ring=24, block_trans=4, block_axial=4, bins=14,
                  inner_radius_mm=95.0, doi_mm=5.0, bin_size_mm=13.1, ring_spacing_mm=4.0, virtual_trans=1,
                  virtual_axial=1)


def test_mmr_span_11_and_span_1():
    lay = P.default_layout(MMR)
    assert (lay.planes, len(lay.segments), lay.span, lay.slice_shape) == (837, 11, 11, (252, 344))
    assert lay.segments == (0, -1, 1, -2, 2, -3, 3, -4, 4, -5, 5)
    assert lay.axial_counts == (127, 115, 115, 93, 93, 71, 71, 49, 49, 27, 27)
    assert lay.min_rd[:3] == (-5, -16, 6) and lay.max_rd[:3] == (5, -6, 16) and max(lay.max_rd) == 60
    one = P.cti_layout(MMR, span=1)
    assert (one.planes, len(one.segments), one.span) == (4084, 121, 1)


def test_mct_is_its_real_tof_layout():
    """400 bins x 168 views (336 mashed by 2) x 621 planes x 13 TOF bins; segments as in the STIR
    template Siemens' norm sinogram is read with (STIR issue 508)."""
    lay = P.default_layout(MCT)
    assert (lay.bins, lay.views, lay.view_mashing, lay.planes, lay.tof_bins) == (400, 168, 2, 621, 13)
    assert lay.axial_counts == (109, 97, 97, 75, 75, 53, 53, 31, 31)
    assert lay.min_rd == (-5, -16, 6, -27, 17, -38, 28, -49, 39)
    assert lay.max_rd == (5, -6, 16, -17, 27, -28, 38, -39, 49)
    vis = P.default_layout(G.SCANNERS["vision600"])
    assert (vis.planes, vis.tof_bins, vis.tof_mashing, vis.span) == (815, 33, 8, 19)


@pytest.mark.parametrize("span", [1, 3, 11])
def test_every_ring_pair_is_in_exactly_one_plane(span):
    lay = P.cti_layout(MMR, span=span, max_ring_diff=60)
    plane, ra, rb = lay.ring_pairs
    d = rb - ra
    assert plane.size == 64 * 64 - 2 * (1 + 2 + 3)  # every pair with |ring difference| <= 60, once
    assert len(set(zip(ra.tolist(), rb.tolist(), strict=True))) == plane.size
    assert np.array_equal(np.unique(plane), np.arange(lay.planes))
    total = ra + rb
    first = np.searchsorted(plane, np.arange(lay.planes))
    assert (total == total[first][plane]).all()  # a plane sums ring pairs of one axial position
    seg, ax = lay.plane_segment_axial()
    k = np.searchsorted(np.array(lay.segments), seg[plane], sorter=np.argsort(lay.segments))
    lo, hi = (np.array(lay.segments)[np.argsort(lay.segments)] for _ in range(2))
    order = np.argsort(lay.segments)
    lo, hi = np.array(lay.min_rd)[order][k], np.array(lay.max_rd)[order][k]
    assert ((d >= lo) & (d <= hi)).all()
    s2, a2 = lay.ring_pair_plane(ra, rb)  # STIR's get_segment_axial_pos_num_for_ring_pair
    assert np.array_equal(s2, seg[plane]) and np.array_equal(a2, ax[plane])
    assert np.array_equal(lay.plane_of(s2, a2), plane)
    # axial positions step through z: half a ring per position in compressed segments
    z = total[first] / 2
    for s in lay.segments:
        zs = z[seg == s]
        assert np.allclose(np.diff(zs), 0.5 if (lay.compressed(lay.segments.index(s))) else 1.0)


def test_plane_errors_name_the_layout():
    lay = P.default_layout(MMR)
    with pytest.raises(ValueError, match=r"plane \(segment 6, axial 0\) does not exist.*span 11"):
        lay.plane_of([6], [0])
    with pytest.raises(ValueError, match="ring difference 61 is not stored"):
        lay.ring_pair_plane([0], [61])
    with pytest.raises(ValueError, match="axial positions do not lie between the rings"):
        P.from_ring_differences(MMR, (0,), (-5,), (5,), (126,), 252, 344)
    with pytest.raises(ValueError, match="not the 252 views"):
        P.from_ring_differences(MMR, (0,), (-5,), (5,), (127,), 250, 344)


def test_storage_orders():
    assert P.segment_storage_order(5) == (0, -1, 1, -2, 2)
    assert P.siemens_timing_order(5) == (0, 1, -1, 2, -2)


def _brute_force(lay: P.Layout, dead: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """(fraction, valid) per stored pixel by walking every (ring, detector) x (ring, detector) LOR:
    STIR's detector table (re-derived, with its swap of the ring pair) puts it in an uncompressed
    view, the ring pair in a plane; a LOR with a virtual end is not data, one with an end in a
    dead block is lost."""
    sc, n = lay.scanner, lay.scanner.detectors_per_ring
    table = {}
    for u in range(sc.views):
        for b in range(lay.bins):
            t = b - lay.bins // 2
            table[((u + (t >> 1) + n) % n, (u - ((t + 1) >> 1) + n // 2) % n)] = (u, b)
    alive = np.zeros((lay.planes, lay.views, lay.bins))
    total = np.zeros_like(alive)
    virt_c = {c for c in range(n) if c % sc.block_trans < sc.virtual_trans}
    virt_r = {r for r in range(sc.rings) if r % sc.block_axial >= sc.block_axial - sc.virtual_axial}
    for (c1, c2), (u, b) in table.items():
        for r1 in range(sc.rings):
            for r2 in range(sc.rings):
                try:
                    seg, ax = lay.ring_pair_plane([r1], [r2])
                except ValueError:
                    continue  # ring difference not stored
                p = lay.plane_of(seg, ax)[0]
                if c1 in virt_c or c2 in virt_c or r1 in virt_r or r2 in virt_r:
                    continue
                blk1 = (r1 // sc.block_axial) * (n // sc.block_trans) + c1 // sc.block_trans
                blk2 = (r2 // sc.block_axial) * (n // sc.block_trans) + c2 // sc.block_trans
                total[p, u // lay.view_mashing, b] += 1
                alive[p, u // lay.view_mashing, b] += blk1 not in dead and blk2 not in dead
    frac = np.where(total > 0, alive / np.maximum(total, 1), 1.0)
    return frac, total > 0


@pytest.mark.parametrize(("span", "mrd", "mash", "dead"),
                         [(3, 4, 2, {5}), (3, 7, 1, {0, 7}), (1, 5, 2, {9, 10, 3}), (5, 5, 2, {4})])
def test_dead_fractions_match_brute_force(span, mrd, mash, dead):
    lay = P.cti_layout(SMALL, span=span, max_ring_diff=mrd, view_mashing=mash)
    frac, valid = _brute_force(lay, dead)
    got = P.dead_fractions(lay, sorted(dead))
    assert got.dtype == np.float32 and got.shape == (lay.planes, lay.views, lay.bins)
    np.testing.assert_allclose(got, frac, atol=1e-6)
    assert np.array_equal(lay.valid(np.arange(lay.planes)), valid)


def test_dead_fractions_of_some_planes_and_batched_tables():
    lay = P.cti_layout(SMALL, span=3, max_ring_diff=4, view_mashing=2)
    tables = P.DeadBlockTables(lay)
    full = P.dead_fractions(lay, [5, 6], tables=tables)
    some = P.dead_fractions(lay, [5, 6], planes=[3, 0, 17], tables=tables)
    np.testing.assert_array_equal(some, full[[3, 0, 17]])
    # per-sample dead lists, -1 = no block
    dead = torch.tensor([[5, 6], [6, -1], [-1, -1]])
    got = tables.fractions(torch.tensor([3, 3, 3]), dead).numpy()
    np.testing.assert_array_equal(got[0], full[3])
    np.testing.assert_allclose(got[1], P.dead_fractions(lay, [6], planes=[3])[0])
    assert (got[2] == 1).all()
    assert not tables.hit_planes([G.block_id(SMALL, 1, 0)])[:1].any()  # plane 0 holds rings 0, 0 only


@pytest.mark.parametrize(("scanner", "span", "mash"), [("small", 3, 2), ("small", 1, 1), ("mct", 11, 2)])
def test_batched_fractions_equal_the_per_block_set_reference(scanner, span, mash):
    """DeadBlockTables.fractions (the loader's batched form: only the LORs a dead block's transaxial
    range reaches, ring pairs and LORs as bit codes, blocks 4 at a time) == dead_fractions (checked
    against brute force above) for random planes and per-sample dead sets: up to 6 blocks (two code
    groups), unused slots (-1), blocks sharing a transaxial range (the same LORs listed twice)."""
    sc = SMALL if scanner == "small" else G.SCANNERS[scanner]
    lay = P.cti_layout(sc, span=span, view_mashing=mash, **({"max_ring_diff": 4} if scanner == "small" else {}))
    tables = P.DeadBlockTables(lay)
    rng = np.random.default_rng(3)
    n_trans, n_blocks = G.block_counts(sc)
    for d in (1, 2, 6):
        planes = rng.integers(0, lay.planes, 12)
        dead = np.stack([rng.choice(n_blocks, d, replace=False) for _ in planes])
        dead[1::4, -1] = -1
        if d > 1:  # the same transaxial block in another axial block
            dead[2::4, 1] = (dead[2::4, 0] + n_trans) % n_blocks
        got = tables.fractions(torch.as_tensor(planes), torch.as_tensor(dead)).numpy()
        for i, (p, blocks) in enumerate(zip(planes, dead, strict=True)):
            want = P.dead_fractions(lay, sorted(set(blocks[blocks >= 0].tolist())), planes=[p])[0]
            np.testing.assert_array_equal(got[i], want)
        assert (got < 1).any()  # something was lost
        # the loader's form: a sample's context planes (B, C) share its dead blocks (B, D)
        ctx = tables.fractions(torch.as_tensor(planes).view(4, 3), torch.as_tensor(dead[::3]))
        reps = tables.fractions(torch.as_tensor(planes), torch.as_tensor(dead[::3]).repeat_interleave(3, 0))
        assert ctx.shape == (4, 3, lay.views, lay.bins) and torch.equal(ctx.reshape(reps.shape), reps)


def test_mmr_dead_block_in_span_11():
    """A dead block in span 11 empties the planes whose ring pairs all touch it and leaves the others
    partial; planes out of its reach keep everything."""
    lay = P.default_layout(MMR)
    blk = int(G.block_id(MMR, 2, 10))  # rings 16..23
    frac = P.dead_fractions(lay, [blk], planes=np.arange(127))  # segment 0
    touched = np.flatnonzero((frac < 1).any(axis=(1, 2)))
    assert touched.min() == 2 * 16 - 5 and touched.max() == 2 * 23 + 5  # ring_a + ring_b in reach
    assert set(np.unique(frac[40])) == {0.0, 1.0}  # all 5 ring pairs of ring sum 40 lie in rings 16..23
    np.testing.assert_allclose(np.unique(frac[32]), [0.4, 1.0])  # (15, 17) or (14, 18) survive of 5 pairs
    assert (frac[:touched.min()] == 1).all()
