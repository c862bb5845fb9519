"""Simulated studies in a scanner's real sinogram layout (:class:`hpc.physics.projdata.Layout`): a stored
plane sums its ring pairs (span), a stored view its uncompressed views (view mashing), a TOF bin
its timing positions (TOF mashing); virtual crystals and rings record nothing; dead blocks remove
part of a compressed pixel's LORs. The physics of every ring pair is :func:`hpc.simulate.simulate.study_means`.

    lay = projdata.default_layout(get_scanner("mmr"))      # span 11: 837 x 252 x 344
    means = layout_means(lay, phantom, "clinical", Physics(), planes=12)   # (T, P, V, X) float32

``planes=N`` computes only the first N planes (storage order) and leaves the others 0 (a cut for
tests of the full layout). ``hpc simulate --planes N`` instead simulates a smaller layout,
:func:`central_planes`: the N central planes of segment 0, and its files hold just those.
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from hpc.errors import InputError
from hpc.physics import factors as PH
from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.simulate import counts as SC
from hpc.simulate.phantom import Phantom

PAIRS_PER_CHUNK = 8  # ring pairs projected at a time: bounds memory (mCT TOF: ~14 MB per pair)


def tof_scanner(layout: P.Layout) -> G.Scanner:
    """The scanner with the layout's TOF bins as its own: a mashed TOF bin is the sum of its timing
    positions, which the Gaussian kernel integrates in one go over the wider bin."""
    sc = layout.scanner
    if layout.tof_bins == sc.tof_bins:
        return sc
    width = sc.tof_bin_ps * (sc.tof_bins // layout.tof_bins) if layout.tof_bins > 1 else 0.0
    return dataclasses.replace(sc, tof_bins=layout.tof_bins, tof_bin_ps=width, tof_mashing=1)


def _compress(x: np.ndarray, plane_of_pair: np.ndarray, n_planes: int, layout: P.Layout) -> np.ndarray:
    """(..., M, U, X) per ring pair and uncompressed view -> (..., n, V, X): pairs summed into their
    planes (``plane_of_pair`` (M,) in 0..n-1, sorted), views into the mashed views."""
    starts = np.searchsorted(plane_of_pair, np.arange(n_planes))
    planes = np.add.reduceat(x, starts, axis=-3)
    m = layout.view_mashing
    return planes.reshape(*planes.shape[:-2], layout.views, m, layout.bins).sum(-2)


def layout_means(layout: P.Layout, ph: Phantom, counts: float | str, phys: SC.Physics,
                 planes: int | None = None) -> SC.Means:
    """Expected prompts, randoms (T, P, V, X) and the mean multiplicative factor of each pixel's
    real LORs (P, V, X), float32, scaled to ``counts`` over the computed planes. Randoms follow the
    singles (hpc.physics.factors) and make ``phys.randoms`` of the computed prompts, as study_means."""
    sc = tof_scanner(layout)
    plane, ra, rb = layout.ring_pairs
    n = layout.planes if planes is None else max(1, min(planes, layout.planes))
    t, (v, x) = layout.tof_bins, layout.slice_shape
    trues = np.zeros((t, layout.planes, v, x), np.float32)
    shape = np.zeros((layout.planes, v, x), np.float32)  # randoms up to a constant
    mult = np.zeros((layout.planes, v, x), np.float32)
    rates = SC.single_rates(sc, ph, phys) if phys.randoms > 0 else None
    real_pairs = np.bincount(plane, weights=~(G.virtual_ring(sc, ra) | G.virtual_ring(sc, rb)),
                             minlength=layout.planes)  # (P,)
    real_views = G.transaxial_valid(sc).reshape(layout.views, layout.view_mashing, x).sum(1)  # (V, X)

    def real(planes: np.ndarray) -> np.ndarray:  # (n, V, X) real LORs per pixel
        return np.maximum(real_pairs[planes, None, None] * real_views[None], 1).astype(np.float32)

    per_plane = np.bincount(plane, minlength=layout.planes)
    todo = np.arange(n)
    while todo.size:  # a few planes (whole: their ring pairs) at a time
        k = max(1, int(np.searchsorted(np.cumsum(per_plane[todo]), PAIRS_PER_CHUNK, side="right")))
        chunk, todo = todo[:k], todo[k:]
        sel = np.isin(plane, chunk)
        m = SC.study_means(sc, ph, (), None, dataclasses.replace(phys, randoms=0.0), pairs=(ra[sel], rb[sel]))
        local = plane[sel] - chunk[0]
        trues[:, chunk] = _compress(m.expected, local, k, layout)
        mult[chunk] = _compress(m.mult, local, k, layout) / real(chunk)
        if rates is not None:
            shape[chunk] = _compress(PH.randoms_shape(sc, rates, ra[sel], rb[sel]), local, k, layout)
    body = trues[:, :n].sum(0) > 0
    randoms = np.zeros_like(trues)
    if rates is not None:
        total = phys.randoms / (1 - phys.randoms) * float(trues[:, :n].sum(dtype=np.float64))
        randoms[:, :n] = shape[None, :n] * np.float32(total / max(float(shape[:n].sum(dtype=np.float64)), 1e-30) / t)
    expected = trues
    expected[:, :n] += randoms[:, :n]
    # a count level is per LOR: a compressed pixel sums real(p) of them
    per_lor = expected[:, :n].sum(0) / real(np.arange(n)) if isinstance(counts, str) else expected[:, :n].sum(0)
    scale = np.float32(PH.body_scale(sc, counts, per_lor, body))
    expected[:, :n] *= scale  # the planes past n were never touched: zeros the OS has not allocated
    randoms[:, :n] *= scale
    return SC.Means(expected, randoms, mult)


def thin_dead_blocks(layout: P.Layout, counts: np.ndarray, blocks, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(gapped counts (T, P, V, X), measured fractions (P, V, X) float32) for dead ``blocks``: each
    pixel keeps each count with the probability that its LOR survived (binomial thinning by the
    surviving fraction of its real LORs, exact for Poisson counts in the equal-LOR approximation)."""
    frac = P.dead_fractions(layout, blocks)
    gapped = counts.copy()
    part = frac < 1
    for t in range(counts.shape[0]):
        gapped[t][part] = rng.binomial(counts[t][part], frac[part]).astype(counts.dtype)
    return gapped, frac


