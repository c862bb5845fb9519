"""Joseph projector: exact adjoint, agreement with the simulator's exact line integrals (non-TOF and
TOF), rows that follow the geometry's (view, bin) <-> crystal pair mapping, OSEM subsets."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hpc.physics import geometry as G
from hpc.physics.projector import ImageGrid, Projector, cached_projector, default_grid, ellipse_image
from hpc.simulate import counts as SC

TEST, DEMO = G.get_scanner("test"), G.get_scanner("demo")
TOF_DEMO = dataclasses.replace(DEMO, name="tof-demo", tof_bins=5, tof_fwhm_ps=400.0, tof_bin_ps=300.0)
PHANTOM = np.array([[20.0, -30.0, 150.0, 100.0, 0.3, 1.0],  # x, y, a, b (mm), rotation, activity
                    [60.0, 20.0, 30.0, 40.0, 0.1, 2.0],
                    [-70.0, 10.0, 25.0, 25.0, 0.0, -0.5]])


def _nmse(a, b) -> float:
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


@pytest.mark.parametrize("sc,tof", [(TEST, False), (DEMO, False), (TOF_DEMO, True)])
def test_adjoint_is_the_exact_transpose(sc, tof):
    gen = torch.Generator().manual_seed(0)
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        P = Projector(sc, tof=tof, dtype=dtype)
        x = torch.rand(2, 3, *P.grid.shape, generator=gen, dtype=torch.float64).to(dtype)  # batched (2, 3, ny, nx)
        y = torch.rand(2, 3, *P.sino_shape, generator=gen, dtype=torch.float64).to(dtype)
        ax, aty = P.forward(x), P.adjoint(y)
        assert ax.shape == y.shape and aty.shape == x.shape and ax.dtype == dtype
        lhs, rhs = (ax.double() * y.double()).sum().item(), (x.double() * aty.double()).sum().item()
        assert lhs == pytest.approx(rhs, rel=rtol)
        # batching is per item: the batch's first image projects alone to the same sinogram
        torch.testing.assert_close(P.forward(x[0, 0]), ax[0, 0])


@pytest.mark.parametrize("sc,tof", [(DEMO, False), (TOF_DEMO, True)])
def test_forward_agrees_with_exact_line_integrals_of_ellipses(sc, tof):
    P = Projector(sc, tof=tof, dtype=torch.float64)
    img = torch.from_numpy(ellipse_image(PHANTOM, P.grid, oversample=8))
    phi, s = G.lor_coordinates(sc)
    exact = SC.project(sc, PHANTOM, phi, s)  # (T, V, X)
    got = P.forward(img).numpy().reshape(exact.shape)
    # 8.2 mm pixels: the error is the pixelisation of the ellipses' edges
    assert _nmse(got, exact) < 2e-3
    # a finer grid of the same field of view converges to the exact integrals
    fine = Projector(sc, default_grid(sc, 2 * sc.bins), tof=tof, dtype=torch.float64)
    got_fine = fine.forward(torch.from_numpy(ellipse_image(PHANTOM, fine.grid, 8))).numpy().reshape(exact.shape)
    assert _nmse(got_fine, exact) < 0.5 * _nmse(got, exact)


def test_tof_bins_sum_to_the_non_tof_projection():
    img = torch.from_numpy(ellipse_image(PHANTOM, default_grid(TOF_DEMO), 4))
    tof = Projector(TOF_DEMO, tof=True, dtype=torch.float64).forward(img)  # (T, V, X)
    plain = Projector(TOF_DEMO, dtype=torch.float64).forward(img)
    torch.testing.assert_close(tof.sum(0), plain, rtol=1e-6, atol=1e-6)
    body = plain > 0.1 * plain.max()
    assert (tof.amax(0)[body] < 0.9 * plain[body]).all()  # really split along each LOR


def test_each_row_traces_the_chord_between_its_two_crystals():
    """Row (view, bin) samples the line through the crystals sino_to_lor gives (so a change of the
    geometry's view convention moves the projector with it) and has the chord's length."""
    sc = DEMO
    P = Projector(sc, dtype=torch.float64)
    A = P.A.to_dense().numpy()  # (V * X, ny * nx)
    x, y = P.grid.centres()
    px, py = np.meshgrid(x, y)  # (ny, nx)
    pa, pb = G.lor_endpoints(sc)
    rng = np.random.default_rng(0)
    for row in rng.choice(A.shape[0], 40, replace=False):
        v, b = divmod(row, sc.bins)
        w = A[row].reshape(px.shape)
        a_, b_ = pa[v, b], pb[v, b]
        d = (b_ - a_) / np.linalg.norm(b_ - a_)
        dist = np.abs((px - a_[0]) * d[1] - (py - a_[1]) * d[0])  # distance of each pixel from the line
        assert (dist[w > 0] < P.grid.pixel_mm * 1.5).all()
        # the weights integrate a constant image to the chord's length inside the image square
        half = P.grid.pixel_mm * P.grid.nx / 2
        ts = np.linspace(0, 1, 20001)
        pts = a_[None] + ts[:, None] * (b_ - a_)[None]
        inside = (np.abs(pts) <= half).all(axis=1)
        assert w.sum() == pytest.approx(inside.mean() * np.linalg.norm(b_ - a_), rel=0.02)
    crystals = G.crystal_positions(sc)
    ca, cb = G.sino_to_lor(sc, np.arange(sc.views)[:, None], np.arange(sc.bins)[None, :])
    np.testing.assert_array_equal(pa, crystals[ca])
    np.testing.assert_array_equal(pb, crystals[cb])


def test_subset_projectors_are_row_blocks_of_the_full_one():
    full = Projector(TEST, dtype=torch.float64)
    img = torch.rand(*full.grid.shape, dtype=torch.float64)
    whole = full.forward(img)
    for k in range(3):
        sub = cached_projector(TEST, subset=k, subsets=3)
        assert sub.sino_shape == (TEST.views // 3, TEST.bins)
        torch.testing.assert_close(sub.forward(img.float()), whole[k::3].float(), rtol=1e-5, atol=1e-5)
    assert cached_projector(TEST, subset=1, subsets=3) is cached_projector(TEST, subset=1, subsets=3)


def test_shape_errors_name_the_shapes():
    P = Projector(TEST, ImageGrid(8, 8, 20.0))
    with pytest.raises(ValueError, match=r"image \(9, 8\) is not the grid's \(8, 8\)"):
        P.forward(torch.zeros(9, 8))
    with pytest.raises(ValueError, match="sinogram"):
        P.adjoint(torch.zeros(TEST.views, TEST.bins + 1))
    with pytest.raises(ValueError, match="no TOF bins"):
        Projector(TEST, tof=True)


def test_ellipse_image_is_the_area_fraction():
    grid = ImageGrid(40, 40, 5.0)
    img = ellipse_image(np.array([[0.0, 0.0, 50.0, 30.0, 0.4, 2.0]]), grid, oversample=16)
    assert img.sum() * grid.pixel_mm ** 2 == pytest.approx(2.0 * np.pi * 50 * 30, rel=2e-3)
    assert img.max() == 2.0 and img[0, 0] == 0.0


def test_device_matches_a_float64_reference(device):
    ref = Projector(DEMO, dtype=torch.float64)
    P = Projector(DEMO, device=device)
    img = torch.rand(4, *ref.grid.shape, dtype=torch.float64)
    fwd = P.forward(img.float().to(device)).cpu().double()
    assert fwd.device.type == "cpu" and _nmse(fwd, ref.forward(img)) < 1e-10  # float32 sums of ~100 terms
    sino = torch.rand(4, *ref.sino_shape, dtype=torch.float64)
    assert _nmse(P.adjoint(sino.float().to(device)).cpu().double(), ref.adjoint(sino)) < 1e-10
