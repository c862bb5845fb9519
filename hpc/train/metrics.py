"""Validation metrics that reduce exactly across ranks.

Definitions (pred and target are (B, 1, V, X); mask = the measured fraction, 1 measured, 0 missing
= "gap", in between a partly lost span-compressed bin, which counts in the gap sums with weight
1 - mask; pixels with ``valid`` 0 (virtual crystals: no line of response) count nowhere):
- NMSE = sum (pred - target)^2 / sum target^2, summed over every pixel of every sample seen
  (``nmse_gap``: the same sums restricted to gap pixels).
- PSNR = mean over samples of 10 log10(peak^2 / MSE), peak = that sample's target maximum, MSE over
  the sample's pixels (``psnr_gap``: MSE over its gap pixels; samples without gaps are not counted).
  Capped at ``PSNR_CAP`` dB so an exact sample does not make the mean infinite; samples whose target
  is all zero (no peak) are not counted.
- SSIM = mean of the SSIM map (11x11 Gaussian window, sigma 1.5, K = (0.01, 0.03), data range = the
  sample's target maximum) over every valid window position ('valid' convolution: the map is
  (V-10, X-10)); ``ssim_gap``: the mean over window positions whose centre pixel is in a gap.

``MetricAccumulator`` keeps only SUMS (errors, energies, per-sample PSNRs, SSIM-map sums and their
counts) in one float64 vector, so all-reducing ``state()`` with SUM over ranks and calling
``compute`` gives the single-process value (up to float64 rounding of the order of additions):

    acc = MetricAccumulator()
    for batch in val: acc.update(pred, batch.target, batch.mask)
    state = acc.state(device)          # 1-D float64; dist all-reduce (SUM) here
    metrics = MetricAccumulator.compute(state)   # {"nmse": ..., "psnr_gap": ..., ...}
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PSNR_CAP = 100.0  # dB
SSIM_WIN = 11
SSIM_SIGMA = 1.5
SSIM_K = (0.01, 0.03)
MIN_DATA_RANGE = 1e-12  # an all-zero target still gives finite C1, C2 (1e-28 > float32's tiny)

FIELDS = ("sse", "energy", "sse_gap", "energy_gap", "psnr", "psnr_n", "psnr_gap", "psnr_gap_n",
          "ssim", "ssim_n", "ssim_gap", "ssim_gap_n", "samples")
METRICS = ("nmse", "psnr", "ssim", "nmse_gap", "psnr_gap", "ssim_gap")


def gaussian_window(size: int = SSIM_WIN, sigma: float = SSIM_SIGMA, *, dtype=torch.float64,
                    device=None) -> torch.Tensor:
    """Normalized 1-D Gaussian, (size,)."""
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def gaussian_filter_valid(x: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur without padding: (B, C, H, W) -> (B, C, H-k+1, W-k+1)."""
    c, k = x.shape[1], win.numel()
    x = F.conv2d(x, win.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, win.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ssim_maps(x: torch.Tensor, y: torch.Tensor, data_range: torch.Tensor, win_size: int = SSIM_WIN,
              sigma: float = SSIM_SIGMA) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM and contrast-structure maps of x against y, each (B, C, H-win+1, W-win+1).

    x, y: (B, C, H, W); data_range: (B,) per-sample dynamic range L (C1 = (K1 L)^2, C2 = (K2 L)^2),
    at least MIN_DATA_RANGE.
    """
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"SSIM: image {tuple(x.shape[-2:])} is smaller than the {win_size}x{win_size} window")
    win = gaussian_window(win_size, sigma, dtype=x.dtype, device=x.device)
    c = x.shape[1]
    stats = gaussian_filter_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), win)  # (B, 5C, h, w)
    mx, my, exx, eyy, exy = stats.split(c, dim=1)
    vx, vy, cxy = exx - mx * mx, eyy - my * my, exy - mx * my
    L = data_range.to(x.dtype).clamp_min(MIN_DATA_RANGE).view(-1, 1, 1, 1)
    c1, c2 = (SSIM_K[0] * L) ** 2, (SSIM_K[1] * L) ** 2
    cs = (2 * cxy + c2) / (vx + vy + c2)
    ssim = (2 * mx * my + c1) / (mx * mx + my * my + c1) * cs
    return ssim, cs


def _psnr(peak: torch.Tensor, mse: torch.Tensor) -> torch.Tensor:
    floor = peak**2 * 10 ** (-PSNR_CAP / 10)  # mse below this would exceed the cap
    return 10 * torch.log10(peak**2 / torch.maximum(mse, floor))


class MetricAccumulator:
    """Sums for NMSE/PSNR/SSIM over the whole sinogram and inside the gaps (see module doc)."""

    def __init__(self) -> None:
        self._sums: torch.Tensor | None = None

    def reset(self) -> None:
        self._sums = None

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               valid: torch.Tensor | None = None) -> None:
        """pred, target: (B, 1, V, X) (crop any padding first); mask broadcastable, the measured
        fraction (1 measured, 0 a gap); valid broadcastable or None, 0 = no line of response
        (virtual crystals): such pixels count nowhere. A gap pixel weighs its lost fraction 1 - mask."""
        if pred.shape != target.shape or pred.dim() != 4:
            raise ValueError(f"metrics: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                             f"must be the same (B, C, V, X) shape")
        p, t = pred.detach().double(), target.detach().double()
        ok = torch.ones_like(t) if valid is None else (valid > 0.5).expand_as(t).double()
        gap = (1 - mask.double()).clamp(0, 1).expand_as(t) * ok  # 1 = missing
        err = (p - t) ** 2
        sse, sse_gap = (err * ok).flatten(1).sum(1), (err * gap).flatten(1).sum(1)  # (B,)
        n_pix, n_gap = ok.flatten(1).sum(1), gap.flatten(1).sum(1)
        peak = t.flatten(1).amax(1)
        has_peak = peak > 0
        has_gap = has_peak & (n_gap > 0)
        psnr = torch.where(has_peak, _psnr(peak, sse / n_pix.clamp_min(1)), 0.0)
        psnr_gap = torch.where(has_gap, _psnr(peak, sse_gap / n_gap.clamp_min(1)), 0.0)
        ssim, _ = ssim_maps(p, t, peak)
        r = (SSIM_WIN - 1) // 2
        gap_c = gap[..., r : gap.shape[-2] - r, r : gap.shape[-1] - r]  # window centres in gaps
        ok_c = ok[..., r : ok.shape[-2] - r, r : ok.shape[-1] - r]  # window centres on real LORs
        sums = [
            sse.sum(), (t * t * ok).sum(), sse_gap.sum(), (t * t * gap).sum(),
            psnr.sum(), has_peak.sum(), psnr_gap.sum(), has_gap.sum(),
            (ssim * ok_c).sum(), ok_c.sum(), (ssim * gap_c).sum(), gap_c.sum(),
            t.new_tensor(t.shape[0]),
        ]  # in FIELDS order
        row = torch.stack([v.double() for v in sums])
        self._sums = row if self._sums is None else self._sums + row

    def state(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The sums as a 1-D float64 tensor (a copy), ready for an all-reduce with SUM."""
        s = self._sums if self._sums is not None else torch.zeros(len(FIELDS), dtype=torch.float64)
        return s.clone().to(device) if device is not None else s.clone()

    @staticmethod
    def compute(state: torch.Tensor) -> dict[str, float]:
        """Metrics from (reduced) sums; NaN where nothing was counted (e.g. no gaps)."""
        s = dict(zip(FIELDS, state.detach().double().cpu().tolist(), strict=True))

        def ratio(num: str, den: str) -> float:
            return s[num] / s[den] if s[den] > 0 else math.nan

        return {"nmse": ratio("sse", "energy"), "psnr": ratio("psnr", "psnr_n"),
                "ssim": ratio("ssim", "ssim_n"), "nmse_gap": ratio("sse_gap", "energy_gap"),
                "psnr_gap": ratio("psnr_gap", "psnr_gap_n"), "ssim_gap": ratio("ssim_gap", "ssim_gap_n")}
