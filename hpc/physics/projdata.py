"""The layout of a sinogram file, as STIR's ``ProjDataInfoCylindricalNoArcCorr`` defines it: segments
and their ring differences (span), the ring pairs each plane sums, view and TOF mashing, and what a
dead detector block removes from every stored pixel.

Segments. A segment holds the ring differences ``ring_b - ring_a`` in [min_rd, max_rd]; segment 0
holds difference 0, the others are numbered outward by their ring differences (STIR). With span 1
each segment is one ring difference and the segment number *is* the ring difference; with span S
segment 0 holds [-(S-1)/2, (S-1)/2] and segment k > 0 the next S differences (-k mirrored), the last
one cut at the maximum ring difference (STIR's ``ProjDataInfoCTI``). Files store segments in the
order 0, -1, +1, -2, +2, ... (STIR's default, and the ECAT/Siemens order: the k-th entry of a
Siemens ``%segment table`` is segment :func:`segment_storage_order` ``[k]``; this module is the one
place that mapping lives).

Planes. Axial position ``a`` of a segment holds the ring pairs with ``ring_a + ring_b = a +
offset`` (span 1: ``a = min(ring_a, ring_b)``; compressed segments sample every half ring, so
``a = ring_a + ring_b - offset`` with offset = the segment's smallest |ring difference|), ring
difference in the segment and of the parity of the sum: STIR's ``get_all_ring_pairs_for_segment_axial_pos_num``.
mMR span 11: 837 planes, 11 segments, up to 6 ring pairs each; span 1: 4084 planes, 121 segments.

Mashing. A stored view ``w`` sums the uncompressed views ``w m .. w m + m - 1`` (view mashing m);
TOF mashing sums neighbouring timing positions. Both change counts, never which LORs exist.

Dead blocks. A stored pixel (plane, view, bin) sums the LORs of its ring pairs x mashed views; a dead
block removes the LORs with an end in it. :func:`dead_fractions` gives the fraction of the pixel's
real LORs (virtual crystals and rings excluded) that survive: 1 = measured, 0 = a gap, in between =
partially measured. A pixel with no real LOR at all (through virtual crystals only) is not data:
``valid`` is False there and its fraction is 1 (never a gap).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numpy.typing import ArrayLike

from hpc.physics import geometry as G


def segment_storage_order(n: int) -> tuple[int, ...]:
    """Segment numbers of the ``n`` segments in storage order: 0, -1, +1, -2, +2, ... (STIR's default,
    and Siemens: the k-th entry of a ``%segment table`` is segment ``segment_storage_order(n)[k]``)."""
    return tuple((k + 1) // 2 * (-1 if k % 2 else 1) for k in range(n))


def siemens_timing_order(n: int) -> tuple[int, ...]:
    """STIR timing positions of a Siemens file's TOF blocks in storage order: 0, +1, -1, +2, -2, ..."""
    return tuple((k + 1) // 2 * (1 if k % 2 else -1) for k in range(n))


def cti_ring_differences(rings: int, span: int, max_ring_diff: int) -> tuple[list[int], list[int]]:
    """(min, max) ring difference of segments 0, 1, 2, ... for a span and maximum ring difference
    (STIR's ProjDataInfoCTI); negative segments mirror them."""
    if not 1 <= span <= 2 * rings - 1 or not (span - 1) // 2 <= max_ring_diff <= rings - 1:
        raise ValueError(f"span {span} with maximum ring difference {max_ring_diff} is impossible on "
                         f"{rings} rings (need span <= {2 * rings - 1}, (span-1)/2 <= max ring difference < {rings})")
    lo = [-(span // 2) if span % 2 == 0 else -((span - 1) // 2)]
    hi = [lo[0] + (span if span % 2 == 0 else span - 1)]
    while hi[-1] < max_ring_diff:
        lo.append(hi[-1] + 1)
        hi.append(min(lo[-1] + span - 1, max_ring_diff))
    return lo, hi


class SliceCounts:
    """Planes, slices and slice shape of anything with ``axial_counts``, ``tof_bins``, ``views`` and
    ``bins`` (a Layout, a file's hpc.io.spec.SinogramSpec)."""

    @property
    def planes(self) -> int:
        return sum(self.axial_counts)

    @property
    def num_slices(self) -> int:
        return self.tof_bins * self.planes

    @property
    def slice_shape(self) -> tuple[int, int]:
        return self.views, self.bins


@dataclass(frozen=True)
class Layout(SliceCounts):
    """What the slices of a sinogram file are: per segment (storage order) its STIR number, ring
    differences and axial positions; stored views and bins; TOF bins. Build with :func:`cti_layout`
    (span, maximum ring difference) or :func:`from_ring_differences` (a STIR header)."""
    scanner: G.Scanner
    segments: tuple[int, ...]
    min_rd: tuple[int, ...]
    max_rd: tuple[int, ...]
    axial_counts: tuple[int, ...]
    view_mashing: int = 1
    bins: int = 0  # stored tangential positions (0: the scanner's maximum)
    tof_bins: int = 1  # stored TOF bins (1: non-TOF)

    def __post_init__(self) -> None:
        sc = self.scanner
        if not self.bins:
            object.__setattr__(self, "bins", sc.bins)
        n = len(self.segments)
        problems = []
        if not n == len(self.min_rd) == len(self.max_rd) == len(self.axial_counts):
            problems.append("segments, ring differences and axial counts must have one entry per segment")
        elif any(lo > hi or max(abs(lo), abs(hi)) >= sc.rings for lo, hi in zip(self.min_rd, self.max_rd, strict=True)):
            problems.append(f"ring differences {list(self.min_rd)}..{list(self.max_rd)} outside +-{sc.rings - 1}")
        if self.view_mashing < 1 or sc.views % self.view_mashing:
            problems.append(f"view mashing {self.view_mashing} must divide the {sc.views} views")
        if not 0 < self.bins < sc.detectors_per_ring:
            problems.append(f"{self.bins} bins: must be in (0, {sc.detectors_per_ring})")
        if self.tof_bins > 1 and sc.tof_bins % self.tof_bins:
            problems.append(f"{self.tof_bins} TOF bins: not the scanner's {sc.tof_bins} TOF bins mashed by an integer")
        if problems:
            raise ValueError(f"layout on scanner {sc.name!r}: " + "; ".join(problems))
        for k, seg in enumerate(self.segments):
            if self.axial_counts[k] < 1 or (self.compressed(k) and self.axial_counts[k] % 2 == 0):
                raise ValueError(f"segment {seg} (ring differences {self.min_rd[k]}..{self.max_rd[k]}): "
                                 f"{self.axial_counts[k]} axial positions do not lie between the rings of {sc.name!r}")
        _ = self.ring_pairs  # every plane must hold a ring pair (ValueError naming the first that does not)

    # ------------------------------------------------------------ sizes
    @property
    def views(self) -> int:
        return self.scanner.views // self.view_mashing

    @property
    def tof_mashing(self) -> int:
        return self.scanner.tof_bins // self.tof_bins if self.tof_bins > 1 else 0

    @property
    def span(self) -> int:
        """Ring differences in segment 0 (1: no axial compression)."""
        k = self.segments.index(0) if 0 in self.segments else 0
        return self.max_rd[k] - self.min_rd[k] + 1

    def compressed(self, k: int) -> bool:
        return self.min_rd[k] != self.max_rd[k]

    # ------------------------------------------------------------ planes
    @cached_property
    def ring_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (plane, ring_a, ring_b), each (M,) int64, planes in storage order, ring pairs of a
        plane by increasing ring difference (STIR's order)."""
        planes, ra, rb, p = [], [], [], 0
        rings = self.scanner.rings
        for k in range(len(self.segments)):
            for a in range(self.axial_counts[k]):
                total = self._ring_sum(k, a)
                d = np.arange(self.min_rd[k], self.max_rd[k] + 1)
                d = d[(total + d) % 2 == 0]
                r1, r2 = (total - d) // 2, (total + d) // 2
                ok = (r1 >= 0) & (r2 >= 0) & (r1 < rings) & (r2 < rings)
                if not ok.any():
                    raise ValueError(f"plane (segment {self.segments[k]}, axial {a}) has no ring pair on {rings} rings")
                planes.append(np.full(int(ok.sum()), p))
                ra.append(r1[ok])
                rb.append(r2[ok])
                p += 1
        return np.concatenate(planes), np.concatenate(ra), np.concatenate(rb)

    def _ring_sum(self, k: int, axial: int) -> int:
        """ring_a + ring_b of axial position ``axial`` of segment k: positions are centred on the
        scanner, one per ring (span 1) or per half ring (compressed segments)."""
        rings, n = self.scanner.rings, self.axial_counts[k]
        if self.compressed(k):
            return axial - (n - 1) // 2 + rings - 1
        return 2 * axial - (n - 1) + rings - 1

    def plane_segment_axial(self) -> tuple[np.ndarray, np.ndarray]:
        """(segment, axial) of every plane in storage order, each (planes,) int32."""
        seg = np.concatenate([np.full(c, s, np.int32) for s, c in zip(self.segments, self.axial_counts, strict=True)])
        return seg, np.concatenate([np.arange(c, dtype=np.int32) for c in self.axial_counts])

    def plane_of(self, segment: ArrayLike, axial: ArrayLike) -> np.ndarray:
        """Storage index of planes (segment, axial); ValueError for planes the layout lacks."""
        seg, ax = np.broadcast_arrays(np.asarray(segment, np.int64), np.asarray(axial, np.int64))
        first = dict(zip(self.segments, np.cumsum((0,) + self.axial_counts[:-1]).tolist(), strict=True))
        count = dict(zip(self.segments, self.axial_counts, strict=True))
        out = np.empty(seg.shape, np.int64)
        for i, (s, a) in enumerate(zip(seg.flat, ax.flat, strict=True)):
            if s not in count or not 0 <= a < count[s]:
                raise ValueError(f"plane (segment {s}, axial {a}) does not exist in this layout of "
                                 f"{self.scanner.name!r} (segments {list(self.segments)}, span {self.span})")
            out.flat[i] = first[s] + a
        return out

    def ring_pair_plane(self, ring_a: ArrayLike, ring_b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """(segment, axial) holding each ring pair (STIR's get_segment_axial_pos_num_for_ring_pair);
        ValueError for a ring difference the layout does not store."""
        ra, rb = (np.asarray(r, np.int64) for r in np.broadcast_arrays(ring_a, ring_b))
        d = rb - ra
        k = np.full(d.shape, -1)
        for i, (lo, hi) in enumerate(zip(self.min_rd, self.max_rd, strict=True)):
            k = np.where((d >= lo) & (d <= hi) & (k < 0), i, k)
        if (k < 0).any():
            raise ValueError(f"ring difference {int(d[k < 0].flat[0])} is not stored in this layout "
                             f"(ring differences {min(self.min_rd)}..{max(self.max_rd)})")
        first = np.array([self._ring_sum(i, 0) for i in range(len(self.segments))])
        axial = np.where(np.array([self.compressed(i) for i in range(len(self.segments))])[k],
                         ra + rb - first[k], (ra + rb - first[k]) // 2)
        return np.asarray(self.segments)[k], axial

    def mashed_views(self, view: int) -> np.ndarray:
        """The uncompressed views a stored view sums."""
        return np.arange(view * self.view_mashing, (view + 1) * self.view_mashing)

    # ------------------------------------------------------------ validity
    @cached_property
    def valid_planes(self) -> np.ndarray:
        """(planes,) bool: the plane has a ring pair between two real (non-virtual) rings."""
        plane, ra, rb = self.ring_pairs
        real = ~(G.virtual_ring(self.scanner, ra) | G.virtual_ring(self.scanner, rb))
        return np.bincount(plane, weights=real, minlength=self.planes) > 0

    @cached_property
    def valid_bins(self) -> np.ndarray:
        """(V, X) bool over stored views: some LOR of the pixel joins two real crystals."""
        t = _transaxial(self.scanner, self.bins)[1]  # (U, X)
        return t.reshape(self.views, self.view_mashing, self.bins).any(axis=1)

    def valid(self, planes: ArrayLike) -> np.ndarray:
        """(n, V, X) bool for plane storage indices ``planes``: the pixel holds a real LOR."""
        return self.valid_planes[np.asarray(planes)][:, None, None] & self.valid_bins[None]

    @cached_property
    def pair_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(axial block of ring_a, of ring_b, 1.0 if both rings are real) per plane and ring pair,
        each (P, K) with K the most pairs of any plane; unused slots -1, -1, 0."""
        sc = self.scanner
        plane, ra, rb = self.ring_pairs
        k = np.bincount(plane, minlength=self.planes).max()
        slot = np.arange(plane.size) - np.searchsorted(plane, plane)  # position within its plane
        blk_a = np.full((self.planes, k), -1, np.int64)
        blk_b = np.full((self.planes, k), -1, np.int64)
        real = np.zeros((self.planes, k), np.float32)
        blk_a[plane, slot], blk_b[plane, slot] = G.axial_block(sc, ra), G.axial_block(sc, rb)
        real[plane, slot] = ~(G.virtual_ring(sc, ra) | G.virtual_ring(sc, rb))
        return blk_a, blk_b, real


def _transaxial(sc: G.Scanner, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(transaxial block masks (T, 2, U, X), real-crystal LORs (U, X)) for ``bins`` stored bins
    (centred like the scanner's: bin b is tangential position b - bins // 2)."""
    if bins == sc.bins:
        return G.transaxial_block_masks(sc), G.transaxial_valid(sc)
    wide = G.Scanner(**{**sc.__dict__, "bins": bins, "name": sc.name})
    return G.transaxial_block_masks(wide), G.transaxial_valid(wide)


# ---------------------------------------------------------------- constructors
def cti_layout(sc: G.Scanner, span: int | None = None, max_ring_diff: int | None = None,
               view_mashing: int | None = None, tof_mashing: int | None = None, max_segment: int | None = None,
               bins: int | None = None) -> Layout:
    """The layout STIR builds from a span and maximum ring difference (defaults: the vendor's, from
    the scanner preset), keeping segments |k| <= ``max_segment`` (smaller test files). ``tof_mashing``
    0 = non-TOF."""
    span = sc.span if span is None else span
    mrd = (sc.max_ring_diff if sc.max_ring_diff >= 0 else sc.rings - 1) if max_ring_diff is None else max_ring_diff
    lo, hi = cti_ring_differences(sc.rings, span, mrd)
    top = len(lo) - 1 if max_segment is None else min(max_segment, len(lo) - 1)
    segs = segment_storage_order(2 * top + 1)
    if span == 1:
        counts = [sc.rings - abs(s) for s in segs]
    else:
        counts = [2 * sc.rings - 1 - (2 * lo[abs(s)] if s else 0) for s in segs]
    tof_m = sc.tof_mashing if tof_mashing is None else tof_mashing
    return Layout(sc, segs, tuple(lo[s] if s >= 0 else -hi[-s] for s in segs),
                  tuple(hi[s] if s >= 0 else -lo[-s] for s in segs), tuple(counts),
                  sc.view_mashing if view_mashing is None else view_mashing, bins or sc.bins,
                  sc.tof_bins // tof_m if tof_m and sc.tof_bins > 1 else 1)


def default_layout(sc: G.Scanner) -> Layout:
    """The vendor's sinogram layout of a preset (mMR span 11: 837 x 252 x 344)."""
    return cti_layout(sc)


def span1_layout(sc: G.Scanner, segments: Sequence[int], views: int | None = None, bins: int | None = None,
                 tof_bins: int = 1) -> Layout:
    """Span-1 layout whose segment numbers are ring differences (hpc's v1 datasets, simulate)."""
    segs = tuple(int(s) for s in segments)
    if views and sc.views % views:
        raise ValueError(f"{views} views: not the {sc.views} views of {sc.name!r} mashed by an integer factor")
    for s in segs:
        if abs(s) >= sc.rings:
            raise ValueError(f"segment {s}: scanner {sc.name!r} has ring differences below {sc.rings}")
    mash = sc.views // views if views else 1
    return Layout(sc, segs, segs, segs, tuple(sc.rings - abs(s) for s in segs), mash, bins or sc.bins, tof_bins)


def from_ring_differences(sc: G.Scanner, segments: Sequence[int], min_rd: Sequence[int], max_rd: Sequence[int],
                          axial_counts: Sequence[int], views: int, bins: int, tof_bins: int = 1) -> Layout:
    """A layout as a STIR header states it; ValueError naming what does not fit the scanner."""
    if views <= 0 or sc.views % views:
        raise ValueError(f"{views} views: not the {sc.views} views of {sc.name!r} mashed by an integer factor")
    return Layout(sc, tuple(segments), tuple(min_rd), tuple(max_rd), tuple(axial_counts), sc.views // views,
                  bins, tof_bins)


# ---------------------------------------------------------------- dead blocks
class DeadBlockTables:
    """Per-plane tables for measured fractions under dead blocks, on a torch device: the axial
    blocks of each plane's ring pairs (padded to the most pairs of any plane) and whether both rings
    are real, plus the transaxial block masks. Shared by the loader (batched, on the GPU),
    ``hpc simulate`` and ``hpc predict``."""

    def __init__(self, layout: Layout, device="cpu"):
        import torch  # late: hpc simulate and the header readers never need it

        sc = layout.scanner
        blk_a, blk_b, real = layout.pair_table
        tm, tvalid = _transaxial(sc, layout.bins)
        dev = torch.device(device)
        self.layout, self.n_trans, self.n_blocks = layout, *G.block_counts(sc)
        self.block_a = torch.as_tensor(blk_a, device=dev)  # (P, K)
        self.block_b = torch.as_tensor(blk_b, device=dev)
        self.real = torch.as_tensor(real, device=dev)  # (P, K)
        ends = tm.reshape(tm.shape[0], 2, -1)  # (T, 2, U*X): 1 = the LOR's end 1 / end 2 lies in block t
        touched = [np.flatnonzero(e.any(0)) for e in ends]  # per block: the only LORs it can take away
        width = max(len(t) for t in touched)
        self.cols = torch.as_tensor(np.stack([np.pad(t, (0, width - len(t))) for t in touched]), device=dev)  # (T, M)
        self.listed = torch.as_tensor([len(t) for t in touched], device=dev)  # (T,) real entries of each row
        codes = ends[:, 0].astype(np.uint8) | ends[:, 1].astype(np.uint8) << 1  # (T, U*X) bit 0: end 1, bit 1: end 2
        self.ends = torch.as_tensor(codes, device=dev).flatten()  # (T * U*X,)
        self.lors = ends.shape[-1]
        u = np.arange(self.lors)
        self.pixel = torch.as_tensor((u // layout.bins) // layout.view_mashing * layout.bins + u % layout.bins,
                                     device=dev)  # (U*X,) the stored (mashed) pixel of each LOR
        self.valid = torch.as_tensor(tvalid.reshape(-1).astype(np.float32), device=dev)  # (U*X,) 1 = a real LOR
        self.valid_pixels = torch.as_tensor(  # (V*X,) real LORs per stored pixel
            tvalid.reshape(layout.views, layout.view_mashing, layout.bins).sum(1).astype(np.float32).reshape(-1),
            device=dev)

    def fractions(self, planes, dead):
        """Measured fractions (B, C, V, X) float32 of planes ``planes`` (B, C) (a sample's context
        planes share its dead blocks) with dead blocks ``dead`` (B, D) (ids ``axial_block * n_trans +
        trans_block``; -1 = none); planes (N,) give (N, V, X).

        A LOR of ring pair k is lost when one of its ends lies in a dead block: end 1 in the block's
        transaxial range while ring a is in the block's axial range, or end 2 while ring b is. Only
        the LORs with an end in a dead block's transaxial range (a few %) are looked at: as bit codes,
        per LOR ``e`` (which dead blocks' transaxial ranges its ends fall in: per sample) and per ring
        pair ``h`` (which dead blocks' axial ranges its rings fall in: per plane), it is lost when
        ``e & h != 0`` (blocks 4 at a time, 2 bits each); every other pixel is 1. (The dense
        pairs x blocks x all-LORs product took ~1 s per batch of 80 mCT planes on CPU.)"""
        import torch

        if planes.dim() == 1:
            return self.fractions(planes[:, None], dead)[:, 0]
        lay, dev = self.layout, dead.device
        (n, c), d = planes.shape, dead.shape[1]
        d_ax = torch.where(dead >= 0, dead.div(self.n_trans, rounding_mode="floor"), -1)  # (B, D); -1: no ring
        d_tr = dead.remainder(self.n_trans)  # (B, D)
        a, b, real = self.block_a[planes], self.block_b[planes], self.real[planes] > 0  # (B, C, K)
        hit = torch.stack([a[..., None] == d_ax[:, None, None], b[..., None] == d_ax[:, None, None]], -1)  # (B,C,K,D,2)
        idx = self.cols[d_tr]  # (B, D, M) the LORs each dead block can take away (rows padded)
        once = torch.arange(idx.shape[2], device=dev) < self.listed[d_tr][..., None]  # (B, D, M): not padding
        codes = []  # per group of 4 blocks: (LOR codes (B, D * M), ring-pair codes (B, C, K)), uint8
        for g in range(0, d, 4):
            e = torch.zeros(n, idx[0].numel(), dtype=torch.uint8, device=dev)
            h = torch.zeros(a.shape, dtype=torch.uint8, device=dev)
            for j in range(g, min(g + 4, d)):
                at = self.ends.take(d_tr[:, j, None, None] * self.lors + idx)  # (B, D, M) LOR ends in block j
                e |= at.view(n, -1) << 2 * (j - g)
                h |= (hit[..., j, 0] | hit[..., j, 1] << 1).to(torch.uint8) << 2 * (j - g)
                once[:, j + 1:] &= at[:, j + 1:] == 0  # listed by block j already
            codes.append((e, h))
        pairs = real.sum(2, keepdim=True, dtype=torch.float32)  # (B, C, 1) real ring pairs of each plane
        lost = (pairs - _surviving_pairs(codes, real)) * self.valid[idx].view(n, 1, -1)  # (B, C, D * M)
        pix = self.pixel[idx].view(n, 1, -1).expand(lost.shape)  # stored pixel of each listed LOR
        if lay.view_mashing > 1:  # a stored pixel adds up several LORs: each counted once
            lost = torch.zeros(n, c, lay.views * lay.bins, device=dev).scatter_add_(
                2, pix, lost * once.view(n, 1, -1)).gather(2, pix)
        total = pairs * self.valid_pixels[pix]  # (B, C, D * M) real LORs of those pixels (mashed views add up)
        frac = ((total - lost) / total.clamp_min(1.0)).where(total > 0, 1.0)  # repeats: the same value
        out = torch.ones(n, c, lay.views * lay.bins, device=dev).scatter_(2, pix, frac)
        return out.view(n, c, lay.views, lay.bins)

    def hit_planes(self, blocks: ArrayLike) -> np.ndarray:
        """(P,) bool: planes with a ring pair in an axial block of ``blocks``."""
        return hit_planes(self.layout, blocks)


def _surviving_pairs(codes, real):
    """(B, C, L) float32: the real ring pairs (``real`` (B, C, K) bool) for which each LOR survives:
    those with ``e & h == 0`` in every group of ``codes`` [(e (B, L), h (B, C, K)) uint8]. One group
    (at most 4 dead blocks, the usual case): a table of survivors per LOR code (B, C, 256), looked up."""
    import torch

    n, c, _ = real.shape
    if len(codes) == 1:
        e, h = codes[0]
        every = torch.arange(256, device=e.device, dtype=torch.uint8)
        table = (((h[..., None] & every) == 0) & real[..., None]).sum(2, dtype=torch.float32)  # (B, C, 256)
        return table.gather(2, e.long()[:, None].expand(n, c, -1))
    ok = real[..., None]  # (B, C, K, L) after the first group
    for e, h in codes:
        ok = ok & ((e[:, None, None] & h[..., None]) == 0)
    return ok.sum(2, dtype=torch.float32)


def hit_planes(layout: Layout, blocks: ArrayLike) -> np.ndarray:
    """(P,) bool: planes with a ring pair in an axial block of ``blocks``."""
    ax = np.unique(np.asarray(blocks, np.int64) // G.block_counts(layout.scanner)[0])
    a, b, _ = layout.pair_table
    return (np.isin(a, ax) | np.isin(b, ax)).any(1)


def dead_fractions(layout: Layout, blocks: ArrayLike, planes: ArrayLike | None = None,
                   tables: DeadBlockTables | None = None) -> np.ndarray:
    """(n, V, X) float32 measured fractions of planes ``planes`` (storage indices; None: all) with the
    listed blocks dead: 1 = measured, 0 = a gap, in between partially measured (span, mashing).

    The same blocks for every plane: only the LORs with an end in a dead block (a few % of them)
    are looked at, and ring pairs whose ends meet the dead blocks' axial blocks the same way share
    one lost-LOR map. (``tables``: unused, kept for callers; the batched per-sample form is
    :meth:`DeadBlockTables.fractions`.)"""
    sc = layout.scanner
    blocks = np.unique(G.check_blocks(sc, blocks))
    planes = np.arange(layout.planes) if planes is None else np.asarray(planes, np.int64).reshape(-1)
    out = np.ones((planes.size, *layout.slice_shape), np.float32)
    if blocks.size == 0 or planes.size == 0:
        return out
    d_ax, d_tr = np.divmod(blocks, G.block_counts(sc)[0])
    tm, tvalid = _transaxial(sc, layout.bins)  # (T, 2, U, X), (U, X)
    ends = np.concatenate([tm[d_tr, 0], tm[d_tr, 1]]).reshape(2 * blocks.size, -1)  # (2D, U*X): by end
    valid = tvalid.reshape(-1)
    cols = np.flatnonzero(ends.any(0) & valid)  # the only LORs a dead block can touch
    ends = ends[:, cols]
    blk_a, blk_b, real = layout.pair_table
    rows = np.flatnonzero(hit_planes(layout, blocks)[planes])
    for i in range(0, rows.size, 256):  # bounded memory
        sel = planes[rows[i:i + 256]]
        a, b, r = blk_a[sel], blk_b[sel], real[sel]  # (n, K)
        bits = np.concatenate([a[..., None] == d_ax, b[..., None] == d_ax], -1)  # (n, K, 2D): end meets block
        codes = bits.astype(np.int64) @ (1 << np.arange(bits.shape[-1]))  # (n, K)
        uniq, inv = np.unique(codes, return_inverse=True)
        kept = np.ones((uniq.size, cols.size), np.float32)  # per code: 1 where the LOR survives
        for c, code in enumerate(uniq):
            for j in np.flatnonzero((code >> np.arange(bits.shape[-1])) & 1):
                kept[c] *= ~ends[j]
        weight = np.zeros((sel.size, uniq.size), np.float32)
        np.add.at(weight, (np.repeat(np.arange(sel.size), r.shape[1]), inv.reshape(-1)), r.reshape(-1))
        total = np.outer(r.sum(1), valid).astype(np.float32)  # (n, U*X) real LORs per pair-sum
        alive = total.copy()
        alive[:, cols] = weight @ kept
        shape = (sel.size, layout.views, layout.view_mashing, layout.bins)
        alive, total = alive.reshape(shape).sum(2), total.reshape(shape).sum(2)  # mashed views add up
        out[rows[i:i + 256]] = np.where(total > 0, alive / np.maximum(total, 1), 1.0)
    return out


def layout_for(scanner: str | G.Scanner, segments: Sequence[int], axial_counts: Sequence[int], views: int, bins: int,
               tof_bins: int = 1, ring_diffs: Sequence[tuple[int, int]] | None = None) -> Layout:
    """The layout of a file from what its header says: with ring differences per segment (STIR
    headers, or derived from a Siemens `%axial compression`) they are used as they are; without, a
    span-1 reading (segment = ring difference) when the axial counts fit it, else the first span
    (the scanner's own first) whose STIR layout has these axial counts. ValueError when none fits."""
    sc = scanner if isinstance(scanner, G.Scanner) else G.get_scanner(scanner)
    segs, counts = tuple(int(s) for s in segments), tuple(int(c) for c in axial_counts)
    if views <= 0 or sc.views % views:
        raise ValueError(f"{views} views: not the {sc.views} views of {sc.name!r} mashed by an integer factor")
    if ring_diffs is not None:
        lo, hi = zip(*ring_diffs, strict=True) if ring_diffs else ((), ())
        return from_ring_differences(sc, segs, lo, hi, counts, views, bins, tof_bins)
    if all(abs(s) < sc.rings and c == sc.rings - abs(s) for s, c in zip(segs, counts, strict=True)):
        return span1_layout(sc, segs, views, bins, tof_bins)
    top = max(abs(s) for s in segs)
    for span in dict.fromkeys([sc.span, *range(3, 2 * sc.rings, 2)]):
        for mrd in dict.fromkeys([sc.max_ring_diff if sc.max_ring_diff >= 0 else sc.rings - 1, sc.rings - 1]):
            try:
                lay = cti_layout(sc, span, mrd, max_segment=top)
            except ValueError:
                continue
            if lay.segments == segs and lay.axial_counts == counts:
                return Layout(sc, segs, lay.min_rd, lay.max_rd, counts, sc.views // views, bins, tof_bins)
    raise ValueError(f"axial counts {list(counts)} of segments {list(segs)} fit no span on {sc.name!r} "
                     f"({sc.rings} rings); the header should give ring differences or %axial compression")


# ---------------------------------------------------------------- span 1 shortcuts (simulator, tests)
def segment_sequence(max_ring_diff: int) -> tuple[int, ...]:
    """Span-1 segments in storage order: 0, -1, +1, ..., -max_ring_diff, +max_ring_diff."""
    return (0,) + tuple(s for d in range(1, max_ring_diff + 1) for s in (-d, d))


def axial_counts(sc: G.Scanner, segments) -> tuple[int, ...]:
    """Planes per span-1 segment (rings - |ring difference|)."""
    return span1_layout(sc, segments).axial_counts


def plane_rings(sc: G.Scanner, segment: ArrayLike, axial: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(ring_a, ring_b) of span-1 planes (segment = ring_b - ring_a, axial = min ring)."""
    seg, ax = np.broadcast_arrays(np.asarray(segment, np.int64), np.asarray(axial, np.int64))
    bad = np.flatnonzero((ax < 0) | (ax >= sc.rings - np.abs(seg)))
    if bad.size:
        i = bad[0]
        raise ValueError(f"plane (segment {seg.flat[i]}, axial {ax.flat[i]}) does not exist on scanner "
                         f"{sc.name!r} ({sc.rings} rings, span 1)")
    return ax + np.maximum(-seg, 0), ax + np.maximum(seg, 0)


def plane_list(sc: G.Scanner, segments) -> tuple[np.ndarray, np.ndarray]:
    """(ring_a, ring_b) of every span-1 plane of ``segments`` in storage order, each (planes,)."""
    _, ra, rb = span1_layout(sc, segments).ring_pairs
    return ra, rb


def dead_block_mask(sc: G.Scanner, blocks: ArrayLike, segments=None) -> np.ndarray:
    """(planes, V, X) uint8 of span-1 ``segments`` (None: segment 0): 1 = measured, 0 = an end of
    the LOR lies in a dead block (dead_fractions for any layout)."""
    return (dead_fractions(span1_layout(sc, (0,) if segments is None else segments), blocks) > 0.5).astype(np.uint8)
