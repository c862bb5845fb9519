"""hpc.data.augment: physics of view rotation/padding, exact inverses, corruption, consistent augmentation."""
from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from hpc.config import Config, Normalize, PadBins, choices
from hpc.data import augment as A
from hpc.data import build_loader
from hpc.data import fills as FL
from hpc.data import preprocess as PP

from helpers import decode, loader_cfg, make_dataset


def point_sinogram(views: int, bins: int, x: float, y: float) -> torch.Tensor:
    """(V, X) sinogram of a point at (x, y) in bin units: one hit per view at r = x cos(t) + y sin(t),
    bin = round(r) + X // 2 (STIR's t = bin - X // 2, so r -> -r is bin i -> X - i)."""
    s = torch.zeros(views, bins)
    for v in range(views):
        t = v * math.pi / views
        r = x * math.cos(t) + y * math.sin(t)
        s[v, int(math.floor(r + 0.5)) + bins // 2] = 1.0
    return s


@pytest.mark.parametrize("shift", [0, 3, 7, 11])
def test_rotate_views_is_a_physical_rotation(shift):
    v, nx = 12, 16
    x0, y0 = 3.3, -1.7
    phi = shift * math.pi / v
    rotated = point_sinogram(v, nx, x0 * math.cos(phi) - y0 * math.sin(phi), x0 * math.sin(phi) + y0 * math.cos(phi))
    got = A.rotate_views(point_sinogram(v, nx, x0, y0)[None, None], torch.tensor([shift]))[0, 0]
    assert torch.equal(got, rotated)


def test_mirror_is_t_to_minus_t():
    assert PP.mirror_index(6).tolist() == [0, 5, 4, 3, 2, 1]  # bin 0 (t = -3) has no partner
    assert PP.mirror_index(5).tolist() == [4, 3, 2, 1, 0]  # odd X: t in -2..2, a plain flip
    x = torch.rand(2, 3, 4, 8)
    assert torch.equal(PP.mirror_bins(PP.mirror_bins(x)), x)
    assert torch.equal(PP.mirror_bins(x)[..., 1:], x[..., 1:].flip(-1))
    assert torch.equal(PP.mirror_bins(x)[..., 0], x[..., 0])


@pytest.mark.parametrize("name", ["demo", "mmr"])
def test_mirrored_sinogram_is_the_object_rotated_by_180_degrees(name):
    """Exact projections (hpc.simulate.simulate.project, the chords of hpc.physics.geometry) of a phantom and of the
    same phantom rotated by 180 degrees: the second is the first with t -> -t, bit for bit on
    every bin that has a partner; and rotating by k views is a shift by k views."""
    from hpc.physics import geometry as G
    from hpc.simulate import counts as SC
    from hpc.simulate import phantom as PT

    sc = G.get_scanner(name)
    ph = PT.random_phantom(sc, np.random.default_rng(5))
    ell = PT.ellipses_at(ph, ph.z0 + 40.0)  # (E, 6): x, y, a, b, rotation, activity
    phi, s = G.lor_coordinates(sc)
    sino = torch.from_numpy(SC.project(sc, ell, phi, s)[0])  # (V, X)
    turned = ell.copy()
    turned[:, :2] *= -1  # (x, y) -> (-x, -y); an ellipse is symmetric about its centre
    rotated = torch.from_numpy(SC.project(sc, turned, phi, s)[0])
    assert sino.abs().sum() > 0 and not torch.equal(rotated, sino)
    assert torch.equal(PP.mirror_bins(sino)[:, 1:], rotated[:, 1:])
    assert torch.equal(A.flip_bins(sino[None, None], torch.tensor([True]))[0, 0, :, 1:], rotated[:, 1:])
    k = 5  # rotating the object by k detector steps shifts the views by k, the wrapped ones mirrored
    ang = 2 * np.pi * k / sc.detectors_per_ring
    c, si = np.cos(ang), np.sin(ang)
    spun = ell.copy()
    spun[:, 0], spun[:, 1] = c * ell[:, 0] - si * ell[:, 1], si * ell[:, 0] + c * ell[:, 1]
    spun[:, 4] += ang
    want = torch.from_numpy(SC.project(sc, spun, phi, s)[0])
    got = A.rotate_views(sino[None, None], torch.tensor([k]))[0, 0]
    torch.testing.assert_close(got[:, 1:], want[:, 1:], rtol=1e-9, atol=1e-9 * float(sino.max()))


def test_view_padding_continues_the_rotation():
    x = torch.rand(2, 3, 8, 6)
    p = PP.pad_views_periodic(x, 3, 2)  # (2, 3, 13, 6)
    assert torch.equal(p[..., 3:11, :], x)
    assert torch.equal(p[..., :3, :], A.rotate_views(x, torch.tensor([3, 3]))[..., :3, :])
    assert torch.equal(p[..., 11:, :], PP.mirror_bins(x[..., :2, :]))
    assert torch.equal(PP.pad_views_periodic(x, 8, 0)[..., :8, :], PP.mirror_bins(x))  # 180 degrees = mirror


def test_flip_and_full_turn():
    x = torch.rand(3, 2, 6, 8)
    flags = torch.tensor([True, False, True])
    assert torch.equal(A.flip_bins(A.flip_bins(x, flags), flags), x)
    assert torch.equal(A.flip_bins(x, flags)[1], x[1])
    assert torch.equal(A.flip_bins(x, flags)[0], PP.mirror_bins(x[0]))
    assert torch.equal(A.rotate_views(A.rotate_views(x, torch.tensor([2, 4, 5])), torch.tensor([4, 2, 1])),
                       PP.mirror_bins(x))  # 6 views = 180 degrees
    assert torch.equal(A.rotate_views(x, torch.tensor([12, -6, 18])),
                       torch.stack([x[0], PP.mirror_bins(x[1]), PP.mirror_bins(x[2])]))


@pytest.mark.parametrize("mode", choices(Normalize))
@pytest.mark.parametrize("bins_mode", choices(PadBins))
def test_preprocess_inverse_exact(mode, bins_mode):
    cfg = Config()
    cfg.data.normalize, cfg.data.pad_bins, cfg.data.pad_multiple = mode, bins_mode, 8
    pre = FL.build_preprocess(cfg, cfg.data.pad_multiple, scale=500.0)
    raw = torch.poisson(torch.full((3, 5, 13, 21), 40.0))  # odd sizes: uneven padding
    x, st = pre.forward(raw)
    assert x.shape == (3, 5, 16, 24) and st.pad == (1, 2, 1, 2)
    back = pre.inverse(pre.like(raw[:, 2:3], st), st)
    assert back.shape == (3, 1, 13, 21)
    torch.testing.assert_close(back, raw[:, 2:3], rtol=2e-7, atol=2e-5)
    m = pre.pad_mask(torch.zeros(3, 1, 13, 21), st)
    assert m[..., 1:14, 1:22].sum() == 0 and (m[..., :, 0] == (1 if bins_mode == "zero" else 0)).all()


@pytest.mark.parametrize("mode", choices(Normalize))
def test_inverse_floors_predictions_at_zero_counts(mode):
    """data.nonneg: a prediction below 0 counts comes back as exactly 0 (for anscombe too, whose
    quadratic inverse would otherwise turn large negative outputs into large positive counts);
    predictions at or above 0 counts are untouched. data.nonneg=false keeps them as they are."""
    cfg = Config()
    cfg.data.normalize, cfg.data.pad_multiple = mode, 1
    g = torch.Generator().manual_seed(0)
    raw = torch.poisson(torch.full((2, 1, 6, 8), 30.0), generator=g)
    x, st = FL.build_preprocess(cfg, 1, scale=100.0).forward(raw)
    y = x * (1 - 2 * torch.rand(x.shape, generator=g))  # about half of the outputs below 0 counts
    plain = PP.denormalize(y, mode, st.norm)  # what the inverse gives without the floor
    neg = y < PP.normalize(torch.zeros_like(raw), mode, st.norm)  # below the network-scale image of 0
    assert 0.2 < neg.float().mean() < 0.8
    got = FL.build_preprocess(cfg, 1, scale=100.0).inverse(y, st)
    assert (got >= 0).all() and got[neg].max() < 1e-6  # 0 up to anscombe's float rounding
    assert torch.equal(got[~neg], plain[~neg])
    cfg.data.nonneg = False
    assert torch.equal(FL.build_preprocess(cfg, 1, scale=100.0).inverse(y, st), plain)


def test_pad_multiple_from_model():
    from hpc.train.models import input_multiple

    cfg = Config()
    cfg.model.name, cfg.model.depth = "unet", 3
    assert input_multiple(cfg) == 8
    cfg.data.pad_multiple = 5
    assert input_multiple(cfg) == 5


def test_hash_blocks_and_thinning():
    ids = torch.tensor([5, 9, 5])
    b = A.choose_blocks(7, ids, 10, 3)
    assert torch.equal(b[0], b[2]) and not torch.equal(b[0], b[1])  # a function of the slice id
    assert all(len(set(row.tolist())) == 3 for row in b)
    assert not torch.equal(A.choose_blocks(8, ids, 10, 3), b)
    x = torch.full((4000,), 20.0)
    t = A.thin(x, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(t, t.round()) and (t <= x).all() and abs(t.mean().item() - 5.0) < 0.2


def test_thinning_by_measured_fraction():
    """Fully measured bins keep every count, lost ones none, partly measured ones a binomial share;
    the same generator gives the same draws."""
    x = torch.full((3, 2, 50, 40), 20.4)  # counts round to 20
    frac = torch.ones(3, 1, 50, 40)
    frac[:, :, :10] = 0.0
    frac[:, :, 10:30] = 0.25
    t = A.thin_fraction(x, frac, torch.Generator().manual_seed(1))
    assert t.shape == x.shape and torch.equal(t, t.round())
    assert (t[:, :, 30:] == 20).all() and (t[:, :, :10] == 0).all()
    part = t[:, :, 10:30]
    assert (part <= 20).all() and abs(part.mean().item() - 5.0) < 0.2 and part.std() > 1.0
    assert torch.equal(A.thin_fraction(x, frac, torch.Generator().manual_seed(1)), t)


def test_affine_identity_and_mask_outside_is_measured():
    x = torch.rand(2, 1, 8, 8)
    one = torch.ones(2)
    torch.testing.assert_close(A.affine(x, torch.zeros(2), one), x)
    prm = A.AugmentParams(None, None, torch.tensor([10.0, -10.0]), torch.tensor([0.8, 0.8]))
    m = A.apply_augment(torch.ones(2, 1, 8, 8), prm, is_mask=True)
    assert torch.equal(m, torch.ones_like(m))  # zoomed-out borders are not gaps


def test_loader_applies_one_transform_to_input_target_mask(tmp_path):
    """Every output pixel of the target names its source (slice, view, bin); the stored mask and
    the input must show the same source pixel there."""
    root = make_dataset(tmp_path / "d", studies=1, axial=(16,), views=6, bins=8, mask=True)
    cfg = loader_cfg(root, batch_size=8)
    cfg.corrupt.use_stored_mask = True
    cfg.augment.enabled, cfg.augment.p = True, 0.7
    stored = []
    for path in sorted(root.glob("shards/s0-*.h5")):
        with h5py.File(path) as f:
            stored.append(f["mask"][:])
    stored = np.concatenate(stored)  # (16, V, X)
    changed = 0
    for batch in build_loader(cfg, "train", 0, 1, torch.device("cpu")):
        tgt = batch.target[:, 0]
        src = (tgt - decode(tgt)[:, None, None] * 1000).long()  # (B, V, X) source pixel = v * X + b
        sv, sb = src // 8, src % 8
        ids = batch.index.view(-1, 1, 1).expand_as(src)
        assert torch.equal(batch.mask[:, 0], torch.from_numpy(stored)[ids, sv, sb].float())
        assert torch.equal(batch.input[:, 1], tgt * batch.mask[:, 0])
        changed += int((src != torch.arange(48).view(6, 8)).any(dim=(1, 2)).sum())
    assert changed > 0  # the augmentation did move pixels


def test_fill_radial_is_the_batched_linear_baseline():
    """Random rows and gap patterns (none, all, edges, interior): the torch pre-fill equals
    hpc.train.metrics.linear_interp_radial slice by slice; measured pixels are untouched."""
    from hpc.baselines.interp import linear_interp_radial

    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.random((6, 2, 5, 17)) * 50)  # (B, C, V, X) float64
    mask = torch.from_numpy((rng.random(x.shape) > rng.random((6, 2, 1, 1))).astype(np.float64))
    mask[0, 0, 0] = 0  # a row with nothing measured -> 0
    mask[0, 0, 1] = 1  # a row with no gap
    out = FL.fill_radial(x, mask)
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            want = linear_interp_radial(x[b, c].numpy(), mask[b, c].numpy())
            np.testing.assert_allclose(out[b, c].numpy(), want, rtol=1e-12, atol=1e-12)
    assert torch.equal(out[mask > 0.5], x[mask > 0.5]) and torch.all(out[0, 0, 0] == 0)


def test_fill_modes_and_preprocess_gaps():
    x = torch.tensor([[[[4.0, 0.0, 0.0, 10.0]]]])
    m = torch.tensor([[[[1.0, 0.0, 0.0, 1.0]]]])
    assert FL.zero_fill(x, m, {}, None).flatten().tolist() == [4.0, 0.0, 0.0, 10.0]
    assert FL.linear_fill(x, m, {}, None).flatten().tolist() == [4.0, 6.0, 8.0, 10.0]
