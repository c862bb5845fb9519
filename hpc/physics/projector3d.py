"""Matrix-free 3-D ray-driven (Joseph) projector of a span-compressed slab, in torch, with its exact adjoint.

Every LOR of every ring pair of a layout is traced between its two crystals in 3-D: the transaxial
endpoints are ``hpc.physics.geometry.lor_endpoints`` (d1 in ring_a, d2 in ring_b), the axial ones
the rings' positions. A stored plane is the SUM of the LORs of its ring pairs
(``hpc.physics.projdata.Layout.ring_pairs``) and a stored view the sum of its mashed views, as in
hpc.simulate.layout.

The volume (nz, ny, nx) covers the rings the layout's ring pairs touch, r0 .. r1: its z voxels are
half a ring spacing (STIR's convention), voxel k at ring r0 + k / 2, so nz = 2 (r1 - r0) + 1 and ring r
sits exactly on voxel 2 (r - r0); it is centred on the slab. Transaxially it is an
``hpc.physics.projector.ImageGrid`` (square pixels centred on the axis; default 2x the bin size over
the field of view, see ``default_volume``).

Joseph's method (as hpc.physics.projector, in 3-D): step along the LOR's major transaxial axis one
pixel column at a time; each sample interpolates bilinearly between the 2 pixels straddling the ray
on the minor axis and the 2 z voxels straddling its axial position (z varies linearly along the
LOR); the step's weight is its 3-D length, ``pixel * |d| / |d_major|`` with d the 3-D direction.
Samples outside the chord or the grid weigh 0. On a direct plane (ring_a == ring_b) the axial
position is a voxel centre, so the projection equals the 2-D projector's on the same grid.

Nothing is stored but the endpoints: indices and weights are recomputed per chunk (a few views x a
few ring pairs, ``CHUNK_SAMPLES`` samples), on the tensors' device. ``forward`` gathers with them,
``adjoint`` index_adds the same weights at the same indices, so <A x, y> = <x, A^T y> up to float
summation order. Detector blur (hpc.physics.blur) is optional: forward ``blur(A x)``, adjoint
``A^T blur_adjoint(y)``.

    P = Projector3D(layout)                 # all stored views; views=... for an OSEM subset
    sino = P.forward(vol)                   # (..., nz, ny, nx) -> (..., planes, V_subset, X)
    back = P.adjoint(sino)                  # (..., planes, V_subset, X) -> (..., nz, ny, nx)

Cost (mMR 8-ring span-11 slab: 21 planes, 64 ring pairs, 252 x 344 LORs each, 142 x 142 x 15 voxels,
one shared CPU core): one full forward or adjoint ~12-25 s, peak temporaries 0.33 GB (forward) and
0.44 GB (adjoint) above the process's, set by ``chunk_samples``; nothing grows with the number of
views or ring pairs. Per chunk the work is one transaxial gather of each sample's z column (2 x nz),
then per ring difference d one batched matmul (LORs) of the columns with the (S, 2 |d| + 2) axial
weights, so ring pairs of one difference share it.

Not supported: TOF (ValueError), stored bins other than the scanner's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hpc.physics import blur as BL
from hpc.physics import geometry as G
from hpc.physics.projdata import Layout
from hpc.physics.projector import ImageGrid

CHUNK_SAMPLES = 500_000  # transaxial samples (LORs x steps) per chunk: 0.33 / 0.44 GB forward / adjoint (mMR slab)


@dataclass(frozen=True)
class Volume:
    """The voxel grid of a slab: ``grid`` transaxially, ``nz`` half-ring z planes from ring ``ring0``."""
    grid: ImageGrid
    nz: int
    ring0: int
    dz_mm: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.nz, self.grid.ny, self.grid.nx


def layout_rings(layout: Layout) -> tuple[int, int]:
    """(first, last) ring the layout's ring pairs touch."""
    _, ra, rb = layout.ring_pairs
    return int(min(ra.min(), rb.min())), int(max(ra.max(), rb.max()))


