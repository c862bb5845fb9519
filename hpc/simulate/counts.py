"""Expected counts of a simulated study: exact line integrals of a phantom on a scanner's geometry
(non-arc-corrected, hpc.physics.geometry), TOF weights, attenuation, detector efficiencies and
randoms (hpc.physics.factors), scaled to a count level. No files, no randomness: the noise-free
means that hpc.simulate.simulate and hpc.simulate.layout draw Poisson counts from.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from hpc.errors import InputError
from hpc.physics import factors as F
from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.simulate.phantom import Phantom, ellipses_at, mu_at

UINT16_MAX = np.iinfo(np.uint16).max


def _phi_integral(x: np.ndarray) -> np.ndarray:
    """Antiderivative of the normal CDF: x Phi(x) + phi(x)."""
    return x * ndtr(x) + np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)


def tof_weights(sc: G.Scanner, l1: np.ndarray, l2: np.ndarray) -> np.ndarray:
    """(T, ...) fraction of a uniform segment [l1, l2] along the LOR (mm from its midpoint) that each
    TOF bin records: the bin's box convolved with the Gaussian timing kernel. The outer bins are
    open-ended, so the weights sum to 1 and TOF sums back to the non-TOF projection."""
    sigma, edges = G.tof_kernel(sc)
    far = 10 * sc.radius_mm / sigma  # beyond every chord: Phi is exactly 0 or 1 there
    edges = np.clip(edges / sigma, -far, far)
    length = np.maximum(l2 - l1, 1e-12) / sigma
    cdf = [_phi_integral(e - l1 / sigma) - _phi_integral(e - l2 / sigma) for e in edges]  # (T+1) x (...)
    return np.stack([(cdf[k + 1] - cdf[k]) / length for k in range(sc.tof_bins)])


def project(sc: G.Scanner, ell: np.ndarray, phi: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Line integrals of the ellipses ``ell`` (E, 6) along the LORs (phi, s) (V, X) -> (T, V, X).

    LOR: points s n + l d with n = (cos phi, sin phi), d = (-sin phi, cos phi); each ellipse is cut
    on l in [l1, l2] (a quadratic in l), contributing activity x chord length.
    """
    x0, y0, a, b, rot, act = (ell[:, i, None, None] for i in range(6))  # (E, 1, 1)
    cr, sr = np.cos(rot), np.sin(rot)
    n = np.cos(phi), np.sin(phi)
    d = -n[1], n[0]
    # direction and normal in each ellipse's frame, scaled by its semi-axes
    nx, ny = (n[0] * cr + n[1] * sr) / a, (-n[0] * sr + n[1] * cr) / b  # (E, V, X)
    dx, dy = (d[0] * cr + d[1] * sr) / a, (-d[0] * sr + d[1] * cr) / b
    s_rel = s - (x0 * n[0] + y0 * n[1])
    qa, qb, qc = dx * dx + dy * dy, s_rel * (nx * dx + ny * dy), s_rel ** 2 * (nx * nx + ny * ny) - 1
    root = np.sqrt(np.maximum(qb * qb - qa * qc, 0))
    if sc.tof_bins == 1:
        return (act * 2 * root / qa).sum(axis=0)[None]
    # TOF only where an ellipse is cut: most (ellipse, LOR) pairs miss the small organs
    e, v, x = np.nonzero(root > 0)
    half = root[e, v, x] / qa[e, v, x]
    l_mid = (x0 * d[0] + y0 * d[1])[e, v, x] - qb[e, v, x] / qa[e, v, x]  # chord midpoint on the LOR
    w = tof_weights(sc, l_mid - half, l_mid + half) * (act[e, 0, 0] * 2 * half)  # (T, hits)
    out = np.zeros((sc.tof_bins, sc.views * sc.bins))
    for k in range(sc.tof_bins):
        out[k] = np.bincount(v * sc.bins + x, weights=w[k], minlength=sc.views * sc.bins)
    return out.reshape(sc.tof_bins, sc.views, sc.bins)


def plane_integrals(sc: G.Scanner, ph: Phantom, ring_a: np.ndarray, ring_b: np.ndarray, sections=None
                    ) -> np.ndarray:
    """Line integrals (T, P, V, X) of the phantom (``sections(ph, z)``: ``ellipses_at`` for activity,
    ``mu_at`` for attenuation) for the planes joining ``ring_a`` and ``ring_b`` (P,). A plane samples
    the phantom at its mid-point and lengthens each chord by its tilt. LORs through virtual crystals
    get their geometric integral too: the detector efficiencies (hpc.physics.factors) zero them."""
    phi, s = G.lor_coordinates(sc)  # (V, X)
    chord = 2 * np.sqrt(np.maximum(sc.radius_mm ** 2 - s ** 2, 1e-9))
    sections = sections or ellipses_at
    out = np.empty((sc.tof_bins, len(ring_a), sc.views, sc.bins))
    ring_a, ring_b = np.asarray(ring_a), np.asarray(ring_b)
    for total in np.unique(ring_a + ring_b):  # ring pairs of one mid-point share its projection (span)
        flat = project(sc, sections(ph, ph.z0 + total / 2 * sc.ring_spacing_mm), phi, s)
        for p in np.flatnonzero(ring_a + ring_b == total):
            tilt = np.sqrt(1 + ((ring_b[p] - ring_a[p]) * sc.ring_spacing_mm / chord) ** 2)
            out[:, p] = flat * tilt
    # clip the ~1e-16 rounding residue of the TOF split where there is no activity at all
    return np.maximum(out, 0)


