"""Pure batched torch transforms for sinogram batches, on whatever device the batch lives on.

Axes are always ``(B, C, V, X)``: batch, channels (context slices), views (180 degrees), radial
bins. Physics (docs/ARCHITECTURE.md, "Physics"): rotating the object is a cyclic shift along
views with the radial axis mirrored for the views that wrap past 180 degrees; padding along views
continues the sinogram the same way. The radial mirror is STIR's t -> -t with t = bin - X // 2: index
i -> X - i for even X (bin 0, t = -X/2, has no stored partner and keeps its value), a plain flip for
odd X. Mirroring a direct-plane sinogram is the projection of the object rotated by 180 degrees
(tests/test_augment.py); view v + V is view v mirrored, so wraps use the same mirror. (An oblique
plane's mirror also swaps its two rings, and a TOF bin's mirror is timing position -k: for those
slices the transforms are plausible sinograms, not exact rotations.)

    pre = Preprocess(cfg, scale=ds.scale)
    x, state = pre.forward(raw)          # (B, C, V, X) counts -> padded, normalized
    y = pre.inverse(model(x, m), state)  # cropped back, in counts

Random transforms take a ``torch.Generator`` (or per-sample hash keys) so a batch is reproducible
from (seed, epoch, position): resuming mid-epoch replays exactly the same corruption/augmentation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hpc.config import AugmentConfig, Config
from hpc.errors import ConfigError

# Mode arguments (normalize, pad_bins, fill) take the values of hpc.config's Literal types, which
# hpc.config.validate checks; an unknown mode here is a programming error (KeyError/AssertionError).
EPS = 1e-8  # the tutorial's x / (max + 1e-8)


# ---------------------------------------------------------------- radial mirror
def mirror_index(bins: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(X,) source bin of each bin under the radial mirror t -> -t (t = bin - X // 2): i -> 2 (X // 2) - i,
    except bin 0 of an even X (t = -X/2, whose partner t = X/2 is not stored), which stays."""
    i = torch.arange(bins, device=device)
    j = 2 * (bins // 2) - i
    return torch.where(j < bins, j, i)


def mirror_bins(x: torch.Tensor) -> torch.Tensor:
    """The radial mirror t -> -t of x (..., X) (an involution: mirror_bins(mirror_bins(x)) == x):
    ``x[..., mirror_index(X)]``, computed as a flip (index_select along the last axis is ~10x slower
    on CPU): odd X is a plain flip, even X keeps bin 0 and flips bins 1..X-1."""
    if x.shape[-1] % 2:
        return x.flip(-1)
    return torch.cat([x[..., :1], x[..., 1:].flip(-1)], dim=-1)


# ---------------------------------------------------------------- padding
def _wrapped_views(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """x (..., V, X) sampled at integer view positions ``src`` (n,) that may lie outside
    [0, V): an odd number of wraps past 180 degrees mirrors the radial axis (t -> -t)."""
    v = x.shape[-2]
    wraps = torch.div(src, v, rounding_mode="floor")
    rows = x.index_select(-2, src.remainder(v))  # (..., n, X)
    flip = (wraps.remainder(2) == 1).view(-1, 1)  # (n, 1)
    return torch.where(flip, mirror_bins(rows), rows)


def pad_views_periodic(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """(..., V, X) -> (..., before + V + after, X), continuing the sinogram past 0 and 180 degrees.
    No padding returns ``x`` itself; otherwise only the padded rows are gathered."""
    if before < 0 or after < 0:
        raise ValueError(f"pad_views_periodic: negative padding ({before}, {after})")
    if before == after == 0:
        return x
    v = x.shape[-2]
    parts = [_wrapped_views(x, torch.arange(-before, 0, device=x.device))] if before else []
    parts.append(x)
    if after:
        parts.append(_wrapped_views(x, torch.arange(v, v + after, device=x.device)))
    return torch.cat(parts, dim=-2)


def pad_bins(x: torch.Tensor, left: int, right: int, mode: str = "zero", value: float = 0.0) -> torch.Tensor:
    """(..., V, X) -> (..., V, left + X + right); ``zero`` fills ``value``, ``reflect`` mirrors."""
    assert mode in ("zero", "reflect"), mode  # hpc.config.PadBins
    if left == right == 0:
        return x
    if mode == "reflect":
        if max(left, right) >= x.shape[-1]:
            raise ConfigError(f"data.pad_bins='reflect': padding {left},{right} bins needs slices wider than "
                              f"{x.shape[-1]} bins (use data.pad_bins=zero)")
        flat = x.reshape(-1, *x.shape[-2:]).unsqueeze(1)  # reflect pad wants (N, C, H, W)
        return F.pad(flat, (left, right, 0, 0), mode="reflect").reshape(*x.shape[:-1], -1)
    return F.pad(x, (left, right), value=value)


def pad_amounts(views: int, bins: int, multiple: int) -> tuple[int, int, int, int]:
    """(view_before, view_after, bin_left, bin_right) reaching the next multiple, split evenly."""
    if multiple < 1:
        raise ValueError(f"pad multiple must be >= 1, got {multiple}")
    dv, dx = -views % multiple, -bins % multiple
    return dv // 2, dv - dv // 2, dx // 2, dx - dx // 2


def crop(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Undo padding: (..., V', X') -> (..., V, X)."""
    v0, v1, x0, x1 = pad
    return x[..., v0:x.shape[-2] - v1, x0:x.shape[-1] - x1]


# ---------------------------------------------------------------- normalization
def anscombe(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.sqrt(x.clamp_min(0) + 0.375)


def inverse_anscombe(y: torch.Tensor) -> torch.Tensor:
    """Algebraic inverse (exact for x >= 0)."""
    return (0.5 * y) ** 2 - 0.375


def norm_scale(x: torch.Tensor, mode: str, scale: float) -> torch.Tensor:
    """Per-sample divisor (B,) for ``normalize``: max over the sample's channels (``max``), the
    dataset-wide max (``scale``), its Anscombe image (``anscombe``) or 1 (``none``)."""
    b = x.shape[0]
    if mode == "max":
        return x.reshape(b, -1).amax(1).float() + EPS
    if mode == "scale":
        return torch.full((b,), float(scale) + EPS, device=x.device)
    if mode == "anscombe":
        return torch.full((b,), 2.0 * math.sqrt(max(float(scale), 0.0) + 0.375), device=x.device)
    assert mode == "none", mode  # hpc.config.Normalize
    return torch.ones(b, device=x.device)


def normalize(x: torch.Tensor, mode: str, norm: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """(B, ...) counts -> network scale, with ``norm`` (B,) from ``norm_scale``; ``inplace`` divides
    ``x`` itself (a tensor the caller owns: one pass less)."""
    n = norm.view(-1, *([1] * (x.dim() - 1)))
    if mode == "anscombe":
        return anscombe(x) / n
    return x.div_(n) if inplace else x / n


def floor_counts(y: torch.Tensor, mode: str, norm: torch.Tensor) -> torch.Tensor:
    """Clamp network-scale values ``y`` (B, ...) at the network-scale image of 0 counts: counts
    cannot be negative, and a prediction below 0 is always further from any true count than 0 is.
    (For ``anscombe`` that floor is A(0) / norm, which also keeps the quadratic inverse monotone.)"""
    if mode != "anscombe":
        return y.clamp_min(0.0)
    zero = anscombe(torch.zeros((), device=y.device)) / norm.view(-1, *([1] * (y.dim() - 1)))
    return torch.maximum(y, zero.to(y.dtype))


def denormalize(y: torch.Tensor, mode: str, norm: torch.Tensor) -> torch.Tensor:
    n = norm.view(-1, *([1] * (y.dim() - 1)))
    return inverse_anscombe(y * n) if mode == "anscombe" else y * n


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


# ---------------------------------------------------------------- gaps

def fill_radial(x: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Gap pixels (measured fraction ``mask`` 0) linearly interpolated along the radial bins (last
    axis) between the nearest fully measured bins (mask 1, valid) of the same row; beyond the
    outermost one its value is held, a row with none is 0. Measured and partly measured pixels are
    returned unchanged, invalid ones (virtual crystals) as 0. x, mask, valid: (..., X); for gaps the
    batched twin of hpc.baselines.linear_interp_radial."""
    ok = torch.ones_like(x, dtype=torch.bool) if valid is None else (valid > 0.5).expand_as(x)
    m = (mask >= 1).expand_as(x) & ok
    n = x.shape[-1]
    idx = torch.arange(n, device=x.device).expand_as(x)
    # No cummax (ONNX has none): the k-th measured bin of a row is pos[k], and cumsum counts them.
    pos = torch.where(m, idx, idx + n).sort(-1).values  # measured bins first, ascending
    measured = m.long()
    upto = measured.cumsum(-1)  # measured bins in [0, i]
    k_left, k_right = upto - 1, upto - measured  # last measured <= i, first measured >= i
    has_l, has_r = k_left >= 0, k_right < upto[..., -1:]
    left = pos.gather(-1, k_left.clamp(min=0)).clamp(max=n - 1)  # (unused where there is none)
    right = pos.gather(-1, k_right.clamp(max=n - 1)).clamp(max=n - 1)
    vl, vr = x.gather(-1, left), x.gather(-1, right)
    w = (idx - left).to(x.dtype) / (right - left).clamp(min=1).to(x.dtype)
    fill = torch.where(has_l & has_r, vl + (vr - vl) * w, torch.where(has_l, vl, torch.where(has_r, vr, 0.0)))
    return torch.where(ok, torch.where((mask <= 0).expand_as(x), fill, x), 0.0)


def fill_gaps(x: torch.Tensor, mask: torch.Tensor, mode: str, reproject=None,
              aux: dict[str, torch.Tensor] | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The network's view of a gapped input (data.fill): gaps (measured fraction 0) zeroed,
    pre-filled radially, or filled by the reconstruction of the measured bins projected into the
    gaps (``reproject``: an hpc.recon.ReprojectFill; ``aux`` its optional ``mult`` / ``randoms``,
    shaped like x), so the network learns a correction to interpolation or to physics instead of
    the whole value. Partly measured bins keep their counts (the mask channel says what fraction
    they hold); pixels without a real LOR (``valid`` 0: virtual crystals) are 0."""
    if mode == "zero":
        keep = mask > 0 if valid is None else (mask > 0) & (valid > 0.5)
        return torch.where(keep, x, 0.0)
    if mode == "reproject":
        if reproject is None:
            raise ValueError("the reproject fill (data.fill) needs the scanner geometry")
        out = reproject(x, mask, aux or {})
        return out if valid is None else out * (valid > 0.5)
    assert mode == "linear", mode  # hpc.config.Fill
    return fill_radial(x, mask, valid)


# ---------------------------------------------------------------- preprocessing
def pad_multiple(cfg: Config) -> int:
    """data.pad_multiple, or (0) what the configured model needs."""
    from hpc.models import required_multiple  # late: models imports torch.nn machinery
    return cfg.data.pad_multiple or required_multiple(cfg.model)


@dataclass
class PreState:
    """What ``Preprocess.inverse`` needs: per-sample divisors and the padding."""
    norm: torch.Tensor  # (B,)
    pad: tuple[int, int, int, int]  # view before/after, bin left/right


class Preprocess:
    """Normalize + pad for training, ``hpc predict`` and ``hpc export`` (one implementation).

    ``gaps(raw, mask, aux)`` fills the gaps as training did (zeros, radial interpolation or the
    reprojection of the measured bins, data.fill);
    ``forward(raw (B, C, V, X)) -> (x (B, C, V', X'), state)``; ``like(t, state)`` applies the same
    normalization and padding to the target; ``pad_mask(m, state)`` pads a mask (padded bins are
    "measured", so padding is never a gap); ``inverse(y, state)`` crops and denormalizes exactly
    (floored at 0 counts with data.nonneg).
    """

    def __init__(self, cfg: Config, scale: float = 1.0, scanner: str = ""):
        self.mode = cfg.data.normalize
        self.bins_mode = cfg.data.pad_bins
        self.fill = cfg.data.fill
        self.nonneg = cfg.data.nonneg
        self.scale = float(scale)
        self.multiple = pad_multiple(cfg)
        self.reproject = None
        if self.fill == "reproject":  # late: the projector is only built for this fill
            from hpc.errors import ConfigError
            from hpc.geometry import get_scanner
            from hpc.recon import ReprojectFill

            try:
                self.reproject = ReprojectFill(get_scanner(cfg.corrupt.scanner or scanner), cfg.data.fill_iters)
            except ValueError as exc:
                raise ConfigError(f"the reproject fill (data.fill) needs the scanner geometry (corrupt.scanner or the "
                                  f"dataset's): {exc}") from None

    def _pad(self, x: torch.Tensor, pad: tuple[int, int, int, int], fill: float = 0.0) -> torch.Tensor:
        if not any(pad):  # the slice already fits: no work
            return x
        return pad_bins(pad_views_periodic(x, pad[0], pad[1]), pad[2], pad[3], self.bins_mode, fill)

    def state(self, raw: torch.Tensor, peak: torch.Tensor | None = None) -> PreState:
        """The per-sample divisors and padding of ``raw`` (B, C, V, X) (``forward`` = state + like);
        ``peak`` (B,) float32: each sample's maximum when the caller knows it (exactly
        ``raw``'s: data.normalize=max then reads nothing)."""
        if peak is not None and self.mode == "max":
            norm = peak.to(raw.device) + EPS  # == norm_scale's amax(...).float() + EPS
        else:
            norm = norm_scale(raw, self.mode, self.scale)
        return PreState(norm, pad_amounts(*raw.shape[-2:], self.multiple))

    def forward(self, raw: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, PreState]:
        """``inplace``: ``raw`` may be overwritten (the loader's own batch tensor)."""
        x = raw.float()
        state = self.state(x)
        return self.like(x, state, inplace=inplace or x is not raw), state

    def gaps(self, raw: torch.Tensor, mask: torch.Tensor, aux: dict[str, torch.Tensor] | None = None,
             valid: torch.Tensor | None = None) -> torch.Tensor:
        """Gap pixels (measured fraction 0) of ``raw`` as the network was trained to see them
        (``data.fill``); ``aux``: the slices' ``mult`` / ``randoms`` (counts, like raw) when
        data.fill=reproject has them; invalid pixels (``valid`` 0: virtual crystals) 0."""
        return fill_gaps(raw.float(), mask.float(), self.fill, self.reproject, aux,
                         None if valid is None else valid.float())

    def like(self, t: torch.Tensor, state: PreState, inplace: bool = False) -> torch.Tensor:
        x = t.float()
        return self._pad(normalize(x, self.mode, state.norm, inplace=inplace or x is not t), state.pad)

    def pad_mask(self, m: torch.Tensor, state: PreState) -> torch.Tensor:
        return self._pad(m.float(), state.pad, fill=1.0)

    def inverse(self, y: torch.Tensor, state: PreState) -> torch.Tensor:
        y = crop(y, state.pad)
        if not self.nonneg:
            return denormalize(y, self.mode, state.norm)
        # Floor before inverting (anscombe's inverse would fold large negative outputs up), clamp after
        # (float rounding of A(0)**2 / 4 - 3/8).
        return denormalize(floor_counts(y, self.mode, state.norm), self.mode, state.norm).clamp_min(0.0)