def default_volume(layout: Layout, size: int = 0, pixel_mm: float = 0.0) -> Volume:
    """The slab's volume: z voxels of half the ring spacing over its rings; transaxially square pixels
    of ``pixel_mm`` (default: 2x the bin size, 4.17 mm on the mMR; the detector blur is 4.3-6 mm FWHM)
    and ``size`` x ``size`` of them (default: the fewest, even, that cover the field of view of the
    stored bins, 142 on the mMR; with only ``size`` given: pixels covering the bins' extent)."""
    sc = layout.scanner
    if size and not pixel_mm:
        pixel_mm = sc.bin_size_mm * sc.bins / size
    pixel_mm = pixel_mm or 2 * sc.bin_size_mm
    size = size or 2 * math.ceil(sc.fov_radius_mm / pixel_mm)
    r0, r1 = layout_rings(layout)
    return Volume(ImageGrid(size, size, pixel_mm), 2 * (r1 - r0) + 1, r0, sc.ring_spacing_mm / 2)


class Projector3D:
    """Joseph 3-D projector of ``layout``'s planes over ``volume`` (see module doc).

    ``views``: only these stored views (an OSEM subset), in this order; ``blur``: model the detector
    blur of hpc.physics.blur; ``dtype``: of the weights and outputs (float64 for exact tests)."""

    def __init__(self, layout: Layout, volume: Volume | None = None, *, views: np.ndarray | None = None,
                 blur: bool = False, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 chunk_samples: int = CHUNK_SAMPLES):
        sc = layout.scanner
        if layout.tof_bins > 1:
            raise ValueError(f"projector3d: TOF layouts ({layout.tof_bins} TOF bins) are not supported")
        if layout.bins != sc.bins:
            raise ValueError(f"projector3d: layout stores {layout.bins} bins, scanner {sc.name!r} has {sc.bins}")
        self.layout, self.volume = layout, volume or default_volume(layout)
        g = self.volume.grid
        if g.nx != g.ny:
            raise ValueError(f"projector3d: the transaxial grid must be square, got {g.ny} x {g.nx}")
        r0, r1 = layout_rings(layout)
        if self.volume.ring0 > r0 or self.volume.ring0 + (self.volume.nz - 1) / 2 < r1:
            raise ValueError(f"projector3d: volume (rings {self.volume.ring0}.., {self.volume.nz} z voxels) does "
                             f"not cover the layout's rings {r0}..{r1}")
        self.views = np.arange(layout.views) if views is None else np.asarray(views, np.int64)
        if self.views.size == 0 or self.views.min() < 0 or self.views.max() >= layout.views:
            raise ValueError(f"projector3d: views must be in [0, {layout.views})")
        self.device, self.dtype = torch.device(device), dtype
        self.chunk_samples = int(chunk_samples)
        m = layout.view_mashing
        uviews = (self.views[:, None] * m + np.arange(m)[None]).reshape(-1)  # (Vs * m,) uncompressed
        pa, pb = G.lor_endpoints(sc)  # (U, X, 2) each
        self._pa = torch.from_numpy(pa[uviews]).to(self.device)  # (Vs * m, X, 2) float64
        self._pb = torch.from_numpy(pb[uviews]).to(self.device)
        plane, ra, rb = layout.ring_pairs
        self._pairs = (plane, ra - self.volume.ring0, rb - ra)  # (M,) plane, ring offset, ring difference
        self._blur = torch.from_numpy(BL.blur_matrix(sc)).to(self.device, dtype) if blur else None

    @property
    def sino_shape(self) -> tuple[int, int, int]:
        return self.layout.planes, self.views.size, self.layout.bins

    # ------------------------------------------------------------ samples
    def _view_chunks(self) -> list[slice]:
        """Stored-view slices of about ``chunk_samples`` transaxial samples (LORs x nx steps) each."""
        per_view = self.layout.view_mashing * self.layout.bins * self.volume.grid.nx
        step = max(1, self.chunk_samples // per_view)
        return [slice(v, min(v + step, self.views.size)) for v in range(0, self.views.size, step)]

    def _transaxial(self, vs: slice) -> tuple[torch.Tensor, ...]:
        """Joseph samples of the LORs of stored views ``vs``: pix (L, S, 2) pixel indices ``i * nx + j``
        of the 2 minor neighbours, w (L, S, 2) their transaxial step-length weights (as the 2-D
        projector's), t (L, S) the ray parameter from d1 (0) to d2 (1), dxy (L,) the transaxial chord
        length; L = views x mashing x X LORs, S = nx steps."""
        g, m = self.volume.grid, self.layout.view_mashing
        p0 = self._pa[vs.start * m:vs.stop * m].reshape(-1, 2)  # (L, 2)
        p1 = self._pb[vs.start * m:vs.stop * m].reshape(-1, 2)
        delta = p1 - p0
        xmaj = delta[:, 0].abs() >= delta[:, 1].abs()  # (L,) step along x (columns), else y (rows)
        a0 = torch.where(xmaj, p0[:, 0], p0[:, 1])[:, None]  # major / minor coordinates (L, 1)
        da = torch.where(xmaj, delta[:, 0], delta[:, 1])[:, None]
        b0 = torch.where(xmaj, p0[:, 1], p0[:, 0])[:, None]
        db = torch.where(xmaj, delta[:, 1], delta[:, 0])[:, None]
        c = (torch.arange(g.nx, device=self.device, dtype=torch.float64) - (g.nx - 1) / 2) * g.pixel_mm  # (S,)
        t = (c[None, :] - a0) / da  # (L, S)
        r = (b0 + t * db - c[0]) / g.pixel_mm  # (L, S) minor coordinate in pixels
        lo = torch.floor(r)
        f = r - lo
        dxy = torch.hypot(delta[:, 0], delta[:, 1])  # (L,)
        step = g.pixel_mm * dxy / da[:, 0].abs()  # (L,) transaxial length per column
        k = torch.stack([lo, lo + 1], -1).long()  # (L, S, 2) minor index
        w = torch.stack([1 - f, f], -1) * step[:, None, None]
        inside = (t >= 0) & (t <= 1)
        w = torch.where(inside[..., None] & (k >= 0) & (k < g.nx), w, 0.0)
        k = k.clamp(0, g.nx - 1)
        col = torch.arange(g.nx, device=self.device)[None, :, None]  # (1, S, 1) major index
        pix = torch.where(xmaj[:, None, None], k * g.nx + col, col * g.nx + k)  # i * nx + j
        return pix, w.to(self.dtype), t, dxy

    def _axial(self, t: torch.Tensor, dxy: torch.Tensor, d: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Axial interpolation of ring difference d, the same for every ring pair of it: E (L, S, O)
        the weight of each sample's column at z offset ``omin + o`` from ring_a's voxel (2 non-zeros
        per sample: the z voxels straddling it, O = 2 |d| + 2 offsets), ``omin`` and the LORs' tilt
        factor |d_3D| / |d_xy| (L,) that turns transaxial step lengths into 3-D ones."""
        u = t * (2 * d)  # (L, S) z offset from ring_a's voxel, in voxels (half rings)
        zo = torch.floor(u)
        fz = u - zo
        omin, n_off = min(0, 2 * d), 2 * abs(d) + 2
        o = (zo - omin).long().clamp(0, n_off - 2)  # samples off the chord (t outside [0, 1]) weigh 0 anyway
        e = torch.zeros(*t.shape, n_off, device=self.device, dtype=self.dtype)
        e.scatter_(2, o[..., None], (1 - fz)[..., None].to(self.dtype))
        e.scatter_add_(2, o[..., None] + 1, fz[..., None].to(self.dtype))
        dz = d * self.layout.scanner.ring_spacing_mm
        return e, omin, torch.sqrt(1 + (dz / dxy) ** 2).to(self.dtype)

    def _pick(self, pairs: np.ndarray, omin: int, n_off: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where ring pairs ``pairs`` (Q,) read the (nz, O) table of axially summed columns: flat index
        (Q, O) of z voxel ``2 ring_a + omin + o`` and offset o, and a (Q, O) mask of those in the volume."""
        ring = torch.as_tensor(2 * self._pairs[1][pairs], device=self.device)[:, None]
        off = torch.arange(n_off, device=self.device)[None, :]
        z = ring + omin + off  # (Q, O)
        ok = (z >= 0) & (z < self.volume.nz)
        return z.clamp(0, self.volume.nz - 1) * n_off + off, ok.to(self.dtype)

    def _groups(self) -> list[tuple[int, np.ndarray]]:
        """(ring difference, its ring-pair indices) of every ring difference."""
        diff = self._pairs[2]
        return [(int(d), np.flatnonzero(diff == d)) for d in np.unique(diff)]

    # ------------------------------------------------------------ operators
    def forward(self, vol: torch.Tensor) -> torch.Tensor:
        """(..., nz, ny, nx) -> (..., planes, V_subset, X): line integrals (activity x mm) summed over
        each plane's ring pairs and each view's mashed views (then blurred, with ``blur``)."""
        if tuple(vol.shape[-3:]) != self.volume.shape:
            raise ValueError(f"projector3d: volume {tuple(vol.shape[-3:])} is not {self.volume.shape}")
        lead = vol.shape[:-3]
        nz = self.volume.nz
        # pixel-major, z last: a sample's z column is one contiguous row  (B, ny * nx, nz)
        xt = vol.reshape(-1, nz, self.volume.grid.ny * self.volume.grid.nx).to(self.device, self.dtype)
        xt = xt.transpose(1, 2).contiguous()
        b, (p, nv, nb), m = xt.shape[0], self.sino_shape, self.layout.view_mashing
        out = torch.zeros(b, p, nv, nb, device=self.device, dtype=self.dtype)
        plane = torch.as_tensor(self._pairs[0], device=self.device)
        for vs in self._view_chunks():
            pix, w, t, dxy = self._transaxial(vs)
            n_lor, s = t.shape
            # transaxially interpolated z columns of every sample  (B, L, S, nz)
            col = (xt[:, pix.reshape(-1)].view(b, n_lor, s, 2, nz) * w[None, ..., None]).sum(3)
            for d, pairs in self._groups():
                e, omin, tilt = self._axial(t, dxy, d)  # (L, S, O)
                # each sample's column summed into its 2 z offsets (a batched matmul over LORs)
                r = torch.einsum("blsz,lso->blzo", col, e).reshape(b, n_lor, -1)  # (B, L, nz * O)
                idx, ok = self._pick(pairs, omin, e.shape[2])  # (Q, O)
                vals = (r[:, :, idx.reshape(-1)].view(b, n_lor, *idx.shape) * ok).sum(-1) * tilt[:, None]  # (B, L, Q)
                vals = vals.view(b, vs.stop - vs.start, m, nb, len(pairs)).sum(2).permute(0, 3, 1, 2)  # (B, Q, v, X)
                out[:, :, vs].index_add_(1, plane[pairs], vals)
        if self._blur is not None:
            out = BL.blur(out, self._blur)
        return out.reshape(*lead, p, nv, nb)

    def adjoint(self, sino: torch.Tensor) -> torch.Tensor:
        """(..., planes, V_subset, X) -> (..., nz, ny, nx): the exact transpose of ``forward``."""
        if tuple(sino.shape[-3:]) != self.sino_shape:
            raise ValueError(f"projector3d: sinogram {tuple(sino.shape[-3:])} is not {self.sino_shape}")
        lead = sino.shape[:-3]
        y = sino.reshape(-1, *self.sino_shape).to(self.device, self.dtype)  # (B, P, V, X)
        if self._blur is not None:
            y = BL.blur_adjoint(y, self._blur)
        b, m, nz = y.shape[0], self.layout.view_mashing, self.volume.nz
        xt = torch.zeros(b, self.volume.grid.ny * self.volume.grid.nx, nz, device=self.device, dtype=self.dtype)
        for vs in self._view_chunks():
            pix, w, t, dxy = self._transaxial(vs)
            n_lor, s = t.shape
            col = torch.zeros(b, n_lor, s, nz, device=self.device, dtype=self.dtype)  # (B, L, S, nz)
            for d, pairs in self._groups():
                e, omin, tilt = self._axial(t, dxy, d)
                idx, ok = self._pick(pairs, omin, e.shape[2])  # (Q, O)
                part = y[:, self._pairs[0][pairs], vs].permute(0, 2, 3, 1)  # (B, v, X, Q): each pair reads its plane
                part = part[:, :, None].expand(-1, -1, m, -1, -1).reshape(b, n_lor, len(pairs)) * tilt[:, None]
                r = torch.zeros(b, n_lor, nz * e.shape[2], device=self.device, dtype=self.dtype)
                r.index_add_(2, idx.reshape(-1), (part[..., None] * ok).reshape(b, n_lor, -1))  # (B, L, nz * O)
                col += torch.einsum("blzo,lso->blsz", r.view(b, n_lor, nz, -1), e)
            spread = (col[:, :, :, None, :] * w[None, ..., None]).reshape(b, -1, nz)  # (B, L * S * 2, nz)
            xt.index_add_(1, pix.reshape(-1), spread)
        return xt.transpose(1, 2).reshape(*lead, *self.volume.shape)
