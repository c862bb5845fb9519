"""Training losses: weighted sums of L1, MSE, MS-SSIM and Poisson NLL, optionally gaps only.

    loss_fn = build_loss(cfg.loss)                    # e.g. loss: {l1: 1.0, msssim: 0.2} (cfg.loss.weights)
    total, terms = loss_fn(pred, target, mask)        # terms: {"l1": ..., "msssim": ...} (detached)

pred, target: (B, 1, V, X); mask (B, 1, V, X) or broadcastable, 1 = measured, 0 = missing (gap).
Every term is computed in float32 (also under bf16 autocast).

- ``l1`` / ``mse``: mean absolute / squared error over the pixels (with ``gaps_only``: over the
  gap pixels of the batch; a batch without gaps contributes 0).
- ``msssim``: 1 - MS-SSIM (Gaussian window 11, sigma 1.5, the standard 5 scale weights; data range =
  each sample's target maximum). MS-SSIM needs the smaller side > 10 * 2**(scales-1), i.e. > 160 px
  for 5 scales; smaller sinograms use the largest number of scales that fits, with the first weights
  renormalised to sum to 1 (``msssim_scales``); sides < 11 px are a ValueError. With ``gaps_only``
  the prediction's measured pixels are replaced by the target's first, so the images differ only
  in the gaps (a windowed index cannot be restricted pixel by pixel).
- ``poisson``: Poisson negative log-likelihood of the target counts given the predicted rate,
  ``rate - target*log(rate)`` with rate = max(pred, 0) + 1e-8 (the constant log(target!) dropped;
  same as torch's poisson_nll_loss(log_input=False) for pred >= 0). Meant for non-negative outputs
  (badblock's Softplus): a negative prediction gets no gradient from this term.

A new term is one function in this file, registered with ``@LOSSES.register("name")`` (signature
``Term``); ``loss.name=0.5`` then configures it and ``hpc train --help`` lists it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hpc.config import LossConfig
from hpc.registry import LOSSES
from hpc.train.metrics import SSIM_WIN, ssim_maps

# A term (LOSSES.register(name)): (pred, target, mask, weight, gaps_only) -> () float32 tensor, all
# (B, 1, V, X) float32; ``weight`` the per-pixel weight (None: every pixel alike; see Loss).
Term = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", bool], torch.Tensor]
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003
POISSON_EPS = 1e-8
MSSSIM_FLOOR = 1e-6  # clamp before the fractional powers: x**w has an infinite gradient at 0


def msssim_scales(height: int, width: int, win_size: int = SSIM_WIN) -> int:
    """Number of MS-SSIM scales (<= 5) for an image: the coarsest must still hold the window."""
    side = min(height, width)
    if side < win_size:
        raise ValueError(f"MS-SSIM: image {height}x{width} is smaller than the {win_size}x{win_size} window")
    scales = 1
    while scales < len(MSSSIM_WEIGHTS) and side > (win_size - 1) * 2**scales:
        scales += 1
    return scales


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: torch.Tensor) -> torch.Tensor:
    """Per-sample MS-SSIM of x against y, (B, C, H, W) -> (B,); data_range (B,)."""
    n = msssim_scales(x.shape[-2], x.shape[-1])
    weights = x.new_tensor(MSSSIM_WEIGHTS[:n])
    weights = weights / weights.sum()
    levels = []
    for s in range(n):
        ssim, cs = ssim_maps(x, y, data_range)
        if s == n - 1:
            levels.append(ssim.flatten(2).mean(-1))  # (B, C): luminance only at the coarsest scale
        else:
            levels.append(cs.flatten(2).mean(-1))
            pad = [x.shape[-2] % 2, x.shape[-1] % 2]
            x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)
    stacked = torch.stack(levels).clamp_min(MSSSIM_FLOOR)  # (n, B, C)
    return torch.prod(stacked ** weights.view(-1, 1, 1), dim=0).mean(-1)


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


class Loss:
    """Callable ``(pred, target, mask, valid=None) -> (total, {term: detached value})``. ``mask`` is
    the measured fraction (1 measured, 0 a gap, in between a partly lost span-compressed bin);
    ``valid`` 0 marks pixels that are no line of response (virtual crystals): no term counts them.
    With ``gaps_only`` each pixel weighs its lost fraction ``1 - mask``."""

    def __init__(self, weights: dict[str, float], gaps_only: bool):
        self.weights = weights
        self.gaps_only = gaps_only

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                 valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if pred.shape != target.shape:
            raise ValueError(f"loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        p, t = pred.float(), target.float()
        ok = None if valid is None else (valid > 0.5).expand_as(t).float()
        gap = None  # per-pixel weight: None = every pixel alike
        if self.gaps_only:
            gap = (1 - mask.float()).clamp(0, 1).expand_as(t)  # 1 = missing, a partial bin its lost fraction
            gap = gap if ok is None else gap * ok
        elif ok is not None:
            gap = ok
        # float32 even inside a bf16 autocast region: SSIM's E[x^2] - E[x]^2 cancels badly in bf16
        with torch.autocast(p.device.type, enabled=False):
            terms = {name: self._term(name, p, t, mask, gap) for name in self.weights}
        total = sum(self.weights[k] * v for k, v in terms.items())
        return total, {k: v.detach() for k, v in terms.items()}

    def _term(self, name: str, p: torch.Tensor, t: torch.Tensor, mask: torch.Tensor,
              gap: torch.Tensor | None) -> torch.Tensor:
        return LOSSES.get(name)(p, t, mask, gap, self.gaps_only)


@LOSSES.register("l1")
def l1(p: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None, gaps_only: bool):
    return _weighted_mean((p - t).abs(), weight)


@LOSSES.register("mse")
def mse(p: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None, gaps_only: bool):
    return _weighted_mean((p - t) ** 2, weight)


@LOSSES.register("msssim")
def msssim(p: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None, gaps_only: bool):
    if gaps_only:  # a windowed index cannot be restricted pixel by pixel: equal outside the gaps instead
        p = torch.where(mask >= 1, t, p)
    return 1.0 - ms_ssim(p, t, t.flatten(1).amax(1)).mean()


@LOSSES.register("poisson")
def poisson(p: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None, gaps_only: bool):
    rate = p.clamp_min(0) + POISSON_EPS
    return _weighted_mean(rate - t * torch.log(rate), weight)


def build_loss(cfg: LossConfig) -> Loss:
    """The weighted sum of the terms with a non-zero weight in ``cfg.weights`` (see module doc);
    weights >= 0, at least one > 0, every name registered (hpc.config.validate)."""
    active = {name: float(w) for name, w in cfg.weights.items() if w > 0}
    return Loss(active, cfg.gaps_only)