def expected_counts(sc: G.Scanner, ph: Phantom, segments: tuple[int, ...]) -> np.ndarray:
    """Noise-free projection (T, P, V, X) of a phantom's activity (geometric trues: no attenuation,
    normalisation or randoms), planes of ``segments`` in storage order; 0 through virtual crystals."""
    return plane_integrals(sc, ph, *P.plane_list(sc, segments)) * G.gap_mask(sc)


@dataclass(frozen=True)
class Physics:
    """What a simulated acquisition includes besides the geometric trues (see hpc.physics.factors)."""
    attenuation: bool = True  # exp(-integral of mu) on every LOR
    normalisation: bool = True  # crystal efficiencies (hpc.physics.factors.crystal_efficiencies)
    randoms: float = 0.25  # randoms fraction of the prompts (0 = none)


@dataclass
class Means:
    """The noise-free parts of a study, all scaled to its count level."""
    expected: np.ndarray  # (T, P, V, X) expected prompts = mult * trues + randoms
    randoms: np.ndarray  # (T, P, V, X) expected randoms (spread evenly over TOF bins)
    mult: np.ndarray  # (P, V, X) efficiency product x attenuation factor (0 through virtual crystals)


def efficiencies(sc: G.Scanner, phys: Physics) -> np.ndarray:
    return F.crystal_efficiencies(sc) if phys.normalisation else F.crystal_efficiencies(sc, 0.0, 0.0)


def single_rates(sc: G.Scanner, ph: Phantom, phys: Physics) -> np.ndarray:
    """(rings, N) singles of the study (from its attenuated direct-plane trues): what randoms follow."""
    flat = dataclasses.replace(sc, tof_bins=1, tof_mashing=1)
    rings = np.arange(sc.rings)
    direct = plane_integrals(flat, ph, rings, rings)[0]
    if phys.attenuation:
        direct = direct * np.exp(-plane_integrals(flat, ph, rings, rings, mu_at)[0])
    return F.singles(sc, direct, efficiencies(sc, phys))


def study_means(sc: G.Scanner, ph: Phantom, segments: tuple[int, ...], counts: float | str | None,
                phys: Physics = Physics(), pairs: tuple[np.ndarray, np.ndarray] | None = None,
                singles: np.ndarray | None = None) -> Means:
    """Expected prompts of a phantom: counts = total expected prompts, or a count level
    (hpc.physics.factors.COUNT_LEVELS: mean prompts per LOR through the body); None: unscaled. ``pairs``
    (ring_a, ring_b) instead of the span-1 planes of ``segments`` and precomputed ``singles``: how
    hpc.simulate.layout builds compressed planes from their ring pairs, a few at a time."""
    ra, rb = P.plane_list(sc, segments) if pairs is None else pairs
    trues = plane_integrals(sc, ph, ra, rb)  # (T, P, V, X) geometric
    flat = dataclasses.replace(sc, tof_bins=1, tof_mashing=1)  # attenuation and singles do not depend on TOF
    acf = np.exp(-plane_integrals(flat, ph, ra, rb, mu_at)[0]) if phys.attenuation else np.ones(trues.shape[1:])
    eff = efficiencies(sc, phys)
    mult = F.lor_product(sc, eff, ra, rb) * acf * G.gap_mask(sc)  # (P, V, X)
    trues = trues * mult
    randoms = np.zeros_like(trues)
    if phys.randoms > 0:
        rates = single_rates(sc, ph, phys) if singles is None else singles
        shape = F.randoms_shape(sc, rates, ra, rb)  # (P, V, X)
        total = phys.randoms / (1 - phys.randoms) * trues.sum()
        randoms = np.broadcast_to(shape * (total / shape.sum() / sc.tof_bins), trues.shape)
    expected = trues + randoms
    if counts is None:
        return Means(expected, randoms, mult)
    k = F.body_scale(sc, counts, expected.sum(axis=0), trues.sum(axis=0) > 0)  # per LOR, TOF bins summed
    return Means(expected * k, randoms * k, mult)


def to_uint16(x: np.ndarray, what: str) -> np.ndarray:
    """Counts as uint16; a count above 65535 is an error naming the maximum, never clipped."""
    peak = int(x.max())
    if peak > UINT16_MAX:
        raise InputError(f"--counts: {what} has a bin with {peak} counts, above the uint16 maximum "
                         f"{UINT16_MAX}; lower --counts")
    return x.astype(np.uint16)
