"""Mu-maps -> attenuation factors per sinogram bin, through the package's 2-D projector (files:
hpc.io.mumap reads STIR ``.hv`` and Siemens ``.v.hdr`` maps into a :class:`MuMap`).

Geometry (STIR's conventions, re-derived; no code copied): transaxially a pixel centre lies at
``first pixel offset + index x voxel size`` from the scanner axis (STIR's default offset,
``-(n // 2) x voxel``, puts index n // 2 on the axis). The map is resampled onto a grid centred on
the axis with the same pixel size (hpc.physics.projector.ImageGrid): a whole-pixel offset (the
default included) is an exact shift, a fractional one is interpolated linearly. Axially the middle
slice lies at the scanner's centre (STIR's ray-tracing projector), so with slices of half a ring
spacing slice ``k`` holds the planes with ring_a + ring_b = k + (nz - 1) - (R - 1).

Factors: ``exp(-integral of mu)`` along each LOR, in (0, 1] (the attenuation correction factor is
its inverse). A plane's 2-D line integrals come from :class:`hpc.physics.projector.Projector` on the
mu slice at the plane's axial centre (interpolated between slices), times the exact obliquity of
each ring pair, ``sqrt(1 + (ring difference x ring spacing / transaxial LOR length)^2)``; a span
plane averages its ring pairs' factors, a mashed view its views'. Exact where mu does not change
along z over the LOR's axial extent; an oblique LOR crossing an axial edge of the body is
approximated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.physics import projector as J

PLANES_PER_BATCH = 64  # mu slices projected at a time: (64, ny, nx) float32 + (64, V, X) line integrals


@dataclass(frozen=True)
class MuMap:
    """A mu-map: ``values`` (nz, ny, nx) in 1/cm, ``voxel_mm`` (dz, dy, dx); ``origin_mm`` (y0, x0):
    where the centre of pixel [0, 0] lies relative to the scanner axis (None: STIR's default,
    -(n // 2) voxels on each axis)."""
    values: np.ndarray
    voxel_mm: tuple[float, float, float]
    path: Path | None = None
    origin_mm: tuple[float, float] | None = None

    @property
    def origin(self) -> tuple[float, float]:
        if self.origin_mm is not None:
            return self.origin_mm
        _, ny, nx = self.values.shape
        return -(ny // 2) * self.voxel_mm[1], -(nx // 2) * self.voxel_mm[2]


def _axis_weights(n: int, pixel: float, first: float) -> np.ndarray:
    """(n', n) linear interpolation from ``n`` pixels whose first centre is at ``first`` mm onto an
    odd number n' of pixels of the same size centred on 0 that covers them (a shift when
    ``first / pixel`` is whole)."""
    extent = max(abs(first), abs(first + (n - 1) * pixel))
    half = int(math.ceil(extent / pixel - 1e-9))
    target = np.arange(-half, half + 1) * pixel  # (n',) centres
    f = (target - first) / pixel  # fractional source index of each target centre
    lo = np.floor(f + 1e-9).astype(np.int64)
    frac = np.clip(f - lo, 0.0, 1.0)
    frac[np.abs(frac) < 1e-9] = 0.0
    w = np.zeros((target.size, n))
    for idx, wt in ((lo, 1 - frac), (lo + 1, frac)):
        ok = (idx >= 0) & (idx < n) & (wt > 0)
        w[np.flatnonzero(ok), idx[ok]] += wt[ok]
    return w


def centred(mu: MuMap) -> tuple[np.ndarray, J.ImageGrid]:
    """(values (nz, ny', nx') in 1/mm on a grid centred on the scanner axis, that grid)."""
    dz, dy, dx = mu.voxel_mm
    if abs(dx - dy) > 1e-6 * dx:
        raise ValueError(f"mu-map voxels {dx} x {dy} mm: the projector needs square pixels")
    y0, x0 = mu.origin
    _, ny, nx = mu.values.shape
    wy, wx = _axis_weights(ny, dy, y0), _axis_weights(nx, dx, x0)
    v = wy @ (mu.values.astype(np.float64) / 10.0) @ wx.T  # (nz, ny', nx'), 1/cm -> 1/mm
    return v.astype(np.float32), J.ImageGrid(v.shape[1], v.shape[2], dx)


def plane_slices(mu: MuMap, values: np.ndarray, layout: P.Layout, planes: np.ndarray) -> np.ndarray:
    """(n, ny, nx) mu at the axial centre of each plane (linear between slices, 0 outside)."""
    sc = layout.scanner
    plane, ra, rb = layout.ring_pairs
    first = np.searchsorted(plane, planes)
    z = ((ra[first] + rb[first]) - (sc.rings - 1)) * sc.ring_spacing_mm / 2  # mm from the scanner centre
    k = z / mu.voxel_mm[0] + (values.shape[0] - 1) / 2  # fractional slice index
    lo = np.floor(k).astype(np.int64)
    w = (k - lo)[:, None, None]
    padded = np.concatenate([np.zeros_like(values[:1]), values, np.zeros_like(values[:1])])
    lo = np.clip(lo + 1, 0, padded.shape[0] - 2)  # slice -1 and nz are the zero pads
    return (1 - w) * padded[lo] + w * padded[lo + 1]


def transaxial_length(sc: G.Scanner) -> np.ndarray:
    """(U, X) distance in mm between the two crystals of every uncompressed LOR, in the ring plane."""
    pa, pb = G.lor_endpoints(sc)
    return np.hypot(*(pa - pb).transpose(2, 0, 1))


def obliquity(sc: G.Scanner, ring_diff: np.ndarray, d_t: np.ndarray) -> np.ndarray:
    """(K, U, X) chord-length factor of ring differences ``ring_diff`` (K,) on LORs of transaxial
    length ``d_t`` (U, X): a 3-D chord is the 2-D one times sqrt(1 + (dz / d_t)^2)."""
    dz = np.asarray(ring_diff, np.float64)[:, None, None] * sc.ring_spacing_mm
    return np.sqrt(1 + (dz / d_t) ** 2)


def attenuation_factors(mu: MuMap, layout: P.Layout, planes: np.ndarray | None = None,
                        projector: J.Projector | None = None) -> np.ndarray:
    """(n, V, X) float32 ``exp(-integral of mu)`` for ``planes`` (None: all) of ``layout`` (non-TOF;
    a TOF layout's bins share them)."""
    import torch  # the projector's tensors; numpy callers never pay for it otherwise

    sc = layout.scanner
    if layout.bins != sc.bins:
        raise ValueError(f"layout with {layout.bins} bins: attenuation factors need the scanner's {sc.bins}")
    values, grid = centred(mu)
    proj = projector or J.cached_projector(sc, grid)
    planes = np.arange(layout.planes) if planes is None else np.asarray(planes, np.int64).reshape(-1)
    pl, ra, rb = layout.ring_pairs
    first = np.searchsorted(pl, np.arange(layout.planes + 1))
    d_t = transaxial_length(sc)
    out = np.empty((planes.size, layout.views, layout.bins), np.float32)
    for s in range(0, planes.size, PLANES_PER_BATCH):
        batch = planes[s:s + PLANES_PER_BATCH]
        img = torch.from_numpy(plane_slices(mu, values, layout, batch).astype(np.float32))
        line = proj.forward(img).numpy().astype(np.float64)  # (n, U, X) 2-D line integrals
        for i, p in enumerate(batch):
            f = obliquity(sc, rb[first[p]:first[p + 1]] - ra[first[p]:first[p + 1]], d_t)  # (K, U, X)
            acf = np.exp(-line[i] * f).mean(0)  # ring pairs of a span plane: average
            out[s + i] = acf.reshape(layout.views, layout.view_mashing, sc.bins).mean(1)
    return out
