"""Detector resolution: a Gaussian blur across the bins of each view, wider off centre.

A photon pair is not detected exactly on its line of response: positron range, non-collinearity,
the crystal's width and (off centre) depth of interaction spread it over neighbouring bins. We model
that spread as a Gaussian in the radial coordinate s whose FWHM grows with |s| (parallax):

    fwhm(s) = fwhm0 * sqrt(1 + (s / r0)^2)

With the mMR's defaults (fwhm0 4.3 mm, r0 210 mm) that is 4.3 / 4.76 / 5.93 mm at 0 / 100 / 200 mm,
the range published for the mMR's transaxial resolution (NEMA NU 2: ~4.3 mm at 1 cm, ~5-6 mm off
centre). At the mMR's 2.09 mm bins that spreads a point over 2-3 bins; at the demo's 8.2 mm bins it is
below one bin, which is why the 2-D demo could ignore it.

The blur is one (X, X) matrix per scanner, K[out, in]: a detection whose true radial position is bin
``in`` lands in bin ``out`` with probability K[out, in]. Columns sum to 1 (no counts are lost: what
would fall outside the outermost bins is put back into them). It acts on the last axis of any
(..., V, X) array, ``blur(sino, K) = sino @ K.T``; its adjoint is ``sino @ K``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import erf

from hpc.physics import geometry as G

FWHM0_MM = 4.3  # at the centre of the field of view (mMR, NEMA NU 2)
R0_MM = 210.0  # radius at which the FWHM has grown by sqrt(2)
SIGMA_PER_FWHM = 1 / (2 * math.sqrt(2 * math.log(2)))


def fwhm_mm(s_mm: np.ndarray, fwhm0_mm: float = FWHM0_MM, r0_mm: float = R0_MM) -> np.ndarray:
    """FWHM (mm) of the radial blur at radial offset ``s_mm`` (any shape)."""
    if fwhm0_mm < 0 or r0_mm <= 0:
        raise ValueError(f"blur: fwhm0_mm must be >= 0 and r0_mm > 0, got {fwhm0_mm} and {r0_mm}")
    return fwhm0_mm * np.sqrt(1 + (np.asarray(s_mm, np.float64) / r0_mm) ** 2)


def bin_positions(sc: G.Scanner) -> np.ndarray:
    """(X,) radial position s (mm) of every bin (the same in every view: ``lor_coordinates``)."""
    return np.asarray(G.lor_coordinates(sc)[1][0], np.float64)


def blur_matrix(sc: G.Scanner, fwhm0_mm: float = FWHM0_MM, r0_mm: float = R0_MM) -> np.ndarray:
    """(X, X) float64 K[out, in]: the bin-to-bin spread of ``sc``'s detectors; identity if fwhm0 is 0.

    Each column is the Gaussian of its input bin's width integrated over the output bins' extents
    (edges halfway between bin centres), so a blur narrower than a bin stays close to the identity
    instead of aliasing."""
    s = bin_positions(sc)  # (X,)
    if fwhm0_mm == 0:
        return np.eye(len(s))
    mid = (s[1:] + s[:-1]) / 2
    edges = np.concatenate([[-np.inf], mid, [np.inf]])  # (X + 1,): the outer bins take the tails
    sigma = fwhm_mm(s, fwhm0_mm, r0_mm) * SIGMA_PER_FWHM  # (X,) per input bin
    z = (edges[:, None] - s[None, :]) / (sigma[None, :] * math.sqrt(2))  # (X + 1, X_in)
    return np.diff(0.5 * (1 + erf(z)), axis=0)  # (X_out, X_in), columns sum to 1


def blur(sino: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Blur (..., V, X) along its bins with ``k`` (X, X) from ``blur_matrix``."""
    return sino @ k.T


def blur_adjoint(sino: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The exact adjoint of ``blur``: <blur(a), b> = <a, blur_adjoint(b)>."""
    return sino @ k
