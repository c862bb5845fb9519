"""Reconstruction with the Joseph projector: 2-D OSEM of sinogram planes (batched, torch, CPU or GPU),
and the physicist's repair baseline ``reproject``.

Model of the measured counts of plane b (TOF bins too when the sinogram has them):

    E[y] = w * (m * A x + r)

A the Joseph projector (hpc.physics.projector) of the plane's 2-D image x, m the multiplicative factors
(detector efficiencies x attenuation, 1 when unknown), r the additive background (randoms, 0 when
unknown), w the measured fraction of each bin (1 measured, 0 a gap or a virtual crystal, in between
for a partly lost span-compressed bin). Bins with w = 0 carry no likelihood at all, so gaps are
excluded, not treated as zero counts. OSEM (Hudson & Larkin 1994) with ordered subsets of views
``k::subsets``; one iteration visits every subset once:

    x <- x / (A_S^T (w m)) * A_S^T (w m y / (w (m A_S x + r)))

Pixels outside the transaxial field of view (``fov_radius_mm`` of the scanner) stay 0.

``reproject`` fills the gaps with ``m A x + r`` of the image reconstructed from the measured bins
only; a partly measured bin keeps its counts and gets the model for its lost fraction,
``y + (1 - w) (m A x + r)``. Virtual-crystal LORs (``valid == 0``) stay 0.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hpc.physics import geometry as G
from hpc.physics.projector import ImageGrid, Projector, cached_projector, default_grid, one_thread

EPS = 1e-12
REPROJECT_SUBSETS = 4  # OSEM subsets of the reproject baseline (views k::4), in validation and evaluation


def subset_projectors(sc: G.Scanner, grid: ImageGrid, subsets: int, tof: bool, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> list[Projector]:
    """The OSEM subsets' projectors (views ``k::subsets``), cached per (scanner, grid, device)."""
    if not 1 <= subsets <= sc.views:
        raise ValueError(f"subsets must be in [1, {sc.views}] (views of scanner {sc.name!r}), got {subsets}")
    return [cached_projector(sc, grid, tof, k, subsets, str(device), dtype) for k in range(subsets)]


def _views(t: torch.Tensor | None, k: int, n: int) -> torch.Tensor | None:
    return None if t is None else t[..., k::n, :]


