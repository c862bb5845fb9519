"""The detector blur (issue 22): a point source's measured width is the FWHM the model asks for,
counts are conserved, the adjoint is exact, and fwhm0 = 0 is the identity."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc.physics import blur as B
from hpc.physics import geometry as G


def measured_fwhm(profile: np.ndarray, s: np.ndarray) -> float:
    """FWHM (mm) of a sampled peak, from the second moment of a Gaussian (sigma * 2.3548)."""
    mean = (profile * s).sum() / profile.sum()
    return float(np.sqrt((profile * (s - mean) ** 2).sum() / profile.sum()) / B.SIGMA_PER_FWHM)


@pytest.mark.parametrize("at_mm, want", [(0.0, 4.3), (100.0, 4.76), (200.0, 5.93)])
def test_a_point_source_has_the_modelled_width_on_the_mmr(at_mm, want):
    sc = G.get_scanner("mmr")
    s = B.bin_positions(sc)
    k = B.blur_matrix(sc)
    src = int(np.argmin(np.abs(s - at_mm)))
    got = measured_fwhm(k[:, src], s)
    # the bins' own width adds (bin^2 / 12) in quadrature to the Gaussian's variance
    bin_mm = abs(s[src + 1] - s[src - 1]) / 2
    expect = np.sqrt(B.fwhm_mm(s[src]) ** 2 + (bin_mm ** 2 / 12) / B.SIGMA_PER_FWHM ** 2)
    assert got == pytest.approx(expect, rel=0.03)
    assert B.fwhm_mm(at_mm) == pytest.approx(want, abs=0.01)


def test_blur_conserves_counts_and_its_adjoint_is_exact():
    sc = G.get_scanner("mmr")
    k = torch.from_numpy(B.blur_matrix(sc))
    np.testing.assert_allclose(k.sum(0).numpy(), 1.0, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 5, sc.bins, generator=g, dtype=torch.float64), torch.rand(3, 5, sc.bins, generator=g,
                                                                                 dtype=torch.float64)
    assert float(B.blur(a, k).sum()) == pytest.approx(float(a.sum()), rel=1e-12)
    assert float((B.blur(a, k) * b).sum()) == pytest.approx(float((a * B.blur_adjoint(b, k)).sum()), rel=1e-12)


def test_no_blur_is_the_identity_and_bad_widths_are_refused():
    sc = G.get_scanner("demo")
    np.testing.assert_array_equal(B.blur_matrix(sc, fwhm0_mm=0), np.eye(sc.bins))
    with pytest.raises(ValueError, match="fwhm0_mm"):
        B.fwhm_mm(0.0, fwhm0_mm=-1)
