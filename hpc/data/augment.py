"""Pure batched torch transforms for training batches, on whatever device the batch lives on:
corruption (hash-seeded dead-block draws, binomial thinning) and augmentation (physically valid view
rotations and radial mirrors, the tutorial's approximate rotate/zoom). Padding, normalization and
the sinogram's radial mirror are hpc.data.preprocess; gap fills hpc.data.fills.

Axes are always ``(B, C, V, X)``: batch, channels (context slices), views (180 degrees), radial
bins. Physics (docs/ARCHITECTURE.md, "Physics"): rotating the object is a cyclic shift along
views with the radial axis mirrored for the views that wrap past 180 degrees. Mirroring a
direct-plane sinogram is the projection of the object rotated by 180 degrees (tests/test_augment.py);
view v + V is view v mirrored, so wraps use the same mirror. (An oblique plane's mirror also swaps
its two rings, and a TOF bin's mirror is timing position -k: for those slices the transforms are
plausible sinograms, not exact rotations.)

Random transforms take a ``torch.Generator`` (or per-sample hash keys) so a batch is reproducible
from (seed, epoch, position): resuming mid-epoch replays exactly the same corruption/augmentation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hpc.config import AugmentConfig
from hpc.data.preprocess import mirror_bins, mirror_index


# ---------------------------------------------------------------- corruption
def hash_uniform(seed: int, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Deterministic uniforms (B, n) in [0, 1) from (seed, ids (B,), column): the same slice id
    always gets the same numbers on any device and in any batch (validation corruption)."""
    cols = torch.arange(n, device=ids.device, dtype=torch.int64)
    h = (ids.to(torch.int64).view(-1, 1) * 0x9E3779B1 + cols * 0x85EBCA77 + seed * 0xC2B2AE3D)
    for mult in (0x7FEB352D, 0x846CA68B):  # integer mixing on 31 bits (stays positive in int64)
        h = (h ^ (h >> 15)) & 0x7FFFFFFF
        h = (h * mult) & 0x7FFFFFFF
    h = h ^ (h >> 16)
    return (h & 0xFFFFFF).float() / float(1 << 24)


def choose_blocks(seed: int, ids: torch.Tensor, n_blocks: int, count: int) -> torch.Tensor:
    """(B, count) distinct block ids in [0, n_blocks) per sample, a function of (seed, id);
    0 <= count <= n_blocks (hpc.config.validate_scanner)."""
    return hash_uniform(seed, ids, n_blocks).argsort(dim=1)[:, :count]