def osem(sc: G.Scanner, y: torch.Tensor, iters: int, subsets: int = 1, *, weight: torch.Tensor | None = None,
         mult: torch.Tensor | None = None, add: torch.Tensor | None = None, grid: ImageGrid | None = None,
         callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Images (B, ny, nx) from sinograms ``y`` (B, V, X) or TOF (B, T, V, X); ``weight``, ``mult``,
    ``add`` broadcast to ``y`` (see module doc). ``callback(iteration, x)`` after each iteration
    (1-based), e.g. to score several iteration counts in one run. Float32 unless ``y`` is float64.
    On the CPU it runs with one intra-op thread (hpc.physics.projector.one_thread)."""
    with one_thread(y.device):
        return _osem(sc, y, iters, subsets, weight, mult, add, grid, callback)


def _osem(sc, y, iters, subsets, weight, mult, add, grid, callback) -> torch.Tensor:
    dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    grid = grid or default_grid(sc)
    tof = y.dim() == 4
    projs = subset_projectors(sc, grid, subsets, tof, y.device, dtype)
    y = y.to(dtype)
    w = torch.ones_like(y) if weight is None else weight.to(dtype).expand_as(y)
    wm = w if mult is None else w * mult.to(dtype)
    wr = None if add is None else w * add.to(dtype)  # the background of the measured fraction
    support = torch.as_tensor(grid.fov_mask(sc.fov_radius_mm), dtype=dtype, device=y.device)
    sens = [p.adjoint(_views(wm, k, subsets)) * support for k, p in enumerate(projs)]  # (B, ny, nx)
    total = sum(sens)
    x = support * ((wm * y).flatten(1).sum(1) / total.flatten(1).sum(1).clamp_min(EPS)).view(-1, 1, 1)
    for it in range(1, iters + 1):
        for k, p in enumerate(projs):
            wm_k, y_k = _views(wm, k, subsets), _views(y, k, subsets)
            ybar = wm_k * p.forward(x)
            if wr is not None:
                ybar = ybar + _views(wr, k, subsets)
            ratio = torch.where(wm_k > 0, wm_k * y_k / ybar.clamp_min(EPS), 0.0)
            x = x * p.adjoint(ratio) / sens[k].clamp_min(EPS) * (sens[k] > 0)
        if callback is not None:
            callback(it, x)
    return x


def model_counts(sc: G.Scanner, x: torch.Tensor, *, mult: torch.Tensor | None = None,
                 add: torch.Tensor | None = None, grid: ImageGrid | None = None, tof: bool = False) -> torch.Tensor:
    """Expected counts ``m A x + r`` of images x (B, ny, nx) -> (B, [T,] V, X)."""
    p = cached_projector(sc, grid or default_grid(sc), tof, 0, 1, str(x.device), x.dtype)
    out = p.forward(x)
    if mult is not None:
        out = out * mult.to(out.dtype)
    return out if add is None else out + add.to(out.dtype)


def repair_with(y: torch.Tensor, weight: torch.Tensor, model: torch.Tensor, valid: torch.Tensor | None
                ) -> torch.Tensor:
    """Measured counts kept, the lost fraction from ``model``: y + (1 - w) model (y ignored where
    w = 0); 0 on invalid (virtual-crystal) LORs."""
    dtype = y.dtype if y.is_floating_point() else torch.float32
    w, model = weight.to(dtype).expand_as(model), model.to(dtype)
    out = torch.where(w > 0, y.to(dtype), 0.0) + (1 - w) * model
    return out if valid is None else out * valid.to(out.dtype)


def reproject(sc: G.Scanner, y: torch.Tensor, weight: torch.Tensor, iters: int, subsets: int = 1, *,
              valid: torch.Tensor | None = None, mult: torch.Tensor | None = None,
              add: torch.Tensor | None = None, grid: ImageGrid | None = None) -> torch.Tensor:
    """The reconstruction baseline: OSEM from the measured bins only, forward projection into the gaps.
    y (B, V, X) (gap values ignored), weight the measured fraction (1 measured, 0 gap), valid (V, X)
    0 on virtual-crystal LORs; returns the repaired (B, V, X) in y's float dtype."""
    w = weight.expand_as(y).to(torch.float64 if y.dtype == torch.float64 else torch.float32)
    if valid is not None:
        w = w * valid.to(w.dtype)
    x = osem(sc, y, iters, subsets, weight=w, mult=mult, add=add, grid=grid)
    return repair_with(y, w, model_counts(sc, x, mult=mult, add=add, grid=grid, tof=y.dim() == 4), valid)


def reproject_path(sc: G.Scanner, y: torch.Tensor, weight: torch.Tensor, iterations: Sequence[int],
                   subsets: int = 1, *, valid: torch.Tensor | None = None, mult: torch.Tensor | None = None,
                   add: torch.Tensor | None = None, grid: ImageGrid | None = None) -> dict[int, torch.Tensor]:
    """``reproject`` after each of ``iterations``, from one OSEM run: {iterations: repaired (B, V, X)}."""
    w = weight.expand_as(y).float() * (1 if valid is None else valid.float())
    keep, out = set(iterations), {}

    def record(it: int, x: torch.Tensor) -> None:
        if it in keep:
            out[it] = repair_with(y, w, model_counts(sc, x, mult=mult, add=add, grid=grid), valid)

    osem(sc, y.float(), max(iterations), subsets, weight=w, mult=mult, add=add, grid=grid, callback=record)
    return out


def reproject_scores(sc: G.Scanner, y: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                     iterations: Sequence[int], subsets: int = 1, *, valid: torch.Tensor | None = None,
                     mult: torch.Tensor | None = None, add: torch.Tensor | None = None,
                     grid: ImageGrid | None = None) -> dict[int, tuple[float, float]]:
    """(sum of squared in-gap errors, in-gap target energy) against ``target`` for each of
    ``iterations``, from one OSEM run: what choosing the iteration count on validation data sums."""
    gap = (weight.expand_as(y) < 1) & (valid.bool() if valid is not None else True)
    energy = float((target.double() ** 2)[gap].sum())
    path = reproject_path(sc, y, weight, iterations, subsets, valid=valid, mult=mult, add=add, grid=grid)
    return {it: (float(((rep.double() - target.double()) ** 2)[gap].sum()), energy) for it, rep in path.items()}


def best_iterations(scores: Sequence[dict[int, tuple[float, float]]]) -> tuple[int, dict[int, float]]:
    """The iteration count with the lowest pooled in-gap NMSE over several batches' ``reproject_scores``,
    and that NMSE per candidate."""
    its = sorted(set.intersection(*(set(s) for s in scores)))
    nmse = {it: sum(s[it][0] for s in scores) / max(sum(s[it][1] for s in scores), EPS) for it in its}
    return min(its, key=lambda it: (nmse[it], it)), nmse


class ReprojectFill:
    """data.fill=reproject: the gaps of every slice (..., V, X) filled by ``reproject`` (``iters`` OSEM
    iterations of 4 subsets), batched on the slices' device; the network then learns the correction.
    ``aux`` may hold ``mult`` and ``randoms`` shaped like the slices (modelled when given); LORs through
    virtual crystals are left out of the likelihood (mult = 0 there, else the scanner's gap mask)."""

    def __init__(self, sc: G.Scanner, iters: int, subsets: int = 4):
        self.scanner, self.iters, self.subsets = sc, int(iters), int(subsets)
        self.valid = torch.as_tensor(G.gap_mask(sc) > 0)  # (V, X)

    def __call__(self, x: torch.Tensor, mask: torch.Tensor, aux: dict[str, torch.Tensor]) -> torch.Tensor:
        sc, shape = self.scanner, x.shape
        if tuple(shape[-2:]) != (sc.views, sc.bins):
            raise ValueError(f"the reproject fill (data.fill): slices {tuple(shape[-2:])} are not scanner "
                             f"{sc.name!r}'s ({sc.views}, {sc.bins})")
        flat = {k: v.float().expand(shape).reshape(-1, sc.views, sc.bins) for k, v in aux.items()}
        valid = (flat["mult"] > 0) if "mult" in flat else self.valid.to(x.device)
        out = reproject(sc, x.float().reshape(-1, sc.views, sc.bins), mask.float().expand(shape).reshape(
            -1, sc.views, sc.bins).clamp(0, 1), self.iters, self.subsets, valid=valid, mult=flat.get("mult"),
            add=flat.get("randoms"))
        return out.reshape(shape)
