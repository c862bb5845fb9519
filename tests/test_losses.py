"""Loss terms against hand computations, pytorch_msssim and scikit-image; gaps; weighted sums."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim as ref_ms_ssim
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim
from skimage.metrics import structural_similarity

from hpc.config import LossConfig
from hpc.train.losses import build_loss, msssim_scales


def _pair(seed: int, shape=(2, 1, 6, 8)):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g) * 5
    pred = (target + torch.randn(shape, generator=g)).clamp_min(0.01)
    mask = (torch.rand(shape, generator=g) > 0.4).float()
    return pred, target, mask


def test_l1_mse_poisson_match_hand_computation():
    pred, target, mask = _pair(0)
    total, terms = build_loss(LossConfig({"l1": 1.0, "mse": 0.5, "poisson": 0.25}))(pred, target, mask)
    p, t = pred.double().numpy(), target.double().numpy()
    l1, mse = np.abs(p - t).mean(), ((p - t) ** 2).mean()
    nll = (p + 1e-8 - t * np.log(p + 1e-8)).mean()
    assert terms["l1"].item() == pytest.approx(l1, rel=1e-6)
    assert terms["mse"].item() == pytest.approx(mse, rel=1e-6)
    assert terms["poisson"].item() == pytest.approx(nll, rel=1e-6)
    assert terms["poisson"].item() == pytest.approx(
        F.poisson_nll_loss(pred, target, log_input=False, full=False).item(), rel=1e-6)
    assert total.item() == pytest.approx(l1 + 0.5 * mse + 0.25 * nll, rel=1e-6)
    assert set(terms) == {"l1", "mse", "poisson"}


def test_gaps_only_uses_only_missing_pixels():
    pred, target, mask = _pair(1)
    fn = build_loss(LossConfig({"l1": 1.0, "mse": 1.0}, gaps_only=True))
    _, terms = fn(pred, target, mask)
    gap = mask.numpy() == 0
    d = (pred - target).double().numpy()[gap]
    assert terms["l1"].item() == pytest.approx(np.abs(d).mean(), rel=1e-6)
    assert terms["mse"].item() == pytest.approx((d**2).mean(), rel=1e-6)
    # measured pixels of the prediction do not matter at all
    changed = torch.where(mask > 0.5, pred + 100.0, pred)
    assert fn(changed, target, mask)[0].item() == pytest.approx(fn(pred, target, mask)[0].item(), rel=1e-7)
    # a batch without gaps contributes zero (and a zero gradient, not NaN)
    pred.requires_grad_(True)
    total, _ = fn(pred, target, torch.ones_like(mask))
    total.backward()
    assert total.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


def test_msssim_matches_pytorch_msssim_at_five_scales():
    g = torch.Generator().manual_seed(2)
    target = torch.rand(1, 1, 168, 176, generator=g)
    pred = (target + 0.05 * torch.randn(1, 1, 168, 176, generator=g)).clamp(0, 1)
    assert msssim_scales(168, 176) == 5
    _, terms = build_loss(LossConfig({"l1": 0.0, "msssim": 1.0}))(pred, target, torch.ones_like(target))
    ref = ref_ms_ssim(pred, target, data_range=target.max().item())
    assert terms["msssim"].item() == pytest.approx(1 - ref.item(), abs=1e-5)


def test_msssim_scale_count_for_small_sinograms():
    assert [msssim_scales(s, 400) for s in (11, 20, 21, 41, 64, 160, 161)] == [1, 1, 2, 3, 3, 4, 5]
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        msssim_scales(10, 400)


def test_msssim_three_scales_by_hand():
    # 64 px: 3 scales with the first three standard weights renormalised; built here from
    # pytorch_msssim's single-scale SSIM/CS so the reduction logic is checked independently.
    g = torch.Generator().manual_seed(3)
    target = torch.rand(1, 1, 64, 72, generator=g, dtype=torch.float64)
    pred = (target + 0.1 * torch.randn(1, 1, 64, 72, generator=g, dtype=torch.float64)).clamp(0, 1)
    w = np.array([0.0448, 0.2856, 0.3001])
    w = w / w.sum()
    win = _fspecial_gauss_1d(11, 1.5).double().repeat([1, 1, 1, 1])  # (C=1, 1, 1, 11)
    x, y, value = pred, target, 1.0
    dr = target.max().item()
    for s in range(3):
        ssim, cs = _ssim(x, y, data_range=dr, win=win, K=(0.01, 0.03))
        value *= (ssim if s == 2 else cs).item() ** w[s]
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    _, terms = build_loss(LossConfig({"l1": 0.0, "msssim": 1.0}))(pred, target, torch.ones_like(target))
    assert terms["msssim"].item() == pytest.approx(1 - value, abs=1e-5)


def test_single_scale_msssim_is_skimage_ssim():
    g = torch.Generator().manual_seed(4)
    target = torch.rand(1, 1, 16, 20, generator=g)
    pred = (target + 0.1 * torch.randn(1, 1, 16, 20, generator=g)).clamp(0, 1)
    ref = structural_similarity(pred[0, 0].double().numpy(), target[0, 0].double().numpy(),
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=target.max().item())
    _, terms = build_loss(LossConfig({"l1": 0.0, "msssim": 1.0}))(pred, target, torch.ones_like(target))
    assert terms["msssim"].item() == pytest.approx(1 - ref, abs=1e-5)


def test_msssim_gaps_only_ignores_measured_pixels_and_has_finite_gradients():
    pred, target, mask = _pair(5, shape=(2, 1, 24, 32))
    fn = build_loss(LossConfig({"l1": 0.0, "msssim": 1.0}, gaps_only=True))
    changed = torch.where(mask > 0.5, -pred, pred)
    assert fn(changed, target, mask)[0].item() == pytest.approx(fn(pred, target, mask)[0].item(), abs=1e-7)
    bad = (-target).requires_grad_(True)  # anti-correlated: negative CS, clamped before the powers
    total, _ = build_loss(LossConfig({"l1": 0.0, "msssim": 1.0}))(bad, target, mask)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(bad.grad).all()


def test_bf16_inputs_give_float32_terms():
    pred, target, mask = _pair(6)
    total, terms = build_loss(LossConfig({"l1": 1.0}))(pred.bfloat16(), target, mask)
    assert total.dtype == torch.float32 and terms["l1"].dtype == torch.float32



def test_all_zero_target_slices_give_finite_losses():
    # empty sinogram planes exist (e.g. at the ends of a segment): no 0/0 in the SSIM constants
    target = torch.zeros(2, 1, 16, 16)
    pred = torch.zeros(2, 1, 16, 16).requires_grad_(True)
    loss = build_loss(LossConfig({"l1": 1.0, "msssim": 1.0, "poisson": 1.0}))
    total, terms = loss(pred, target, torch.ones_like(target))
    total.backward()
    assert terms["msssim"].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(total) and torch.isfinite(pred.grad).all()


def test_terms_inside_bf16_autocast_equal_float32():
    pred, target, mask = _pair(7, shape=(2, 1, 24, 32))
    fn = build_loss(LossConfig({"l1": 1.0, "msssim": 1.0, "poisson": 1.0}))
    _, ref = fn(pred, target, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, got = fn(pred, target, mask)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
