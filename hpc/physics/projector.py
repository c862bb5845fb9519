"""Ray-driven (Joseph) projector of one sinogram plane, in torch, with its exact adjoint.

Every stored LOR is traced between the positions of its two crystals (``hpc.physics.geometry.lor_endpoints``,
so the projector follows the geometry's (view, bin) <-> detector-pair convention, whatever it is).
Joseph's method (Joseph 1982, IEEE TMI 1:192): step along the ray's major axis one pixel column (or
row) at a time; at each step the image is interpolated linearly between the two pixels that straddle
the ray on the minor axis, weighted by the step's length along the ray, ``pixel / |cos|``. Samples
outside the image or outside the chord between the crystals contribute nothing. With TOF the
contribution of each sample is split over the TOF bins with the Gaussian timing kernel of
``hpc.physics.geometry.tof_kernel`` (what fraction of an emission at that point lands in each bin), so the
TOF bins of a LOR sum to its non-TOF projection.

The system matrix is built once (numpy, vectorised, in chunks of LORs) and held as two CSR matrices,
A and its transpose with the same values, so ``adjoint`` is the exact transpose of ``forward``
(<A x, y> = <x, A^T y> up to float summation order). Both run batched on the CPU or a GPU:

    P = Projector(sc)                         # image sc.bins x sc.bins of sc.bin_size_mm pixels
    sino = P.forward(img)                     # (..., ny, nx) -> (..., V, X)   [(..., T, V, X) with tof]
    back = P.adjoint(sino)                    # (..., V, X) -> (..., ny, nx)

A plane of a 3-D scan is treated as a 2-D slice (the simulator's model too): an oblique plane's
chords are longer by its tilt factor, a per-plane scalar the caller applies (``plane_tilt``).
Memory: two CSR matrices of ~12 bytes per non-zero (int64 column, float32 value), ~1.7 non-zeros per
LOR per pixel of image side (measured on the demo scanner: 453,100 for 4096 LORs x 64, 11 MB), so
~1.2 GB for the mMR (86,688 LORs, 344 x 344 pixels; the build needs a few times that for a moment);
pass a coarser ``ImageGrid`` to shrink it. Not supported yet: view mashing (stored views summing
several uncompressed ones); span planes are treated as one 2-D plane each.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy.special import ndtr

from hpc.physics import geometry as G

CHUNK_ENTRIES = 4_000_000  # samples per build chunk (x 2 neighbours x ~40 bytes of temporaries)


@dataclass(frozen=True)
class ImageGrid:
    """A square-pixel image centred on the scanner axis: pixel [i, j] at (x[j], y[i]) mm."""
    ny: int
    nx: int
    pixel_mm: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.ny, self.nx

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """(x (nx,), y (ny,)) pixel-centre coordinates in mm."""
        return ((np.arange(self.nx) - (self.nx - 1) / 2) * self.pixel_mm,
                (np.arange(self.ny) - (self.ny - 1) / 2) * self.pixel_mm)

    def fov_mask(self, radius_mm: float) -> np.ndarray:
        """(ny, nx) bool: pixel centres inside the circle of ``radius_mm``."""
        x, y = self.centres()
        return x[None, :] ** 2 + y[:, None] ** 2 <= radius_mm ** 2


def ellipse_image(ell: np.ndarray, grid: ImageGrid, oversample: int = 4) -> np.ndarray:
    """(ny, nx) mean value over each pixel of ellipses ``ell`` (E, 6): x, y, a, b, rotation, value
    (the simulator's cross-sections), summed where they overlap; ``oversample``^2 points per pixel."""
    o = oversample
    sub = (np.arange(o) - (o - 1) / 2) * grid.pixel_mm / o
    xc, yc = grid.centres()
    x = (xc[:, None] + sub[None, :]).reshape(-1)  # (nx * o,)
    y = (yc[:, None] + sub[None, :]).reshape(-1)
    img = np.zeros((y.size, x.size))
    for x0, y0, a, b, rot, val in np.asarray(ell, np.float64).reshape(-1, 6):
        c, s = math.cos(rot), math.sin(rot)
        dx, dy = x[None, :] - x0, y[:, None] - y0
        img += val * (((dx * c + dy * s) / a) ** 2 + ((dy * c - dx * s) / b) ** 2 <= 1)
    return img.reshape(grid.ny, o, grid.nx, o).mean(axis=(1, 3))


def default_grid(sc: G.Scanner, size: int = 0, pixel_mm: float = 0.0) -> ImageGrid:
    """``size`` x ``size`` pixels (default: the scanner's bins) covering the transaxial field of view
    (default pixel: the bin size at the centre, so the image just covers the stored bins)."""
    size = size or sc.bins
    return ImageGrid(size, size, pixel_mm or sc.bin_size_mm * sc.bins / size)


def plane_tilt(sc: G.Scanner, ring_a: np.ndarray, ring_b: np.ndarray) -> np.ndarray:
    """Chord-length factor of oblique planes, (P,): sqrt(1 + (ring difference x spacing / 2R)^2) at the
    centre of the field of view (the simulator uses the exact per-LOR factor; the difference is
    below 0.1 % on the presets' oblique segments used here)."""
    dz = (np.asarray(ring_b) - np.asarray(ring_a)) * sc.ring_spacing_mm
    return np.sqrt(1 + (dz / (2 * sc.radius_mm)) ** 2)


def _joseph(p0: np.ndarray, p1: np.ndarray, major: np.ndarray, minor: np.ndarray, pixel: float
            ) -> tuple[np.ndarray, ...]:
    """Joseph samples of rays p0 -> p1 (L, 2) stepping along coordinate 0 (``major`` pixel centres)
    and interpolating along coordinate 1 (``minor`` centres). Returns flat arrays (ray, major index,
    minor index, weight, sample x, sample y) with the two interpolation neighbours of every sample."""
    d = p1 - p0  # (L, 2)
    t = (major[None, :] - p0[:, :1]) / d[:, :1]  # (L, M) ray parameter at each column
    pos = p0[:, 1:2] + t * d[:, 1:2]  # (L, M) minor coordinate of the sample
    step = pixel * np.hypot(d[:, 0], d[:, 1]) / np.abs(d[:, 0])  # (L,) length along the ray per column
    r = (pos - minor[0]) / pixel
    lo = np.floor(r)
    w = r - lo
    ray, col = np.nonzero((t >= 0) & (t <= 1))
    out = []
    for k, frac in ((lo, 1 - w), (lo + 1, w)):
        k_, f_ = k[ray, col].astype(np.int64), frac[ray, col] * step[ray]
        keep = (k_ >= 0) & (k_ < minor.size) & (f_ > 0)
        r_, c_ = ray[keep], col[keep]
        out.append((r_, c_, k_[keep], f_[keep], major[c_], pos[r_, c_]))
    return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))