def storage_tof(x: np.ndarray, fmt: str) -> np.ndarray:
    """(T, ...) with TOF bins in ascending timing position -> the file's storage order (Siemens:
    0, +1, -1, +2, -2, ...; STIR: ascending)."""
    t = x.shape[0]
    if fmt != "siemens" or t == 1:
        return x
    return x[[k + t // 2 for k in P.siemens_timing_order(t)]]


def plain(layout: P.Layout, planes: int | None) -> bool:
    """A span-1, unmashed, full layout: the planes hpc.simulate.simulate.study_means computes itself."""
    sc = layout.scanner
    return (layout.span == 1 and layout.view_mashing == 1 and planes is None and layout.bins == sc.bins
            and layout.tof_bins == sc.tof_bins and all(
                lo == hi == s for s, lo, hi in zip(layout.segments, layout.min_rd, layout.max_rd, strict=True))
            and all(n == sc.rings - abs(s) for s, n in zip(layout.segments, layout.axial_counts, strict=True)))


def central_planes(layout: P.Layout, n: int) -> P.Layout:
    """The layout of the ``n`` central planes of ``layout``'s segment 0 (STIR centres a segment's
    axial positions on the scanner, so a shorter segment 0 is those planes); ValueError naming
    what fits when ``n`` does not."""
    k = layout.segments.index(0)
    full = layout.axial_counts[k]
    if not 1 <= n <= full:
        raise ValueError(f"segment 0 of this layout has {full} planes; ask for 1..{full}")
    if layout.compressed(k) and n % 2 == 0:
        raise ValueError(f"segment 0 of this span-{layout.span} layout has its {full} planes at half-ring steps "
                         f"centred on the scanner: the central planes are an odd count ({n - 1} or {n + 1}), "
                         "or use --span 1")
    if not layout.compressed(k) and (full - n) % 2:
        parity = "an even" if full % 2 == 0 else "an odd"
        raise ValueError(f"segment 0 of this span-1 layout has one plane per ring ({full}), centred on the "
                         f"scanner: the central planes are {parity} count ({max(n - 1, 1)} or {min(n + 1, full)})")
    return P.Layout(layout.scanner, (0,), (layout.min_rd[k],), (layout.max_rd[k],), (n,), layout.view_mashing,
                    layout.bins, layout.tof_bins)


def reaching_blocks(layout: P.Layout) -> np.ndarray | None:
    """None when every block reaches some plane of ``layout`` (a scanner's full layout), else the
    blocks that reach its middle plane (an axial block of their ring meets a ring pair of that
    plane): in a cut of a few central planes (--planes) such a block leaves gaps in the planes around
    the middle, and not only partly lost bins at an edge."""
    n_trans, n_blocks = G.block_counts(layout.scanner)
    blocks = np.arange(n_blocks)
    a, b, real = layout.pair_table  # (P, K) axial blocks of each plane's ring pairs
    if np.isin(blocks // n_trans, np.concatenate([a[real > 0], b[real > 0]])).all():
        return None
    mid = layout.planes // 2
    ok = real[mid] > 0
    return blocks[np.isin(blocks // n_trans, np.concatenate([a[mid][ok], b[mid][ok]]))]


def sample(layout: P.Layout, ph: Phantom, counts: float | str, phys: SC.Physics, planes: int | None,
           rng: np.random.Generator, study_id: str) -> tuple[SC.Means, np.ndarray]:
    """(means, Poisson prompts (T, P, V, X) uint16) of a study in ``layout``; only the computed
    planes are drawn (the others are 0)."""
    means = layout_means(layout, ph, counts, phys, planes)
    n = layout.planes if planes is None else min(planes, layout.planes)
    full = np.zeros(means.expected.shape, np.uint16)
    full[:, :n] = SC.to_uint16(rng.poisson(means.expected[:, :n]), study_id)
    return means, full


def add_layout_arguments(p: argparse.ArgumentParser) -> None:
    lay = p.add_argument_group("sinogram layout (default: the scanner's own, e.g. mMR span 11 / 837 planes, "
                               "mCT span 11 x 168 views x 13 TOF bins)")
    lay.add_argument("--span", type=int, help="axial compression (1 = every ring pair its own plane)")
    lay.add_argument("--max-ring-diff", type=int, help="largest ring difference stored")
    lay.add_argument("--max-segment", type=int, help="keep segments |k| <= K only (smaller files)")
    lay.add_argument("--view-mashing", type=int, help="uncompressed views summed per stored view")
    lay.add_argument("--tof-mashing", type=int, help="TOF bins summed per stored bin (0 = non-TOF)")
    lay.add_argument("--planes", type=int, metavar="N",
                     help="keep only the N central planes of segment 0 (the files hold N planes at the scanner's "
                          "real transaxial size; odd N for span-compressed layouts; STIR headers)")


def layout_from_args(args: argparse.Namespace, sc: G.Scanner) -> P.Layout:
    """The layout the options ask for (hpc.physics.projdata.cti_layout; with --planes its central
    planes of segment 0, :func:`central_planes`); InputError naming the problem."""
    if args.planes is not None and args.planes < 1:
        raise InputError(f"--planes must be >= 1, got {args.planes}")
    if args.planes is not None and args.max_segment not in (None, 0):
        raise InputError(f"--planes {args.planes} keeps planes of segment 0 only; "
                         f"drop --max-segment {args.max_segment}")
    try:
        layout = P.cti_layout(sc, args.span, args.max_ring_diff, args.view_mashing, args.tof_mashing, args.max_segment)
    except ValueError as exc:
        raise InputError(f"--span/--max-ring-diff/--view-mashing/--tof-mashing on {sc.name}: {exc}") from None
    if args.planes is None:
        return layout
    try:
        return central_planes(layout, args.planes)
    except ValueError as exc:
        raise InputError(f"--planes {args.planes} on {sc.name}: {exc}") from None
