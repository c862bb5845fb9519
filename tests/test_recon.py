"""OSEM and the reproject baseline on cases with a known answer: consistent noise-free data are
recovered in the gaps, gap values never enter the likelihood, multiplicative and additive terms are
modelled, virtual-crystal LORs stay 0, and the iteration count is the one with the lowest error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.physics import recon as R
from hpc.physics.projector import Projector, default_grid, ellipse_image

DEMO = G.get_scanner("demo")
MMR_LIKE = G.Scanner("vc", "vc", rings=2, detectors_per_ring=48, block_trans=4, block_axial=2, bins=24,
                     inner_radius_mm=120.0, doi_mm=0.0, bin_size_mm=7.85, ring_spacing_mm=4.0, virtual_trans=1)


def _phantom(sc: G.Scanner) -> torch.Tensor:
    f = sc.fov_radius_mm
    ell = np.array([[0.05 * f, 0.0, 0.7 * f, 0.5 * f, 0.2, 1.0], [0.3 * f, 0.1 * f, 0.15 * f, 0.15 * f, 0.0, 3.0]])
    return torch.from_numpy(ellipse_image(ell, default_grid(sc), 4) * default_grid(sc).fov_mask(sc.fov_radius_mm))


def _nmse(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    return float(((a - b) ** 2)[where].sum() / (b ** 2)[where].sum())


def test_reproject_recovers_consistent_data_in_the_gaps():
    sc = DEMO
    truth = Projector(sc, dtype=torch.float64).forward(_phantom(sc))[None]  # (1, V, X) = A x exactly
    mask = torch.from_numpy(P.dead_block_mask(sc, [3, 9])[:1]).double()  # (1, V, X), direct plane 0
    gap = mask == 0
    assert 0.05 < gap.double().mean() < 0.3
    y = truth * mask
    rep = R.reproject(sc, y, mask, iters=30, subsets=4)
    assert torch.equal(rep[~gap], y[~gap])  # measured bins are kept bit for bit
    assert _nmse(rep, truth, gap) < 2e-3
    # the gap values never enter the likelihood: garbage there changes nothing
    torch.testing.assert_close(R.reproject(sc, y + 1e4 * (1 - mask), mask, iters=30, subsets=4)[gap], rep[gap])
    # a zero-filled sinogram reconstructed as if measured is far worse in the gaps
    naive = R.model_counts(sc, R.osem(sc, y, 30, 4))
    assert _nmse(naive, truth, gap) > 20 * _nmse(rep, truth, gap)


def test_multiplicative_and_additive_terms_are_modelled():
    sc = DEMO
    gen = torch.Generator().manual_seed(1)
    trues = Projector(sc, dtype=torch.float64).forward(_phantom(sc))[None]
    mult = 0.3 + 0.7 * torch.rand(1, sc.views, sc.bins, generator=gen, dtype=torch.float64)  # efficiencies x ACF
    add = torch.full_like(trues, 0.1 * float(trues.mean()))
    y = mult * trues + add
    mask = torch.from_numpy(P.dead_block_mask(sc, [5])[:1]).double()
    gap = mask == 0
    modelled = R.reproject(sc, y * mask, mask, 30, 4, mult=mult, add=add)
    ignored = R.reproject(sc, y * mask, mask, 30, 4)
    assert _nmse(modelled, y, gap) < 2e-3
    assert _nmse(ignored, y, gap) > 10 * _nmse(modelled, y, gap)


def test_virtual_crystal_lors_are_neither_data_nor_filled():
    sc = MMR_LIKE
    valid = torch.from_numpy(G.gap_mask(sc)).double()  # (V, X), 0 through a virtual crystal
    assert 0 < (valid == 0).sum() < valid.numel()
    truth = Projector(sc, dtype=torch.float64).forward(_phantom(sc))[None] * valid
    mask = torch.from_numpy(P.dead_block_mask(sc, [2])[:1]).double()
    rep = R.reproject(sc, truth * mask, mask, 40, 2, valid=valid)
    assert (rep[0][valid == 0] == 0).all()
    gap = (mask == 0) & (valid > 0)
    assert _nmse(rep, truth, gap) < 5e-3
    # treating the virtual-crystal zeros as measured data drags the fill down
    wrong = R.reproject(sc, truth * mask, mask, 40, 2)
    assert _nmse(wrong, truth, gap) > 2 * _nmse(rep, truth, gap)


def test_partly_measured_bins_keep_their_counts_and_get_the_lost_fraction():
    y = torch.tensor([[[4.0, 2.0, 9.0]]])
    w = torch.tensor([[[1.0, 0.5, 0.0]]])
    model = torch.tensor([[[5.0, 6.0, 7.0]]])
    out = R.repair_with(y, w, model, None)
    torch.testing.assert_close(out, torch.tensor([[[4.0, 2.0 + 3.0, 7.0]]]))


def test_iteration_count_is_chosen_by_the_lowest_pooled_error():
    sc = DEMO
    rng = np.random.default_rng(0)
    truth = Projector(sc, dtype=torch.float64).forward(_phantom(sc))[None]
    truth = truth * (20 / truth.max())
    noisy = torch.from_numpy(rng.poisson(truth.numpy())).double()
    mask = torch.from_numpy(P.dead_block_mask(sc, [4, 12])[:1]).double()
    its = [1, 2, 5, 10, 40]
    scores = R.reproject_scores(sc, noisy * mask, mask, truth, its, 4)
    assert sorted(scores) == its
    best, nmse = R.best_iterations([scores])
    assert nmse[best] == min(nmse.values())
    assert nmse[1] > nmse[best]  # one iteration is far from converged
    # the pooled NMSE is what reproject with that count gives
    rep = R.reproject(sc, (noisy * mask).float(), mask.float(), best, 4)
    assert _nmse(rep.double(), truth, mask == 0) == pytest.approx(nmse[best], rel=1e-4)