def joseph_entries(sc: G.Scanner, grid: ImageGrid, views: np.ndarray) -> tuple[np.ndarray, ...]:
    """Non-zeros of the non-TOF system matrix for the LORs of ``views`` (rows ``view_pos * X + bin``):
    (rows, pixel indices ``i * nx + j``, weights, sample x, sample y)."""
    pa, pb = G.lor_endpoints(sc)
    pa, pb = pa[views].reshape(-1, 2), pb[views].reshape(-1, 2)  # (L, 2)
    xc, yc = grid.centres()
    d = pb - pa
    x_major = np.abs(d[:, 0]) >= np.abs(d[:, 1])
    rows, pix, val, sx, sy = [], [], [], [], []
    chunk = max(1, CHUNK_ENTRIES // max(grid.nx, grid.ny))
    for sel, swap in ((np.flatnonzero(x_major), False), (np.flatnonzero(~x_major), True)):
        for a in range(0, sel.size, chunk):
            idx = sel[a:a + chunk]
            p0, p1 = pa[idx], pb[idx]
            if swap:  # step along y (rows), interpolate along x
                ray, i, j, w, py, px = _joseph(p0[:, ::-1], p1[:, ::-1], yc, xc, grid.pixel_mm)
            else:
                ray, j, i, w, px, py = _joseph(p0, p1, xc, yc, grid.pixel_mm)
            rows.append(idx[ray]), pix.append(i * grid.nx + j), val.append(w), sx.append(px), sy.append(py)
    return tuple(np.concatenate(v) for v in (rows, pix, val, sx, sy))


def tof_split(sc: G.Scanner, views: np.ndarray, rows: np.ndarray, pix: np.ndarray, val: np.ndarray,
              sx: np.ndarray, sy: np.ndarray, tol: float = 1e-7) -> tuple[np.ndarray, ...]:
    """(rows, pixels, weights) of the TOF matrix from the non-TOF entries: row ``k * (views x X) + row``
    for TOF bin k, each sample's weight times
    the fraction of an emission at (sx, sy) that TOF bin k records; fractions below ``tol`` dropped
    (they sum to 1 over k up to that)."""
    phi, _ = G.lor_coordinates(sc)
    phi = phi[views].reshape(-1)[rows]
    along = -sx * np.sin(phi) + sy * np.cos(phi)  # position on d = (-sin phi, cos phi) from the midpoint
    sigma, edges = G.tof_kernel(sc)
    cdf = ndtr((edges[:, None] - along[None, :]) / sigma)  # (T+1, n)
    frac = np.diff(cdf, axis=0)  # (T, n)
    k, e = np.nonzero(frac > tol)
    return k * (views.size * sc.bins) + rows[e], pix[e], val[e] * frac[k, e]


def _csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int],
         dtype: torch.dtype) -> torch.Tensor:
    coo = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(vals),
                                  shape, check_invariants=False).coalesce()
    with warnings.catch_warnings():  # torch calls sparse CSR beta; CSR @ dense (CPU, CUDA) is what we use
        warnings.simplefilter("ignore", UserWarning)
        return coo.to_sparse_csr().to(dtype)