def thin(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Binomial thinning: each count kept with probability ``p`` in (0, 1] (an exact lower-dose
    acquisition)."""
    counts = x.round().clamp_min(0)
    return torch.binomial(counts, torch.full_like(counts, p), generator=generator)


def thin_fraction(x: torch.Tensor, fraction: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Binomial thinning of counts x by a per-pixel probability (the measured fraction of a
    span-compressed bin whose other LORs a dead block lost: Poisson statistics stay exact)."""
    counts = x.round().clamp_min(0)
    return torch.binomial(counts, fraction.clamp(0, 1).expand_as(counts).contiguous(), generator=generator)


# ---------------------------------------------------------------- augmentation
def rotate_views(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each sample's object by ``shift`` (B,) views (any integers; V views = 180 degrees):
    out[v] = in[v - s], radially mirrored for every odd number of wraps. x (B, C, V, X)."""
    b, c, v, nx = x.shape
    src = torch.arange(v, device=x.device).view(1, v) - shift.view(b, 1)  # (B, V), any integer
    wrapped = torch.div(src, v, rounding_mode="floor").remainder(2) == 1
    rows = torch.gather(x, 2, src.remainder(v).view(b, 1, v, 1).expand(b, c, v, nx))
    return torch.where(wrapped.view(b, 1, v, 1), mirror_bins(rows), rows)


def rotate_flip_index(shift: torch.Tensor | None, flip: torch.Tensor | None, views: int,
                      bins: int) -> torch.Tensor:
    """(B, 1, V * X) flat source positions of ``flip_bins(rotate_views(x, shift), flip)`` for x
    (B, C, V, X): the view rotation (its wrap mirrors t -> -t) and the radial mirror as one gather
    (``rotate_flip``); either may be None (identity)."""
    ref = shift if shift is not None else flip
    b, dev = len(ref), ref.device
    src = torch.arange(views, device=dev).view(1, views).expand(b, views)  # (B, V)
    if shift is not None:
        src = src - shift.view(b, 1)
    mirrored = torch.div(src, views, rounding_mode="floor").remainder(2) == 1  # (B, V): odd wraps
    if flip is not None:
        mirrored = mirrored ^ flip.view(b, 1).bool()
    cols = torch.arange(bins, device=dev)
    cols = torch.where(mirrored.view(b, views, 1), mirror_index(bins, dev).view(1, 1, bins), cols)  # (B, V, X)
    return (src.remainder(views).view(b, views, 1) * bins + cols).view(b, 1, views * bins)


def rotate_flip(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, C, V, X) gathered at ``rotate_flip_index`` positions (B, 1, V * X): one pass."""
    b, c, v, nx = x.shape
    return torch.gather(x.reshape(b, c, v * nx), 2, index.expand(b, c, v * nx)).view(b, c, v, nx)


def flip_bins(x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Mirror the radial axis (t -> -t, :func:`mirror_bins`) of the samples where ``flags`` (B,) is
    true: the object rotated by 180 degrees."""
    return torch.where(flags.view(-1, 1, 1, 1), mirror_bins(x), x)


def affine(x: torch.Tensor, deg: torch.Tensor, zoom: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """The tutorial's approximate image rotation (degrees) and zoom (>1 enlarges) per sample
    (B,), about the centre, zeros outside. Not physical for sinograms: an option only."""
    rad = deg * math.pi / 180.0
    cos, sin = torch.cos(rad) / zoom, torch.sin(rad) / zoom
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


@dataclass
class AugmentParams:
    """One batch's draws, applied identically to input, target and mask."""
    shift: torch.Tensor | None  # (B,) views
    flip: torch.Tensor | None  # (B,) bool
    deg: torch.Tensor | None  # (B,)
    zoom: torch.Tensor | None  # (B,)
    _index: torch.Tensor | None = None  # rotate_flip_index, computed once for input, target and mask

    def gather_index(self, views: int, bins: int) -> torch.Tensor | None:
        if self.shift is None and self.flip is None:
            return None
        if self._index is None or self._index.shape[-1] != views * bins:
            self._index = rotate_flip_index(self.shift, self.flip, views, bins)
        return self._index


def draw_augment(cfg: AugmentConfig, batch: int, views: int, gen: torch.Generator,
                 device: torch.device) -> AugmentParams:
    """Draw each switched-on transform with probability ``cfg.p`` per sample (off = identity)."""
    def on() -> torch.Tensor:
        return torch.rand(batch, generator=gen, device=device) < cfg.p

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(batch, generator=gen, device=device)

    shift = flip = deg = zoom = None
    if cfg.enabled and cfg.rotate_views:
        shift = torch.randint(0, views, (batch,), generator=gen, device=device) * on()
    if cfg.enabled and cfg.flip_bins:
        flip = on()
    if cfg.enabled and cfg.affine:
        use = on()
        deg = torch.where(use, uniform(-cfg.rotate_deg, cfg.rotate_deg), 0.0)
        zoom = torch.where(use, uniform(*cfg.zoom), 1.0)
    return AugmentParams(shift, flip, deg, zoom)


def apply_augment(x: torch.Tensor, prm: AugmentParams, is_mask: bool = False) -> torch.Tensor:
    """Apply one batch's draws to x (B, C, V, X); masks are resampled with nearest neighbours
    and are 1 (measured) outside the field of the affine transform."""
    index = prm.gather_index(*x.shape[-2:])
    if index is not None:  # view rotation then radial mirror, as one gather
        x = rotate_flip(x, index)
    if prm.deg is not None:
        if is_mask:
            x = 1.0 - affine(1.0 - x, prm.deg, prm.zoom, mode="nearest")
        else:
            x = affine(x, prm.deg, prm.zoom)
    return x
