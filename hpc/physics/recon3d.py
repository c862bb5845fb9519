"""Fully 3-D reconstruction of a span-compressed slab with the 3-D Joseph projector, and the
``reproject3d`` repair: OSEM over every plane at once (oblique ring pairs traced as oblique lines,
not as 2-D slices), projected into the gaps.

Model of the measured counts of every stored bin (plane, view, bin) of the slab:

    E[y] = w * (m * K A x + r)

A the 3-D projector (hpc.physics.projector3d: a plane sums its ring pairs' LORs) of the volume x, K the
detector blur (hpc.physics.blur; identity with ``blur=False``), m the multiplicative factors, r the
additive background, w the measured fraction (0: a gap or a virtual crystal; no likelihood there).
OSEM with subsets of stored views ``k::subsets``, as hpc.physics.recon.osem:

    x <- x / (A_S^T K^T (w m)) * A_S^T K^T (w m y / (w (m K A_S x + r)))

Voxels outside the transaxial field of view stay 0. ``reproject3d`` keeps the measured bins and fills
the rest with the model's expected counts (hpc.physics.recon.repair_with: y + (1 - w) (m K A x + r),
0 on invalid LORs).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from hpc.physics.projdata import Layout
from hpc.physics.projector3d import Projector3D, Volume, default_volume
from hpc.physics.recon import EPS, repair_with

SUBSETS = 4  # OSEM subsets of the reproject3d baseline (stored views k::4)


def subset_projectors(layout: Layout, volume: Volume, subsets: int, blur: bool, device: torch.device,
                      dtype: torch.dtype) -> list[Projector3D]:
    """The OSEM subsets' projectors (stored views ``k::subsets``); cheap: they hold only endpoints."""
    if not 1 <= subsets <= layout.views:
        raise ValueError(f"subsets must be in [1, {layout.views}] (stored views), got {subsets}")
    return [Projector3D(layout, volume, views=np.arange(k, layout.views, subsets), blur=blur, device=device,
                        dtype=dtype) for k in range(subsets)]


def _check(layout: Layout, y: torch.Tensor) -> None:
    want = (layout.planes, layout.views, layout.bins)
    if y.dim() not in (3, 4) or tuple(y.shape[-3:]) != want:
        raise ValueError(f"recon3d: sinograms must be ({want[0]}, {want[1]}, {want[2]}) planes x views x bins "
                         f"of the layout, optionally batched; got {tuple(y.shape)}")


