"""Denoising a low-dose scan without learning: the physicist's methods that `hpc evaluate --task
denoise` puts beside a trained network (docs/EVALUATION.md, "Denoising").

A low-dose acquisition keeps a fraction ``dose`` of the full scan's counts (binomial thinning, what a
shorter scan or a lower injected activity gives). Every denoiser estimates the FULL-dose expected
counts from it, in full-dose units, 0 on virtual-crystal LORs:

- ``scaled``: y / dose, the unbiased estimate itself (no denoising: the floor every method must beat);
- ``gauss``: Gaussian smoothing of the randoms-subtracted counts, normalised by the equally smoothed
  multiplicative factors (efficiency x attenuation), times the factors, plus the randoms:
  ``m * G(y / dose - r) / G(m) + r``. The crystal efficiencies and attenuation are sharp and known,
  the activity's line integrals are smooth: only the latter is smoothed. Views wrap with the radial
  mirror (view -1 is view V-1 reversed), as the sinogram's geometry does. Free parameter ``sigma``
  (bins), chosen on validation studies;
- ``reproject``: the low-dose data's own reconstruction (2-D OSEM, factors and randoms modelled)
  forward-projected, ``(m A x + dose r) / dose``. Free parameter ``iters`` (OSEM iterations of 4
  subsets), chosen on validation studies.

Registered in hpc.registry.DENOISERS with ``tune`` candidates and ``needs_scanner`` like the baselines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

from hpc.physics import recon as R
from hpc.registry import DENOISERS

SIGMAS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  # gauss's candidates (bins, both axes of a plane)
ITERS = (1, 2, 3, 4, 6, 8, 12, 16, 24)  # reproject's candidates, scored from one OSEM run


@dataclass
class LowDose:
    """One stack of planes of a low-dose study as a denoiser sees it, float64 (P, V, X) unless noted."""
    y: np.ndarray  # low-dose counts
    dose: float  # fraction of the full scan's counts the low-dose scan kept, in (0, 1]
    valid: np.ndarray  # bool: the pixel is a real line of response
    mult: np.ndarray | None = None  # multiplicative factors (efficiency x attenuation), when known
    randoms: np.ndarray | None = None  # additive background of the FULL-dose scan (randoms + scatter), when known
    scanner: object | None = None  # hpc.physics.geometry.Scanner, when known
    # name -> every parameter set it will be called with (set by the evaluation that tunes): an
    # iterative denoiser computes them all in one run and keeps them here
    planned: dict = field(default_factory=dict)
    memo: dict = field(default_factory=dict)


@DENOISERS.register("scaled", order=2)
def scaled(d: LowDose, planes: np.ndarray) -> np.ndarray:
    """The low-dose counts scaled to the full dose: unbiased, not denoised."""
    return np.where(d.valid[planes], d.y[planes] / d.dose, 0.0)


def smooth_views(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing (P, V, X) along views and bins (``sigma`` in bins), views continued past
    either end by the other end's views with the radial axis reversed (the sinogram's own wrap)."""
    pad = min(int(math.ceil(4 * sigma)), a.shape[1])
    ext = np.concatenate([a[:, -pad:, ::-1], a, a[:, :pad, ::-1]], axis=1)
    out = gaussian_filter1d(gaussian_filter1d(ext, sigma, axis=1, mode="constant"), sigma, axis=2, mode="constant")
    return out[:, pad:pad + a.shape[1]]


@DENOISERS.register("gauss", order=1, tune={"sigma": SIGMAS})
def gauss(d: LowDose, planes: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Smoothing of the activity's line integrals: ``m G(y / dose - r) / G(m) + r`` on real LORs."""
    v = d.valid[planes]
    m = np.where(v, 1.0 if d.mult is None else d.mult[planes], 0.0)
    r = 0.0 if d.randoms is None else d.randoms[planes]
    net = np.where(v, d.y[planes] / d.dose - r, 0.0)
    num, den = smooth_views(net, sigma), smooth_views(m, sigma)
    return np.where(v, m * num / np.maximum(den, 1e-12) + r, 0.0)


def _tensor(a: np.ndarray | None, planes: np.ndarray) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a[planes])).float()


@DENOISERS.register("reproject", order=0, needs_scanner=True, tune={"iters": ITERS})
def reproject(d: LowDose, planes: np.ndarray, iters: int = 4) -> np.ndarray:
    """The low-dose planes' own OSEM reconstruction, projected: ``(m A x + dose r) / dose``; the
    iteration counts planned for this stack come from one OSEM run."""
    key = ("reproject", tuple(planes.tolist()))
    if iters not in d.memo.get(key, {}):
        wanted = {int(p["iters"]) for p in d.planned.get("reproject", [])} | {int(iters)}
        m, v = _tensor(d.mult, planes), torch.from_numpy(np.ascontiguousarray(d.valid[planes])).float()
        add = None if d.randoms is None else _tensor(d.randoms, planes) * d.dose
        done: dict[int, np.ndarray] = {}

        def keep(it: int, x: torch.Tensor) -> None:
            if it in wanted:
                model = R.model_counts(d.scanner, x, mult=m, add=add)  # (n, V, X) low-dose expected counts
                done[it] = (model * v / d.dose).double().numpy()

        R.osem(d.scanner, _tensor(d.y, planes), max(wanted), R.REPROJECT_SUBSETS, weight=v, mult=m, add=add,
               callback=keep)
        d.memo[key] = done
    return d.memo[key][iters]
