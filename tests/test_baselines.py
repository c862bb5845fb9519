"""Repair baselines on cases with known answers: exact on linear fields (2-D and 3-D), blind to
virtual-crystal zeros, measured pixels kept, partly measured pixels get only their lost fraction."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc.baselines.interp import axial3d_interp, axis_interp, biharmonic_inpaint, linear_interp_radial
from hpc.baselines.stack import baseline_batch


def _ramp3d(p=7, v=10, x=16) -> np.ndarray:
    a, b, c = np.mgrid[0:p, 0:v, 0:x].astype(np.float64)
    return 2.0 * a - 1.5 * b + 3.0 * c + 40.0  # linear along every axis


@pytest.mark.parametrize("fn", [linear_interp_radial, biharmonic_inpaint])
def test_2d_baselines_ignore_virtual_crystal_zeros(fn):
    image = _ramp3d()[0]
    valid = np.ones_like(image, bool)
    valid[:, [3, 9]] = False  # virtual-crystal LORs: no data, stored as 0
    mask = np.ones_like(image)
    mask[2:8, 4:9] = 0  # gaps reaching the virtual columns
    data = np.where(valid, image, 0.0) * mask
    out = fn(data, mask, valid)
    # linear bridges columns 2 -> 10 exactly; biharmonic inpaints the virtual columns with the gap
    np.testing.assert_allclose(out[valid], image[valid], atol=1e-8 if fn is linear_interp_radial else 0.1)
    assert (out[~valid] == 0).all()
    # reading the virtual zeros as measured data pulls the fill towards 0
    naive = fn(data, np.where(valid, mask, 1.0))
    assert np.abs(naive - image)[mask == 0].max() > 1.0


def test_axial3d_is_exact_on_a_linear_field_and_uses_other_planes():
    stack = _ramp3d()
    mask = np.ones_like(stack)
    mask[2:5, 3:7, 0:16] = 0  # whole views lost in three planes: no radial bridge there, only axial/view
    out = axial3d_interp(stack * mask, mask)
    np.testing.assert_allclose(out, stack, atol=1e-9)
    assert np.array_equal(out[mask > 0], stack[mask > 0])
    # a plane that has lost all of its pixels is still bridged axially
    mask2 = np.ones_like(stack)
    mask2[3] = 0
    np.testing.assert_allclose(axial3d_interp(stack * mask2, mask2), stack, atol=1e-9)


def test_axial3d_prefers_the_shortest_bridge():
    stack = np.zeros((9, 5, 21))
    stack[:, :, :] = np.arange(21)[None, None, :] ** 2  # curved radially, constant axially and over views
    mask = np.ones_like(stack)
    mask[4, 2, 5:16] = 0  # a long radial gap in one plane, measured right above and below
    out = axial3d_interp(stack * mask, mask)
    radial = linear_interp_radial(stack[4] * mask[4], mask[4])
    gap = mask[4] == 0
    assert np.abs(out[4][gap] - stack[4][gap]).max() < 0.2 * np.abs(radial[gap] - stack[4][gap]).max()


def test_axis_interp_edges():
    x = np.array([[0.0, 4.0, 0.0, 8.0, 0.0]])
    src = np.array([[False, True, False, True, False]])
    est, span, both, nearest = axis_interp(x, src, 1)
    np.testing.assert_array_equal(both, [[False, True, True, True, False]])
    np.testing.assert_array_equal(est[both], [4.0, 6.0, 8.0])
    np.testing.assert_array_equal(span[both], [0.0, 2.0, 0.0])  # a source bridges to itself
    np.testing.assert_array_equal(nearest, [[4.0, 4.0, 4.0, 8.0, 8.0]])


@pytest.mark.parametrize("fn", [linear_interp_radial, biharmonic_inpaint])
def test_partly_measured_pixels_get_only_their_lost_fraction(fn):
    image = _ramp3d()[0]
    mask = np.ones_like(image)
    mask[4, 6:9] = [0.0, 0.25, 1.0]
    data = image * mask  # thinned counts: the surviving fraction of the LORs
    out = fn(data, mask)
    model = image[4, 6:9]  # both baselines are exact on the ramp
    np.testing.assert_allclose(out[4, 6:9], [model[0], data[4, 7] + 0.75 * model[1], image[4, 8]], atol=1e-8)


def test_baseline_batch_passes_valid():
    image = _ramp3d()[0]
    valid = np.ones_like(image, bool)
    valid[:, 2] = False
    mask = np.ones_like(image)
    mask[3:6, 4:9] = 0
    xs = torch.from_numpy(np.where(valid, image, 0) * mask)[None, None].float()
    out = baseline_batch("linear", xs, torch.from_numpy(mask)[None, None].float(), torch.from_numpy(valid))
    assert out.shape == xs.shape and out.dtype == torch.float32
    torch.testing.assert_close(out[0, 0], torch.from_numpy(np.where(valid, image, 0)).float())
