"""Estimated correction factors for simulated studies: what a repair or reconstruction method is
given, with stated errors, while the simulator keeps the truth (``hpc simulate --preset realistic``).

A real scan's factors are themselves measured or modelled, never exact:
- normalisation: crystal efficiencies from a finite normalisation scan, each off by a random
  relative error (log-normal, ``EFF_ERROR`` = 2 %);
- attenuation: an MR-based mu-map has no bone (bone is soft tissue there) and is misregistered by
  a few mm (``MU_SHIFT_MM`` along x);
- randoms: maximum-likelihood singles (hpc.physics.randoms) fitted to noisy delayed fan sums;
- scatter: a model that is off by a fraction (``SCATTER_ERROR`` = -15 %: estimate = 0.85 x truth).
"""
from __future__ import annotations

import copy

import numpy as np

from hpc.physics import factors as F
from hpc.physics import projdata as P
from hpc.physics import randoms as PR
from hpc.simulate.phantom import Phantom

EFF_ERROR = 0.02  # relative error of each crystal's estimated efficiency
MU_SHIFT_MM = 3.0  # misregistration of the estimated mu-map (x, mm)
SCATTER_ERROR = -0.15  # relative error of the scatter estimate
ML_ITERATIONS = 200


def efficiencies(eff: np.ndarray, error: float, rng: np.random.Generator) -> np.ndarray:
    """(rings, N) estimated efficiencies: each real crystal's true one times exp(N(0, error));
    virtual crystals stay 0. ValueError for a negative error."""
    if error < 0:
        raise ValueError(f"efficiency error must be >= 0, got {error}")
    return eff * np.exp(rng.normal(0, error, eff.shape)) if error > 0 else eff.copy()


def mu_phantom(ph: Phantom, shift_mm: float, bone: bool = False) -> Phantom:
    """The phantom as its estimated mu-map sees it: every ellipse moved by ``shift_mm`` along x and,
    unless ``bone``, bone rows (mu above soft tissue's) set to soft tissue. Activity is unchanged
    but unused: only the mu of the result is projected."""
    est = copy.deepcopy(ph)
    est.body[0] += shift_mm
    est.organs[:, 0] += shift_mm
    bone_delta = F.MU["bone"] - F.MU["soft tissue"]
    if not bone:
        rows = np.isclose(est.organs[:, 8], bone_delta)
        est.organs[rows, 8] = 0.0
    return est


def span1(layout: P.Layout) -> P.Layout:
    """The span-1, unmashed layout of every ring pair of ``layout`` (what delayeds are counted in)."""
    mrd = max(max(layout.max_rd), -min(layout.min_rd))
    return P.cti_layout(layout.scanner, 1, mrd, 1, 0)


def randoms_estimate(layout: P.Layout, singles: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """(randoms estimate (P, V, X) float64, info) for true randoms ``s_a s_b`` of ``singles`` (R, N)
    (counts^0.5: the randoms of a bin are the sum over its LORs of s_a s_b): delayed fan sums drawn
    from Poisson with their expected values, ML singles fitted to them, randoms re-formed."""
    one = span1(layout)
    sc = layout.scanner
    s = np.asarray(singles, np.float64)
    expected_fans = s * (PR.ring_band(sc.rings, max(one.max_rd)) @ s @ PR.fan_matrix(sc, one.bins))  # (R, N)
    fans = rng.poisson(expected_fans).astype(np.float64)
    s_hat, iters = PR.ml_singles(fans, one, ML_ITERATIONS, 1e-9)
    return PR.randoms(s_hat, layout).astype(np.float64), {"delayeds": float(fans.sum() / 2), "ml_iterations": iters}


def scatter_estimate(scatter: np.ndarray, error: float) -> np.ndarray:
    """(1 + error) x the true scatter; ValueError for error <= -1."""
    if error <= -1:
        raise ValueError(f"scatter error must be > -1, got {error}")
    return scatter * (1 + error)
