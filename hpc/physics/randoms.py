"""Randoms from delayed coincidences: maximum-likelihood singles from the delayeds' fan sums, then
the expected randoms ``r_ab = s_a s_b`` of every bin (the idea of STIR's
``find_ML_singles_from_delayed_sino``, re-derived; no code copied).

Why not the delayeds themselves: they are an unbiased but noisy randoms estimate (Poisson, ~0.1
count per LOR in a clinical mMR scan); randoms are smooth, a product of the two crystals' singles
rates (r = 2 tau S_a S_b). With one number per crystal fitted to all delayeds, the estimate is
nearly noise-free.

Model: the delayeds on a stored LOR between crystals i and j are Poisson with mean ``s_i s_j``.
Their fan sums ``F_i`` (delayeds with an end at crystal i, from the list mode: span 1, no view
mashing, so each crystal pair is one bin) are sufficient, and the likelihood is maximal where
``s_i * sum_{j in fan(i)} s_j = F_i``. The fan of crystal (ring r, c) is every crystal (r', c')
with |r - r'| within the stored ring differences and (c, c') a stored (view, bin), so the sums are
two small matrix products: ``D = band @ s @ fan`` with ``fan = M + M^T``, M[c, c'] = 1 where some
stored (view, bin) joins c (in ring_a) to c' (in ring_b). Iterating ``s <- sqrt(s F / D(s))``
converges to it (the plain ``s <- F / D(s)`` oscillates between a s and s / a).
"""
from __future__ import annotations

import numpy as np

from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.physics.factors import lor_product

PLANES_PER_BATCH = 16  # (pairs, U, X) float64 temporaries: ~6 x 87k x 8 B per plane on the mMR


def fan_matrix(sc: G.Scanner, bins: int | None = None) -> np.ndarray:
    """(N, N) symmetric: 1 where a stored (view, bin) joins the two crystals (either end first)."""
    n = sc.detectors_per_ring
    v, b = np.meshgrid(np.arange(sc.views), np.arange(bins or sc.bins), indexing="ij")
    ca, cb = G.sino_to_lor(sc, v, b)
    m = np.zeros((n, n))
    m[ca.ravel(), cb.ravel()] = 1.0
    return m + m.T


def ring_band(rings: int, max_ring_diff: int) -> np.ndarray:
    """(R, R) 1 where |r - r'| <= max_ring_diff: the ring pairs a span-1 file stores."""
    r = np.arange(rings)
    return (np.abs(r[:, None] - r[None, :]) <= max_ring_diff).astype(np.float64)


def ml_singles(fansums: np.ndarray, layout: P.Layout, iterations: int = 50,
               tol: float = 1e-7) -> tuple[np.ndarray, int]:
    """(singles (R, N), iterations used): ML fit of ``s_i s_j`` to delayed fan sums ``fansums``
    (R, N), counted on the LORs of ``layout`` (the list mode's: span 1, its maximum ring
    difference and bins). Crystals with no delayeds (virtual ones) get 0."""
    sc = layout.scanner
    if any(layout.compressed(k) for k in range(len(layout.segments))) or layout.view_mashing != 1:
        raise ValueError("ML singles need the fan sums of span-1, unmashed data")
    f = np.asarray(fansums, np.float64)
    if f.shape != (sc.rings, sc.detectors_per_ring) or (f < 0).any():
        raise ValueError(f"fan sums must be non-negative, shape {(sc.rings, sc.detectors_per_ring)}; got {f.shape}")
    fan, band = fan_matrix(sc, layout.bins), ring_band(sc.rings, max(layout.max_rd))
    s = np.sqrt(f)  # any positive start: the first update fixes the scale
    for it in range(1, iterations + 1):
        d = band @ s @ fan  # (R, N) expected fan sum / s_i
        new = np.sqrt(s * np.divide(f, d, out=np.zeros_like(f), where=d > 0))
        change = np.abs(new - s).max() / max(new.max(), 1e-30)
        s = new
        if change < tol:
            return s, it
    return s, iterations


def randoms(singles: np.ndarray, layout: P.Layout, planes: np.ndarray | None = None) -> np.ndarray:
    """(n, V, X) float32 expected randoms ``sum over ring pairs and mashed views of s_a s_b`` of
    ``planes`` (None: all) of ``layout`` (non-TOF; spread them evenly over TOF bins)."""
    sc = layout.scanner
    if layout.bins != sc.bins:
        raise ValueError(f"layout with {layout.bins} bins: randoms need the scanner's {sc.bins}")
    planes = np.arange(layout.planes) if planes is None else np.asarray(planes, np.int64).reshape(-1)
    pl, ra, rb = layout.ring_pairs
    first = np.searchsorted(pl, np.arange(layout.planes + 1))
    out = np.empty((planes.size, layout.views, layout.bins), np.float32)
    for s in range(0, planes.size, PLANES_PER_BATCH):
        batch = planes[s:s + PLANES_PER_BATCH]
        pairs = np.concatenate([np.arange(first[p], first[p + 1]) for p in batch])
        lor = lor_product(sc, singles, ra[pairs], rb[pairs])  # (K, U, X) one per ring pair
        starts = np.searchsorted(pl[pairs], batch)  # each plane's first row in `pairs`
        per_plane = np.add.reduceat(lor, starts, axis=0)  # (n, U, X)
        out[s:s + batch.size] = per_plane.reshape(batch.size, layout.views, layout.view_mashing, -1).sum(2)
    return out


def delayed_fan_sums(delayeds: np.ndarray, layout: P.Layout) -> np.ndarray:
    """(R, N) fan sums of a span-1 delayed sinogram (P, V, X) of ``layout`` (tests; the list-mode
    reader counts them event by event, without the span-1 sinogram)."""
    sc = layout.scanner
    _, ra, rb = layout.ring_pairs
    v, b = np.meshgrid(np.arange(sc.views), np.arange(layout.bins), indexing="ij")
    ca, cb = G.sino_to_lor(sc, v, b)
    out = np.zeros((sc.rings, sc.detectors_per_ring))
    d = np.asarray(delayeds, np.float64).reshape(layout.planes, -1)
    np.add.at(out, (np.repeat(ra, ca.size), np.tile(ca.ravel(), ra.size)), d.ravel())
    np.add.at(out, (np.repeat(rb, cb.size), np.tile(cb.ravel(), rb.size)), d.ravel())
    return out