class Projector:
    """Joseph forward projector and its adjoint for the planes of scanner ``sc`` (see module doc).

    ``views``: only these views (OSEM subsets), in this order; ``tof``: one row block per TOF bin.
    """

    def __init__(self, sc: G.Scanner, grid: ImageGrid | None = None, *, tof: bool = False,
                 views: np.ndarray | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.scanner, self.grid = sc, grid or default_grid(sc)
        self.views = np.arange(sc.views) if views is None else np.asarray(views, np.int64)
        self.tof_bins = sc.tof_bins if tof else 1
        if tof and sc.tof_bins < 2:
            raise ValueError(f"scanner {sc.name!r} has no TOF bins")
        rows, pix, val, sx, sy = joseph_entries(sc, self.grid, self.views)
        if tof:
            rows, pix, val = tof_split(sc, self.views, rows, pix, val, sx, sy)
        n_rows, n_pix = self.tof_bins * self.views.size * sc.bins, self.grid.ny * self.grid.nx
        self.nnz = int(val.size)
        self.A = _csr(rows, pix, val, (n_rows, n_pix), torch.float64).to(dtype)
        self.AT = _csr(pix, rows, val, (n_pix, n_rows), torch.float64).to(dtype)  # same values, transposed
        self.to(device)

    @property
    def sino_shape(self) -> tuple[int, ...]:
        v = (self.views.size, self.scanner.bins)
        return (self.tof_bins, *v) if self.tof_bins > 1 else v

    def to(self, device: torch.device | str) -> Projector:
        self.A, self.AT = self.A.to(device), self.AT.to(device)
        self.device = self.A.device
        return self

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """(..., ny, nx) -> (..., [T,] V, X) line integrals (activity x mm)."""
        if tuple(img.shape[-2:]) != self.grid.shape:
            raise ValueError(f"projector: image {tuple(img.shape[-2:])} is not the grid's {self.grid.shape}")
        lead = img.shape[:-2]
        with one_thread(self.device):
            out = self.A @ img.reshape(-1, self.grid.ny * self.grid.nx).T.to(self.A.dtype).contiguous()
        return out.T.reshape(*lead, *self.sino_shape)

    def adjoint(self, sino: torch.Tensor) -> torch.Tensor:
        """(..., [T,] V, X) -> (..., ny, nx): the exact transpose of ``forward``."""
        k = len(self.sino_shape)
        if tuple(sino.shape[-k:]) != self.sino_shape:
            raise ValueError(f"projector: sinogram {tuple(sino.shape[-k:])} is not {self.sino_shape}")
        lead = sino.shape[:-k]
        with one_thread(self.device):
            out = self.AT @ sino.reshape(-1, math.prod(self.sino_shape)).T.to(self.AT.dtype).contiguous()
        return out.T.reshape(*lead, *self.grid.shape)


@contextmanager
def one_thread(device: torch.device):
    """One intra-op CPU thread for the projector and OSEM's many small ops: with the 2 cores shared,
    a batch's reprojection fill took 4.5-5.5 s with 2 OpenMP threads and 0.67 s with 1 (threads
    spinning in barriers); the toggle costs under a microsecond. GPUs are unaffected."""
    old = torch.get_num_threads()
    if device.type != "cpu" or old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cached_projector(sc: G.Scanner, grid: ImageGrid | None = None, tof: bool = False, subset: int = 0,
                     subsets: int = 1, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> Projector:
    """A shared projector for the views ``subset::subsets`` (OSEM subset ``subset`` of ``subsets``)."""
    return _cached(sc, grid or default_grid(sc), tof, subset, subsets, str(torch.device(device)), dtype)


@lru_cache(maxsize=32)
def _cached(sc: G.Scanner, grid: ImageGrid, tof: bool, subset: int, subsets: int, device: str,
            dtype: torch.dtype) -> Projector:
    return Projector(sc, grid, tof=tof, views=np.arange(subset, sc.views, subsets), device=device, dtype=dtype)
