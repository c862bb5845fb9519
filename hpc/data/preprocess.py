"""What every network input goes through, in training, ``hpc predict`` and ``hpc export`` alike
(one implementation): padding to the model's size multiple, normalization and their exact inverses,
and the sinogram's radial mirror that padding along views needs. Pure torch, no config: the
caller passes the modes, the padding multiple and the gap fill (hpc.data.fills builds them).

Axes are ``(B, C, V, X)``. Padding along views continues the sinogram past 0 and 180 degrees (a wrap
mirrors the radial axis). The radial mirror is STIR's t -> -t with t = bin - X // 2: index
i -> X - i for even X (bin 0, t = -X/2, has no stored partner and keeps its value), a plain flip
for odd X.

    pre = Preprocess("max", "zero", multiple=4, fill=zero_fill, scale=ds.scale)
    x, state = pre.forward(raw)          # (B, C, V, X) counts -> padded, normalized
    y = pre.inverse(model(x, m), state)  # cropped back, in counts
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hpc.errors import ConfigError

# Mode arguments (normalize, pad_bins) take the values of hpc.config's Literal types, which
# hpc.config.validate checks; an unknown mode here is a programming error (KeyError/AssertionError).
EPS = 1e-8  # the tutorial's x / (max + 1e-8)

# data.fill, built by hpc.data.fills: (x, mask, aux, valid) -> x with its gap pixels filled; all (B, C, V, X)
# counts except aux {"mult", "randoms"} (like x) and valid (None: every pixel is a line of response).
GapFill = Callable[[torch.Tensor, torch.Tensor, dict, "torch.Tensor | None"], torch.Tensor]


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


# ---------------------------------------------------------------- preprocessing
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

    def __init__(self, normalize: str, pad_bins: str, multiple: int, fill: GapFill, nonneg: bool = True,
                 scale: float = 1.0):
        """``normalize``/``pad_bins``: data.normalize / data.pad_bins; ``multiple``: views and bins are
        padded to it (the model's, hpc.train.models.input_multiple); ``fill``: data.fill as built by
        hpc.data.fills.build_fill; ``scale``: the dataset-wide maximum (data.normalize=scale)."""
        if multiple < 1:
            raise ValueError(f"Preprocess: padding multiple must be >= 1, got {multiple}")
        self.mode, self.bins_mode, self.multiple = normalize, pad_bins, multiple
        self.fill, self.nonneg, self.scale = fill, nonneg, float(scale)

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
        return self.fill(raw.float(), mask.float(), aux or {}, None if valid is None else valid.float())

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
