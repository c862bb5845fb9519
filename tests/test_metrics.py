"""Metrics against hand computations and scikit-image; exact reduction of the sums; baselines."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from hpc.baselines.interp import biharmonic_inpaint, linear_interp_radial
from hpc.baselines.stack import baseline_batch
from hpc.train.metrics import PSNR_CAP, MetricAccumulator


def _sample(seed: int, b: int = 2, v: int = 12, x: int = 14):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, 1, v, x, generator=g, dtype=torch.float64)
    pred = target + 0.1 * torch.randn(b, 1, v, x, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, 1, v, x, generator=g) > 0.3).double()
    return pred, target, mask


def _ssim_map(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    # scikit-image's Gaussian SSIM (an independent implementation), cropped to the valid windows
    _, full = structural_similarity(p, t, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=float(t.max()), full=True)
    return full[5:-5, 5:-5]


def test_metrics_match_hand_computation():
    pred, target, mask = _sample(0)
    acc = MetricAccumulator()
    acc.update(pred, target, mask)
    got = MetricAccumulator.compute(acc.state())

    p, t, gap = pred.numpy()[:, 0], target.numpy()[:, 0], mask.numpy()[:, 0] == 0
    err = (p - t) ** 2
    assert got["nmse"] == pytest.approx(err.sum() / (t**2).sum(), rel=1e-12)
    assert got["nmse_gap"] == pytest.approx(err[gap].sum() / (t[gap] ** 2).sum(), rel=1e-12)
    psnr = [10 * math.log10(t[i].max() ** 2 / err[i].mean()) for i in range(2)]
    psnr_gap = [10 * math.log10(t[i].max() ** 2 / err[i][gap[i]].mean()) for i in range(2)]
    assert got["psnr"] == pytest.approx(np.mean(psnr), rel=1e-12)
    assert got["psnr_gap"] == pytest.approx(np.mean(psnr_gap), rel=1e-12)
    maps = [_ssim_map(p[i], t[i]) for i in range(2)]
    assert got["ssim"] == pytest.approx(np.mean(maps), rel=1e-9)
    gap_maps = np.concatenate([maps[i][gap[i][5:-5, 5:-5]] for i in range(2)])
    assert got["ssim_gap"] == pytest.approx(gap_maps.mean(), rel=1e-9)


def test_reduced_halves_equal_the_whole():
    pred, target, mask = _sample(1, b=6, v=16, x=20)
    whole = MetricAccumulator()
    whole.update(pred, target, mask)
    halves = [MetricAccumulator(), MetricAccumulator()]
    halves[0].update(pred[:2], target[:2], mask[:2])  # uneven split, as ranks may get
    halves[1].update(pred[2:], target[2:], mask[2:])
    reduced = halves[0].state() + halves[1].state()  # what an all-reduce with SUM computes
    torch.testing.assert_close(reduced, whole.state(), rtol=1e-12, atol=0)
    a, b = MetricAccumulator.compute(reduced), MetricAccumulator.compute(whole.state())
    assert a == pytest.approx(b, rel=1e-12)
    # the naive "average of per-rank averages" differs: the sums are what make it exact
    naive = np.mean([MetricAccumulator.compute(h.state())["nmse"] for h in halves])
    assert naive != pytest.approx(b["nmse"], rel=1e-6)


def test_exact_prediction_is_capped_and_no_gaps_gives_nan():
    _, target, _ = _sample(2)
    acc = MetricAccumulator()
    acc.update(target.clone(), target, torch.ones_like(target))
    got = MetricAccumulator.compute(acc.state())
    assert got["nmse"] == 0.0 and got["psnr"] == PSNR_CAP and got["ssim"] == pytest.approx(1.0)
    assert all(math.isnan(got[k]) for k in ("nmse_gap", "psnr_gap", "ssim_gap"))


def test_empty_accumulator_and_shape_errors():
    got = MetricAccumulator.compute(MetricAccumulator().state())
    assert all(math.isnan(v) for v in got.values())
    with pytest.raises(ValueError, match="same"):
        MetricAccumulator().update(torch.zeros(1, 1, 12, 12), torch.zeros(1, 1, 12, 13), torch.ones(1, 1, 12, 12))
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        MetricAccumulator().update(torch.zeros(1, 1, 8, 12), torch.zeros(1, 1, 8, 12), torch.ones(1, 1, 8, 12))


def _ramp_with_gaps():
    v, x = np.mgrid[0:10, 0:16].astype(np.float64)
    image = 3.0 * x - 2.0 * v + 50.0  # linear in both axes
    mask = np.ones_like(image)
    mask[2:8, 5:8] = 0  # interior gaps: biharmonic is exact there, its stencil is cut at the border
    mask[2:4, 10:13] = 0  # a block
    return image, mask


@pytest.mark.parametrize("fn", [linear_interp_radial, biharmonic_inpaint])
def test_baselines_exact_on_a_linear_ramp(fn):
    image, mask = _ramp_with_gaps()
    corrupted = np.where(mask > 0, image, 0.0)
    out = fn(corrupted, mask)
    np.testing.assert_allclose(out, image, rtol=0, atol=1e-8)
    assert np.array_equal(out[mask > 0], image[mask > 0])  # measured pixels bitwise unchanged


def test_linear_interp_edges_and_empty_views():
    x = np.array([[0.0, 0.0, 4.0, 0.0, 8.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    mask = np.array([[0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0]])
    out = linear_interp_radial(x, mask)
    np.testing.assert_array_equal(out, [[4.0, 4.0, 4.0, 6.0, 8.0, 8.0], [0.0] * 6])


def test_baseline_batch_keeps_dtype_device_and_shape():
    image, mask = _ramp_with_gaps()
    xs = torch.from_numpy(np.stack([image, 2 * image])[:, None]).float()
    ms = torch.from_numpy(np.stack([mask, mask])[:, None]).float()
    out = baseline_batch("linear", xs * ms, ms)
    assert out.shape == xs.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, xs)
    with pytest.raises(ValueError, match="unknown baseline .median.; expected one of reproject | axial3d"):
        baseline_batch("median", xs, ms)


def test_all_zero_target_is_not_counted_in_psnr_and_has_ssim_one():
    target = torch.zeros(1, 1, 12, 12)
    acc = MetricAccumulator()
    acc.update(torch.zeros_like(target), target, torch.ones_like(target))
    got = MetricAccumulator.compute(acc.state())
    assert math.isnan(got["psnr"]) and math.isnan(got["nmse"])  # no peak, no energy: undefined
    assert got["ssim"] == pytest.approx(1.0)


def test_update_inside_bf16_autocast_is_unchanged():
    pred, target, mask = _sample(3)
    ref, got = MetricAccumulator(), MetricAccumulator()
    ref.update(pred.float(), target.float(), mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # validation may run inside the train autocast
        got.update(pred.float(), target.float(), mask)
    assert torch.equal(got.state(), ref.state())