def osem3d(layout: Layout, y: torch.Tensor, iters: int, subsets: int = SUBSETS, *,
           weight: torch.Tensor | None = None, mult: torch.Tensor | None = None, add: torch.Tensor | None = None,
           volume: Volume | None = None, blur: bool = True,
           callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Volumes (B, nz, ny, nx) from slabs ``y`` (B, P, V, X) (or one (P, V, X) -> (nz, ny, nx));
    ``weight``, ``mult``, ``add`` broadcast to ``y`` (module doc). ``callback(iteration, x)`` after
    each iteration (1-based). Float32 unless ``y`` is float64; runs on ``y``'s device."""
    _check(layout, y)
    single = y.dim() == 3
    y = y[None] if single else y
    dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    volume = volume or default_volume(layout)
    projs = subset_projectors(layout, volume, subsets, blur, y.device, dtype)
    y = y.to(dtype)
    w = torch.ones_like(y) if weight is None else weight.to(dtype).expand_as(y)
    wm = w if mult is None else w * mult.to(dtype)
    wr = None if add is None else w * add.to(dtype)  # the background of the measured fraction
    fov = torch.as_tensor(volume.grid.fov_mask(layout.scanner.fov_radius_mm), dtype=dtype, device=y.device)
    support = fov.expand(volume.shape)  # (nz, ny, nx)
    sens = [p.adjoint(wm[:, :, k::subsets]) * support for k, p in enumerate(projs)]  # (B, nz, ny, nx)
    total = sum(sens)
    x = support * ((wm * y).flatten(1).sum(1) / total.flatten(1).sum(1).clamp_min(EPS)).view(-1, 1, 1, 1)
    for it in range(1, iters + 1):
        for k, p in enumerate(projs):
            wm_k, y_k = wm[:, :, k::subsets], y[:, :, k::subsets]
            ybar = wm_k * p.forward(x)
            if wr is not None:
                ybar = ybar + wr[:, :, k::subsets]
            ratio = torch.where(wm_k > 0, wm_k * y_k / ybar.clamp_min(EPS), 0.0)
            x = x * p.adjoint(ratio) / sens[k].clamp_min(EPS) * (sens[k] > 0)
        if callback is not None:
            callback(it, x[0] if single else x)
    return x[0] if single else x


def model_counts3d(layout: Layout, x: torch.Tensor, *, mult: torch.Tensor | None = None,
                   add: torch.Tensor | None = None, volume: Volume | None = None, blur: bool = True) -> torch.Tensor:
    """Expected counts ``m K A x + r`` (..., P, V, X) of volumes x (..., nz, ny, nx)."""
    p = Projector3D(layout, volume or default_volume(layout), blur=blur, device=x.device, dtype=x.dtype)
    out = p.forward(x)
    if mult is not None:
        out = out * mult.to(out.dtype)
    return out if add is None else out + add.to(out.dtype)


def neg_log_likelihood(y: torch.Tensor, ybar: torch.Tensor, weight: torch.Tensor) -> float:
    """Poisson negative log-likelihood (up to a constant) over the bins with weight > 0:
    sum ybar - y log ybar, with ybar = w (m K A x + r) and y the measured counts."""
    keep = weight.expand_as(y) > 0
    yb = ybar[keep].double().clamp_min(EPS)
    return float((yb - y[keep].double() * torch.log(yb)).sum())


def _weights(y: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    w = weight.expand_as(y).to(dtype)
    return w if valid is None else w * valid.to(w.dtype)


def reproject3d(layout: Layout, y: torch.Tensor, weight: torch.Tensor, iters: int, subsets: int = SUBSETS, *,
                valid: torch.Tensor | None = None, mult: torch.Tensor | None = None, add: torch.Tensor | None = None,
                volume: Volume | None = None, blur: bool = True, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 3-D reconstruction baseline: OSEM of the whole slab y (P, V, X) (or (B, P, V, X)) from its
    measured bins only (weight 1 measured, 0 gap; valid 0 on virtual-crystal LORs), its expected counts
    in the gaps; returns the repaired slab in y's float dtype (the measured bins exactly y's values).
    ``dtype``: of the reconstruction (default: float64 for float64 y, else float32)."""
    return reproject3d_path(layout, y, weight, (iters,), subsets, valid=valid, mult=mult, add=add,
                            volume=volume, blur=blur, dtype=dtype)[iters]


def reproject3d_path(layout: Layout, y: torch.Tensor, weight: torch.Tensor, iterations: Sequence[int],
                     subsets: int = SUBSETS, *, valid: torch.Tensor | None = None, mult: torch.Tensor | None = None,
                     add: torch.Tensor | None = None, volume: Volume | None = None, blur: bool = True,
                     dtype: torch.dtype | None = None) -> dict[int, torch.Tensor]:
    """``reproject3d`` after each of ``iterations``, from one OSEM run: {iterations: repaired slab}."""
    if not iterations or min(iterations) < 1:
        raise ValueError(f"reproject3d: iteration counts must be >= 1, got {list(iterations)}")
    dtype = dtype or (torch.float64 if y.dtype == torch.float64 else torch.float32)
    w = _weights(y, weight, valid, dtype)
    volume = volume or default_volume(layout)
    keep, out = set(iterations), {}

    def record(it: int, x: torch.Tensor) -> None:
        if it in keep:
            model = model_counts3d(layout, x, mult=mult, add=add, volume=volume, blur=blur)
            out[it] = repair_with(y, w.to(model.dtype), model, valid)

    osem3d(layout, y.to(dtype), max(iterations), subsets, weight=w, mult=mult, add=add, volume=volume,
           blur=blur, callback=record)
    return out
