"""Repair baselines that involve no learning, all on the same slices as the network:

- ``linear``: per view, linear interpolation along the radial bins;
- ``biharmonic``: 2-D biharmonic inpainting (scikit-image);
- ``axial3d``: 3-D linear interpolation in the stack of planes of one segment: along the axial
  direction, the views and the radial bins, each between the nearest measured pixels on both sides,
  combined with weights 1 / (distance between those two pixels), so the shortest bridge dominates
  (a dead block usually leaves the same (view, bin) measured a few planes away);
(the physics baseline, reproject, is hpc.baselines.reproject).

Pixels are described by the measured fraction ``w`` (1 measured, 0 a gap, in between a partly lost
span-compressed bin; a binary mask is a special case) and ``valid`` (False: the LOR joins virtual
crystals only, never data). Every baseline uses the fully measured valid pixels (w = 1) as its
data, estimates a model value ``m`` at the others, and returns ``y + (1 - w) m`` there (the measured
counts kept, the lost fraction added; ``m`` for a gap); measured pixels are returned unchanged and
invalid ones as 0. Arrays are numpy (V, X) / (P, V, X) float64; registered (hpc.registry.BASELINES)
with the signature of hpc.baselines.stack.Baseline.
"""
from __future__ import annotations

import numpy as np

from hpc.baselines.stack import Stack, per_slice
from hpc.registry import BASELINES

EPS = 1e-12


def _prepare(x: np.ndarray, w: np.ndarray, valid: np.ndarray | None, ndim: int, who: str
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x float64, w float64, valid bool, source bool) broadcast to x's shape."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    if x.ndim != ndim or w.shape != x.shape:
        raise ValueError(f"{who}: expected image and mask of the same {ndim}-D shape, got {x.shape} and {w.shape}")
    v = np.ones(x.shape, bool) if valid is None else np.broadcast_to(np.asarray(valid) > 0, x.shape)
    return x, w, v, (w >= 1) & v


def _combine(x: np.ndarray, w: np.ndarray, valid: np.ndarray, model: np.ndarray) -> np.ndarray:
    """Measured kept, ``y + (1 - w) m`` elsewhere, 0 on invalid pixels."""
    out = np.where(w >= 1, x, np.where(w > 0, x, 0.0) + (1 - np.clip(w, 0, 1)) * model)
    return np.where(valid, out, 0.0)


def axis_interp(x: np.ndarray, src: np.ndarray, axis: int) -> tuple[np.ndarray, ...]:
    """Along ``axis``: for every pixel the linear interpolation between the nearest source pixels
    before and after it (a source pixel is its own). Returns (estimate, span between the two
    sources, has both, nearest source value or 0 if none on that line)."""
    x, src = np.moveaxis(x, axis, -1), np.moveaxis(src, axis, -1)
    n = x.shape[-1]
    idx = np.broadcast_to(np.arange(n), x.shape)
    prev = np.maximum.accumulate(np.where(src, idx, -1), axis=-1)
    nxt = np.flip(np.minimum.accumulate(np.flip(np.where(src, idx, n), -1), axis=-1), -1)
    has_p, has_n = prev >= 0, nxt < n
    vp = np.take_along_axis(x, np.clip(prev, 0, n - 1), -1)
    vn = np.take_along_axis(x, np.clip(nxt, 0, n - 1), -1)
    span = (nxt - prev).astype(np.float64)
    t = np.where(has_p & has_n, (idx - prev) / np.maximum(span, 1), 0.0)
    est = vp + (vn - vp) * t
    nearest = np.where(has_p & (~has_n | (idx - prev <= nxt - idx)), vp, np.where(has_n, vn, 0.0))
    both = has_p & has_n
    return tuple(np.moveaxis(a, -1, axis) for a in (np.where(both, est, 0.0), np.where(both, span, np.inf),
                                                     both, nearest))


def linear_interp_radial(x: np.ndarray, mask: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Each view (row) interpolated linearly along the radial bins between the nearest measured bins;
    beyond the outermost measured bin its value is held; a view with nothing measured is 0.
    x, mask (V, X) -> float64 (V, X)."""
    x, w, v, src = _prepare(x, mask, valid, 2, "linear_interp_radial")
    est, _, both, nearest = axis_interp(x, src, axis=1)
    return _combine(x, w, v, np.where(both, est, nearest))


def biharmonic_inpaint(x: np.ndarray, mask: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """2-D biharmonic inpainting (skimage.restoration.inpaint_biharmonic) of every pixel that is not
    a measured valid one (virtual-crystal zeros are inpainted too, then zeroed, so they never drag
    the fill down). x, mask (V, X) -> float64 (V, X); no measured pixel -> zeros."""
    from skimage.restoration import inpaint_biharmonic  # heavy import, only when used

    x, w, v, src = _prepare(x, mask, valid, 2, "biharmonic_inpaint")
    if src.all():
        return x.copy()
    if not src.any():
        return np.zeros_like(x)
    return _combine(x, w, v, inpaint_biharmonic(np.where(src, x, 0.0), ~src))


def axial3d_interp(stack: np.ndarray, mask: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """3-D interpolation in the planes (P, V, X) of one segment, in axial order (see module doc).
    Falls back to the nearest measured radial bin where no axis has measured pixels on both sides."""
    x, w, v, src = _prepare(stack, mask, valid, 3, "axial3d_interp")
    num, den = np.zeros_like(x), np.zeros_like(x)
    for axis in (0, 1, 2):
        if x.shape[axis] < 3:
            continue
        est, span, both, _ = axis_interp(x, src, axis)
        weight = np.where(both, 1.0 / np.maximum(span, 1.0), 0.0)  # span 0: a source pixel itself
        num += weight * est
        den += weight
    _, _, _, nearest = axis_interp(x, src, 2)
    return _combine(x, w, v, np.where(den > 0, num / np.maximum(den, EPS), nearest))


# order: the tables list the strongest first (reproject is 0)
BASELINES.register("linear", per_slice=True, order=30)(per_slice(linear_interp_radial))
BASELINES.register("biharmonic", per_slice=True, order=20)(per_slice(biharmonic_inpaint))


@BASELINES.register("axial3d", order=10)
def axial3d(stack: Stack, planes: np.ndarray) -> np.ndarray:
    """3-D interpolation in the segment's stack of planes (axial3d_interp), the requested planes."""
    if "axial3d" not in stack.memo:  # one interpolation of the whole stack, whichever planes are asked for
        stack.memo["axial3d"] = axial3d_interp(stack.y, stack.w, stack.valid)
    return stack.memo["axial3d"][planes]
