"""Scatter for simulated studies: a smooth, low-frequency additive component of the prompts.

Compton-scattered coincidences come from the attenuated activity but land on LORs far from where
they were emitted: their sinogram is a heavily smoothed image of the attenuated trues, with a broad
tail reaching past the body. We model it as the attenuated, blurred activity projection per LOR
(no detector efficiencies: those multiply the scatter too, but smoothly, and the methods receive
scatter as an additive term) convolved with a Gaussian across bins, views and axial positions,
plus a much wider Gaussian for the tail; then scaled so that scatter makes a chosen fraction of
the prompts in the body (:func:`scale_to_fraction`).

    shape = scatter_shape(layout, trues, lors)   # (P, V, X) scatter up to a constant
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from hpc.physics import projdata as P

CORE_FWHM_MM = 150.0  # across bins: scatter's core is broad (~half a body width)
TAIL_FWHM_MM = 500.0  # the tail reaches the edge of the field of view
TAIL_WEIGHT = 0.3  # share of the tail in the scatter
VIEW_FWHM_DEG = 30.0  # across views
AXIAL_FWHM_MM = 60.0  # across a segment's axial positions
FRACTION = 0.35  # default scatter fraction of the prompts in the body
FWHM_PER_SIGMA = 2 * np.sqrt(2 * np.log(2))
DECIMATE = 4  # coarse bins per sigma of the core kernel (_smooth)


def _smooth(x: np.ndarray, layout: P.Layout, fwhm_bins_mm: float) -> np.ndarray:
    """(P, V, X) -> the same, each segment's planes smoothed along (axial, view, bin); views wrap
    (view V is view 0 mirrored: the wrap is exact at the centre bin, close enough for a broad blur).
    Bins are smoothed on a grid DECIMATE x coarser than the core's sigma (block means, then linear
    interpolation back): the result is as smooth, and the wide kernels cost ~f x less."""
    sc = layout.scanner
    f = max(1, int(CORE_FWHM_MM / FWHM_PER_SIGMA / sc.bin_size_mm / DECIMATE))  # bins per coarse bin
    n_x = x.shape[-1]
    coarse = np.pad(x, ((0, 0), (0, 0), (0, -n_x % f))).reshape(*x.shape[:2], -1, f).mean(-1)
    out = np.empty_like(coarse)
    first = 0
    for k, n in enumerate(layout.axial_counts):
        step = sc.ring_spacing_mm / (2 if layout.compressed(k) else 1)  # compressed planes: half-ring steps
        sig = (AXIAL_FWHM_MM / step, VIEW_FWHM_DEG / 180 * layout.views, fwhm_bins_mm / sc.bin_size_mm / f)
        sig = tuple(s / FWHM_PER_SIGMA for s in sig)
        out[first:first + n] = gaussian_filter(coarse[first:first + n], sig, mode=("nearest", "wrap", "constant"))
        first += n
    pos = np.clip((np.arange(n_x) + 0.5) / f - 0.5, 0, coarse.shape[-1] - 1)  # fine bin -> coarse coordinate
    i0 = np.minimum(pos.astype(np.int64), coarse.shape[-1] - 1)
    i1 = np.minimum(i0 + 1, coarse.shape[-1] - 1)
    w = pos - i0
    return out[..., i0] * (1 - w) + out[..., i1] * w


def scatter_shape(layout: P.Layout, trues: np.ndarray, lors: np.ndarray) -> np.ndarray:
    """(P, V, X) scatter up to a constant from ``trues`` (P, V, X) attenuated (and blurred)
    activity summed over each bin's LORs and ``lors`` (P, V, X) the number of real LORs of each bin
    (scatter reaches real crystals only). Smoothing acts on the mean per LOR."""
    if trues.shape != lors.shape or trues.ndim != 3:
        raise ValueError(f"scatter_shape: trues {trues.shape} and lors {lors.shape} must be the same (P, V, X)")
    per_lor = trues / np.maximum(lors, 1)
    core = _smooth(per_lor, layout, CORE_FWHM_MM)
    tail = _smooth(per_lor, layout, TAIL_FWHM_MM)
    return ((1 - TAIL_WEIGHT) * core + TAIL_WEIGHT * tail) * lors


def scale_to_fraction(shape: np.ndarray, body: np.ndarray, prompts_in_body: float, fraction: float) -> np.ndarray:
    """``shape`` scaled so that its sum over ``body`` (bool, its last three axes' shape) is ``fraction`` x
    ``prompts_in_body``; ValueError for a fraction outside [0, 1) or a shape empty in the body."""
    if not 0 <= fraction < 1:
        raise ValueError(f"scatter fraction must be in [0, 1), got {fraction}")
    inside = float(shape[..., body].sum())  # shape (..., P, V, X), e.g. TOF bins first
    if fraction > 0 and not inside > 0:
        raise ValueError("scatter shape is 0 inside the body: nothing to scale")
    return shape * (fraction * prompts_in_body / inside) if fraction > 0 else np.zeros_like(shape)
