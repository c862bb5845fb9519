"""hpc.evaluate.scoring against hand computations: pooled NMSE/PSNR/SSIM over gap and valid pixels (virtual
LORs excluded), pooling = the same formulas over more pixels, image NMSE/SSIM and lesion ROI bias."""
from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from hpc.evaluate.scoring import ImageScore, SinoScore, lesion_rois, psnr
from hpc.physics.projector import ImageGrid


def _case(seed: int):
    rng = np.random.default_rng(seed)
    ref = rng.uniform(1, 20, (3, 14, 16))
    pred = ref + rng.normal(0, 1, ref.shape)
    w = np.ones_like(ref)
    w[:, 4:7, 3:9] = 0
    w[1, 10, 10] = 0.5  # partly measured: a gap pixel too
    w[2] = 1  # a slice without gaps
    valid = np.ones((14, 16), bool)
    valid[:, 0] = False
    return pred, ref, w, valid


def test_sino_scores_match_hand_computation():
    pred, ref, w, valid = _case(0)
    s = SinoScore()
    s.update(pred, ref, w, valid)
    got = s.compute()
    v = np.broadcast_to(valid, ref.shape)
    gap = (w < 1) & v
    err = (pred - ref) ** 2
    assert got["nmse_gap"] == pytest.approx(err[gap].sum() / (ref[gap] ** 2).sum(), rel=1e-12)
    assert got["nmse_all"] == pytest.approx(err[v].sum() / (ref[v] ** 2).sum(), rel=1e-12)
    peak = ref[v].max()
    assert got["psnr_gap"] == pytest.approx(10 * np.log10(peak ** 2 / err[gap].mean()), rel=1e-12)
    assert got["psnr_all"] == pytest.approx(10 * np.log10(peak ** 2 / err[v].mean()), rel=1e-12)
    p0, r0 = np.where(v, pred, 0), np.where(v, ref, 0)
    maps = [structural_similarity(p0[k], r0[k], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                  data_range=r0[k].max(), full=True)[1][5:-5, 5:-5] for k in range(3)]
    assert got["ssim_all"] == pytest.approx(np.mean(maps), rel=1e-6)
    centres = gap[:, 5:-5, 5:-5]
    assert got["ssim_gap"] == pytest.approx(np.stack(maps)[centres].mean(), rel=1e-6)


def test_pooling_is_the_same_formula_over_more_pixels():
    a, b = _case(1), _case(2)
    sa, sb, both = SinoScore(), SinoScore(), SinoScore()
    sa.update(*a)
    sb.update(*b)
    both.update(*(np.concatenate([x, y]) if x.ndim == 3 else x for x, y in zip(a, b, strict=True)))
    pooled = SinoScore().add(sa).add(sb).compute()
    for k, v in both.compute().items():
        assert pooled[k] == pytest.approx(v, rel=1e-9), k
    # a study average would differ: pooling weighs every pixel once
    assert pooled["nmse_gap"] != pytest.approx((sa.compute()["nmse_gap"] + sb.compute()["nmse_gap"]) / 2, rel=1e-6)


def test_psnr_cap_and_nothing_scored():
    assert psnr(10.0, 0.0, 5) == 100.0 and math.isnan(psnr(10.0, 1.0, 0))
    s = SinoScore()
    pred, ref, w, valid = _case(3)
    s.update(pred, ref, np.ones_like(w), valid)  # no gaps
    assert math.isnan(s.compute()["nmse_gap"]) and not math.isnan(s.compute()["nmse_all"])


def test_image_scores_and_lesion_bias():
    grid = ImageGrid(24, 24, 4.0)
    les = {"x": 10.0, "y": -6.0, "z": 20.0, "a": 12.0, "b": 9.0, "rotation": 0.3, "z_half": 10.0}
    rois = lesion_rois([les], np.array([0.0, 14.0, 20.0, 27.5]), grid)
    assert [k for k, _ in rois] == [1, 2]  # plane 0 is outside, plane 3 at |u| = 0.75 beyond the central 70 %
    x, y = grid.centres()
    px, py = np.meshgrid(x, y)
    c, s = math.cos(0.3), math.sin(0.3)
    full = ((((px - 10) * c + (py + 6) * s) / 12) ** 2 + (((py + 6) * c - (px - 10) * s) / 9) ** 2) <= 1
    assert np.array_equal(rois[1][1], full)  # at the lesion's centre plane: the whole cross-section
    assert rois[0][1].sum() < full.sum()
    ref = np.ones((4, 24, 24))
    img = ref.copy()
    img[1][rois[0][1]] = 1.2
    img[2][rois[1][1]] = 0.9
    support = np.ones((24, 24), bool)
    sc = ImageScore()
    sc.update(img, ref, support, rois)
    got = sc.compute()
    assert got["lesion_bias"] == pytest.approx((0.2 - 0.1) / 2) and got["lesion_absbias"] == pytest.approx(0.15)
    assert got["img_nmse"] == pytest.approx(((img - ref) ** 2).sum() / (ref ** 2).sum())
    same = ImageScore()
    same.update(ref, ref, support, rois)
    assert same.compute()["img_nmse"] == 0 and same.compute()["img_ssim"] == pytest.approx(1.0)
