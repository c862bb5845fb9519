"""The physics of a simulated acquisition beyond line integrals: attenuation coefficients, detector
efficiencies (normalisation), randoms, and count levels. Phantom-free, numpy only; hpc.simulate.simulate
combines them with its phantoms:

    prompts ~ Poisson(k * m * trues_geom + r)      expected = k * m * trues_geom + r

- attenuation: ``acf = exp(-integral of mu)`` along each LOR (mu at 511 keV per mm: ``MU``), the
  attenuation factor every true coincidence on that LOR survives with;
- normalisation: crystal efficiencies ``eff[ring, crystal]`` (log-normal scatter times a block profile,
  0 for virtual crystals), fixed per scanner like a real scanner's normalisation; a LOR's efficiency is
  the product of its two crystals'; ``m = eff_a * eff_b * acf`` (STIR's multiplicative factors);
- randoms: ``r_ab = c * S_a * S_b`` with singles ``S`` per crystal from the fan sums of the attenuated
  direct-plane trues plus a uniform part (activity outside the field of view), times the crystal's
  efficiency: smooth, non-zero outside the body, spread evenly over TOF bins; ``c`` sets the randoms
  fraction of the prompts;
- count levels: ``COUNT_LEVELS`` in mean prompts per LOR through the body, for a LOR of the mMR's
  size (2.09 mm bins, 4.06 mm rings); other scanners scale by their bin area (bigger LORs collect more).
  ``clinical`` is a clinical span-1 mMR scan (the issue's estimate: ~1.65 per in-body bin).
Scatter is not simulated.
"""
from __future__ import annotations

import zlib

import numpy as np

from hpc.physics import geometry as G

MU = {"soft tissue": 0.0096, "lung": 0.0030, "bone": 0.0130}  # per mm at 511 keV (water 0.0096)
EFFICIENCY_SIGMA = 0.08  # log-normal scatter of crystal efficiencies
BLOCK_PROFILE = 0.10  # edge crystals of a block are this much less efficient (quadratic profile)
SINGLES_FLOOR = 0.5  # uniform part of the singles, as a fraction of the mean fan sum
MMR_LOR_MM2 = 2.08626 * 4.0625  # bin size x ring spacing of the reference LOR
COUNT_LEVELS = {"low": 0.4, "clinical": 1.65, "high": 16.5, "very-high": 165.0}


def crystal_efficiencies(sc: G.Scanner, sigma: float = EFFICIENCY_SIGMA, profile: float = BLOCK_PROFILE
                         ) -> np.ndarray:
    """(rings, N) efficiencies, mean 1 over real crystals, 0 for virtual ones; the same for every
    study on a scanner (seeded by its name), like the normalisation a scanner is calibrated with.
    ``sigma = profile = 0``: ideal detectors (1 on every real crystal)."""
    rng = np.random.default_rng(zlib.crc32(sc.name.encode()))
    n = sc.detectors_per_ring
    pos = np.arange(n) % sc.block_trans - sc.virtual_trans  # position among the block's real crystals
    real = sc.block_trans - sc.virtual_trans
    u = (pos - (real - 1) / 2) / max((real - 1) / 2, 1)  # -1 .. 1 across the real crystals of a block
    eff = np.exp(rng.normal(0, sigma, (sc.rings, n))) * (1 - profile * u ** 2)
    virtual = G.virtual_crystal(sc, np.arange(n))[None, :] | G.virtual_ring(sc, np.arange(sc.rings))[:, None]
    eff[virtual] = 0.0  # STIR's virtual crystals: first of each transaxial block, last rings of an axial block
    return eff / eff[~virtual].mean()


def lor_product(sc: G.Scanner, per_crystal: np.ndarray, ring_a: np.ndarray, ring_b: np.ndarray) -> np.ndarray:
    """(P, V, X) product ``q[ring_a, crystal a] * q[ring_b, crystal b]`` of a per-crystal quantity
    ``q`` (rings, N) for the planes joining ``ring_a`` and ``ring_b`` (P,)."""
    view, bin = np.meshgrid(np.arange(sc.views), np.arange(sc.bins), indexing="ij")
    ca, cb = G.sino_to_lor(sc, view, bin)  # (V, X); crystal a sits in ring_a
    ra, rb = np.asarray(ring_a)[:, None, None], np.asarray(ring_b)[:, None, None]
    return per_crystal[ra, ca[None]] * per_crystal[rb, cb[None]]


def fan_sums(sc: G.Scanner, sino: np.ndarray) -> np.ndarray:
    """(..., N) sum over every LOR with an end at each crystal of sinograms (..., V, X)."""
    view, bin = np.meshgrid(np.arange(sc.views), np.arange(sc.bins), indexing="ij")
    ca, cb = G.sino_to_lor(sc, view, bin)
    flat = sino.reshape(-1, sc.views * sc.bins)
    n = sc.detectors_per_ring
    out = np.stack([np.bincount(ca.ravel(), w, n) + np.bincount(cb.ravel(), w, n) for w in flat])
    return out.reshape(*sino.shape[:-2], n)


def singles(sc: G.Scanner, direct_trues: np.ndarray, eff: np.ndarray) -> np.ndarray:
    """(rings, N) singles rates (arbitrary units) from the attenuated trues of each ring's direct
    plane (rings, V, X): fan sum plus a uniform floor, times the crystal's efficiency."""
    f = fan_sums(sc, direct_trues)
    return eff * (f + SINGLES_FLOOR * f.mean(axis=1, keepdims=True))


def randoms_shape(sc: G.Scanner, single_rates: np.ndarray, ring_a: np.ndarray, ring_b: np.ndarray) -> np.ndarray:
    """(P, V, X) randoms up to a constant: S_a * S_b (2 tau S_a S_b for a coincidence window tau)."""
    return lor_product(sc, single_rates, ring_a, ring_b)


def body_scale(sc: G.Scanner, level: str | float, expected: np.ndarray, body: np.ndarray) -> float:
    """Factor that brings ``expected`` (any units) to the count level: a preset of ``COUNT_LEVELS``
    (mean prompts per in-body LOR, scaled to this scanner's LOR size) or a number = total counts.
    ``body``: bool, where LORs cross the body (same shape as ``expected`` or broadcastable)."""
    total = float(expected.sum())
    if isinstance(level, str):
        if level not in COUNT_LEVELS:
            raise ValueError(f"count level {level!r}: valid {', '.join(COUNT_LEVELS)} or a number of counts")
        per_lor = COUNT_LEVELS[level] * sc.bin_size_mm * sc.ring_spacing_mm / MMR_LOR_MM2
        in_body = np.broadcast_to(body, expected.shape)
        return per_lor / max(float(expected[in_body].mean()), 1e-30)
    return float(level) / max(total, 1e-30)
