"""The gap fills (data.fill): what the network sees in the gap pixels of its input, so that it learns
a correction to interpolation or to physics instead of the whole value. Registry hpc.registry.FILLS;
an entry is a builder ``(cfg, scanner) -> GapFill`` (hpc.data.preprocess.GapFill):

- ``zero``: gaps (measured fraction 0) zeroed;
- ``linear``: gaps interpolated along the radial bins between fully measured bins;
- ``reproject``: the reconstruction of the measured bins projected into the gaps (OSEM,
  data.fill_iters iterations; hpc.physics.recon.ReprojectFill), mult/randoms modelled when the shards
  have them.

Partly measured bins keep their counts (the mask channel says what fraction they hold); pixels
without a real LOR (``valid`` 0: virtual crystals) are 0. A new fill is one builder in this file,
registered with ``@FILLS.register("name")``; ``data.fill=name`` then uses it everywhere. Metadata
the loader reads: ``fold`` ("always": the fill at a pixel depends on that pixel only, so view
rotations and mirrors commute with it; "without_gaps": only when nothing is missing; absent: never)
and ``aux`` (the fill models the shards' mult / randoms, and runs even where nothing is missing).
``export="outside"``: the fill cannot be traced (a reconstruction), so `hpc export` leaves it out of
the exported graph, which takes the filled stacks as an input instead.

    pre = build_preprocess(cfg, multiple=input_multiple(cfg), scale=ds.scale, scanner=ds.scanner)
"""
from __future__ import annotations

import torch

from hpc.config import Config
from hpc.data.preprocess import GapFill, Preprocess
from hpc.errors import ConfigError
from hpc.physics.geometry import get_scanner
from hpc.physics.recon import ReprojectFill
from hpc.registry import FILLS


def fill_radial(x: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Gap pixels (measured fraction ``mask`` 0) linearly interpolated along the radial bins (last
    axis) between the nearest fully measured bins (mask 1, valid) of the same row; beyond the
    outermost one its value is held, a row with none is 0. Measured and partly measured pixels are
    returned unchanged, invalid ones (virtual crystals) as 0. x, mask, valid: (..., X); for gaps the
    batched twin of hpc.baselines.interp.linear_interp_radial."""
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


def _keep(x: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return torch.where(keep if valid is None else keep & (valid > 0.5), x, 0.0)


def zero_fill(x: torch.Tensor, mask: torch.Tensor, aux: dict, valid: torch.Tensor | None) -> torch.Tensor:
    return _keep(x, mask > 0, valid)


def linear_fill(x: torch.Tensor, mask: torch.Tensor, aux: dict, valid: torch.Tensor | None) -> torch.Tensor:
    return fill_radial(x, mask, valid)


class _Reproject:
    """ReprojectFill as a GapFill (invalid pixels 0)."""

    def __init__(self, fill: ReprojectFill):
        self.fill = fill

    def __call__(self, x: torch.Tensor, mask: torch.Tensor, aux: dict, valid: torch.Tensor | None) -> torch.Tensor:
        out = self.fill(x, mask, aux)
        return out if valid is None else out * (valid > 0.5)


@FILLS.register("zero", fold="always")
def _zero(cfg: Config, scanner: str) -> GapFill:
    return zero_fill


@FILLS.register("linear", fold="without_gaps")
def _linear(cfg: Config, scanner: str) -> GapFill:
    return linear_fill


@FILLS.register("reproject", aux=True, export="outside")
def _reproject(cfg: Config, scanner: str) -> GapFill:
    try:
        sc = get_scanner(cfg.corrupt.scanner or scanner)
    except ValueError as exc:
        raise ConfigError(f"the reproject fill (data.fill) needs the scanner geometry (corrupt.scanner or the "
                          f"dataset's): {exc}") from None
    return _Reproject(ReprojectFill(sc, cfg.data.fill_iters))


def build_fill(cfg: Config, scanner: str = "") -> GapFill:
    """data.fill for data of ``scanner`` (the dataset's; corrupt.scanner overrides it)."""
    return FILLS.get(cfg.data.fill)(cfg, scanner)


def build_preprocess(cfg: Config, multiple: int, scale: float = 1.0, scanner: str = "") -> Preprocess:
    """The configured preprocessing: data.normalize / pad_bins / nonneg, the padding ``multiple`` the
    model needs (hpc.train.models.input_multiple), data.fill, the dataset-wide ``scale``."""
    d = cfg.data
    return Preprocess(d.normalize, d.pad_bins, multiple, build_fill(cfg, scanner), d.nonneg, scale)
