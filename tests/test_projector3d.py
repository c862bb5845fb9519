"""The 3-D Joseph projector (hpc.physics.projector3d), 3-D OSEM and reproject3d (hpc.physics.recon3d),
and the whole-study baseline (hpc.baselines.reproject3d), on tiny geometries."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hpc.baselines.stack import Stack
from hpc.physics import geometry as G
from hpc.physics import projdata as PD
from hpc.physics import recon as R
from hpc.physics import recon3d as R3
from hpc.physics.projector import ImageGrid, Projector
from hpc.physics.projector3d import Projector3D, Volume, default_volume
from hpc.registry import BASELINES

# 4 rings of 64 detectors (32 views), 24 bins ~6.4 mm apart (the detector blur spreads over 2-3 bins),
# a 36 mm field of view; 16 x 16 pixels of 4.5 mm; coarse 12 mm rings: clearly oblique planes
TINY = dataclasses.replace(G.get_scanner("demo"), rings=4, detectors_per_ring=64, bins=24, block_trans=8,
                           block_axial=2, max_ring_diff=-1, inner_radius_mm=60.0, doi_mm=5.0, bin_size_mm=3.0,
                           ring_spacing_mm=12.0)


def span3() -> PD.Layout:
    """Span 3 over 4 rings: segment 0 (ring differences -1..1, 7 planes), segments -1 / +1 (2..3)."""
    return PD.cti_layout(TINY, span=3, max_ring_diff=3)


def volume(layout: PD.Layout, size: int = 16) -> Volume:
    return default_volume(layout, size=size)


def test_adjoint_exact_float64_with_blur_and_chunks():
    lay = span3()
    p = Projector3D(lay, volume(lay), views=np.arange(1, lay.views, 3), blur=True, dtype=torch.float64,
                    chunk_samples=300)  # several view chunks
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, *p.volume.shape, dtype=torch.float64, generator=g)
    y = torch.rand(2, *p.sino_shape, dtype=torch.float64, generator=g)
    lhs, rhs = float((p.forward(x) * y).sum()), float((x * p.adjoint(y)).sum())
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)


def test_adjoint_view_mashing_float32():
    lay = PD.cti_layout(TINY, span=3, max_ring_diff=3, view_mashing=2)
    p = Projector3D(lay, volume(lay))
    x, y = torch.rand(*p.volume.shape), torch.rand(*p.sino_shape)
    lhs, rhs = float((p.forward(x).double() * y).sum()), float((x.double() * p.adjoint(y)).sum())
    assert abs(lhs - rhs) <= 1e-6 * abs(lhs)


def test_direct_planes_equal_the_2d_projector():
    """Span 1, segment 0: ring r lies on voxel 2r, so the axial weight is exactly 1 there."""
    lay = PD.span1_layout(TINY, [0])
    vol = volume(lay)
    p3 = Projector3D(lay, vol, dtype=torch.float64)
    p2 = Projector(TINY, vol.grid, dtype=torch.float64)
    x = torch.rand(*vol.shape, dtype=torch.float64)
    got = p3.forward(x)
    want = torch.stack([p2.forward(x[2 * r]) for r in range(TINY.rings)])
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())
    y = torch.rand(*p3.sino_shape, dtype=torch.float64)
    back = p3.adjoint(y)
    assert torch.allclose(back[0::2], p2.adjoint(y), rtol=0, atol=1e-12 * float(back.abs().max()))
    assert float(back[1::2].abs().max()) == 0  # direct LORs never touch the half-ring voxels


def test_oblique_plane_of_a_uniform_cylinder_is_longer_by_the_tilt():
    lay = PD.span1_layout(TINY, [0, 3])  # segment 3: ring pair (0, 3), tilted by 36 mm over the chord
    vol = volume(lay)
    p = Projector3D(lay, vol, dtype=torch.float64)
    x = torch.ones(vol.shape, dtype=torch.float64)  # uniform in z over the slab
    sino = p.forward(x)  # (5, V, X): 4 direct planes, then the oblique one
    pa, pb = G.lor_endpoints(TINY)
    dxy = np.hypot(*(pb - pa).transpose(2, 0, 1))  # (V, X) transaxial chord length
    sec = np.sqrt(1 + (3 * TINY.ring_spacing_mm / dxy) ** 2)
    ratio = (sino[4] / sino[0].clamp_min(1e-30)).numpy()
    hit = sino[0].numpy() > 1e-6
    np.testing.assert_allclose(ratio[hit], sec[hit], rtol=1e-12)
    assert sec.min() > 1.03  # the test means something (3.8 % at the centre)


def test_span_plane_sums_its_ring_pairs():
    lay = span3()
    vol = volume(lay)
    x = torch.rand(*vol.shape, dtype=torch.float64)
    compressed = Projector3D(lay, vol, dtype=torch.float64).forward(x)
    pairs = PD.span1_layout(TINY, [-3, -2, -1, 0, 1, 2, 3])
    each = Projector3D(pairs, vol, dtype=torch.float64).forward(x)
    plane, ra, rb = lay.ring_pairs
    seg, ax = pairs.ring_pair_plane(ra, rb)
    want = torch.zeros_like(compressed).index_add_(0, torch.as_tensor(plane), each[pairs.plane_of(seg, ax)])
    assert torch.allclose(compressed, want, rtol=1e-12, atol=0)


def test_rejects_what_it_does_not_support():
    lay = span3()
    with pytest.raises(ValueError, match="square"):
        Projector3D(lay, Volume(ImageGrid(8, 10, 5.0), 7, 0, 20.0))
    with pytest.raises(ValueError, match="does not cover"):
        Projector3D(lay, Volume(ImageGrid(8, 8, 5.0), 5, 0, 20.0))
    p = Projector3D(lay, volume(lay))
    with pytest.raises(ValueError, match="volume"):
        p.forward(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="sinogram"):
        p.adjoint(torch.zeros(3, 16, 16))


# ---------------------------------------------------------------- OSEM and the repair
def phantom(vol: Volume) -> torch.Tensor:
    """(nz, ny, nx) float64: a disc with a hot off-centre insert that changes along z."""
    xc, yc = vol.grid.centres()
    x, y = np.meshgrid(xc, yc)
    z = np.arange(vol.nz)[:, None, None]
    img = (x ** 2 + y ** 2 < 30.0 ** 2) * 1.0 + ((x - 10 + 2 * z) ** 2 + (y - 7) ** 2 < 10.0 ** 2) * 3.0
    return torch.as_tensor(np.broadcast_to(img, vol.shape).copy() * (1 + 0.1 * z))


def noise_free(lay: PD.Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(truth y (P, V, X), mult, add, gap weight) of the phantom, blurred, with known factors."""
    vol = volume(lay)
    g = torch.Generator().manual_seed(1)
    mult = 0.5 + torch.rand(lay.planes, lay.views, lay.bins, generator=g, dtype=torch.float64)
    add = torch.full_like(mult, 0.2)
    y = mult * Projector3D(lay, vol, blur=True, dtype=torch.float64).forward(phantom(vol)) + add
    w = torch.ones_like(y)
    w[:, 5:12, 8:14] = 0  # a gap in every plane, over a few views
    return y, mult, add, w


def test_osem_decreases_the_negative_log_likelihood():
    lay = span3()
    y, mult, add, w = noise_free(lay)
    nll = []

    def record(it: int, x: torch.Tensor) -> None:
        ybar = w * (mult * R3.model_counts3d(lay, x, volume=volume(lay)) + add)
        nll.append(R3.neg_log_likelihood(y, ybar, w))

    R3.osem3d(lay, y, 6, 2, weight=w, mult=mult, add=add, volume=volume(lay), callback=record)
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(nll, nll[1:], strict=False)), nll


def test_reproject3d_beats_the_2d_reproject_in_oblique_gaps():
    lay = span3()
    y, mult, add, w = noise_free(lay)
    rep3 = R3.reproject3d_path(lay, y, w, (4, 8), 2, mult=mult, add=add, volume=volume(lay))
    rep2 = R.reproject(TINY, y, w, 8, 2, mult=mult, add=add, grid=volume(lay).grid)
    gap = w == 0
    err3 = float(((rep3[8] - y)[gap] ** 2).sum() / (y[gap] ** 2).sum())
    err2 = float(((rep2 - y)[gap] ** 2).sum() / (y[gap] ** 2).sum())
    assert err3 < err2, (err3, err2)
    assert set(rep3) == {4, 8}


def test_reproject3d_keeps_measured_bins_byte_identical():
    lay = span3()
    y, mult, add, w = noise_free(lay)
    y = torch.poisson(y * 50, generator=torch.Generator().manual_seed(3)).float()  # counts
    valid = torch.ones_like(y, dtype=torch.bool)
    valid[:, :, 0] = False
    out = R3.reproject3d(lay, y, w, 2, 2, valid=valid, mult=mult.float(), add=add.float() * 50, volume=volume(lay))
    keep = (w > 0) & valid
    assert out.dtype == y.dtype and torch.equal(out[keep], y[keep])
    assert float(out[~valid].abs().max()) == 0 and bool((out[w == 0] > 0).all())


def test_reproject3d_on_the_device_equals_the_cpu(device):
    """The baseline on ``device`` (CUDA on a GPU node: `pytest -m gpu`) gives the CPU's float64 repair
    to rounding, and the measured bins byte for byte."""
    lay = span3()
    y, mult, add, w = noise_free(lay)
    y = torch.poisson(y * 50, generator=torch.Generator().manual_seed(4)).double()
    args = dict(valid=None, mult=mult.double(), add=add.double() * 50, volume=volume(lay))
    cpu = R3.reproject3d(lay, y, w, 3, 2, **args)
    on = R3.reproject3d(lay, y.to(device), w.to(device), 3, 2,
                        **{k: v.to(device) if torch.is_tensor(v) else v for k, v in args.items()})
    assert on.device.type == device.type
    on = on.cpu()
    assert torch.equal(on[w > 0], y[w > 0])
    assert torch.allclose(on, cpu, rtol=1e-9, atol=0)
    st = Stack(y.numpy(), w.numpy(), np.ones(y.shape, bool), mult.numpy(), add.numpy() * 50, TINY, layout=lay)
    run = BASELINES.get("reproject3d")
    got, want = (run(dataclasses.replace(st, memo={}), np.arange(lay.planes), iters=3, device=d)
                 for d in (device.type, "cpu"))
    np.testing.assert_allclose(got, want, rtol=1e-4)  # float32 reconstructions: sums in another order


def test_baseline_whole_study():
    lay = span3()
    y, mult, add, w = noise_free(lay)
    meta = BASELINES.meta("reproject3d")
    assert meta["whole_study"] and meta["needs_scanner"] and meta["tune"] == {"iters": (1, 2, 3, 4, 6, 8, 12, 16)}
    st = Stack(y.numpy(), w.numpy(), np.ones(y.shape, bool), mult.numpy(), add.numpy(), TINY, layout=lay)
    planes = np.array([2, 9])
    got = BASELINES.get("reproject3d")(st, planes, iters=2)
    assert got.shape == (2, lay.views, lay.bins)
    np.testing.assert_array_equal(got[w.numpy()[planes] > 0], y.numpy()[planes][w.numpy()[planes] > 0])
    no_blur = BASELINES.get("reproject3d")(st, planes, iters=2, blur=False)
    assert not np.array_equal(no_blur, got)
    with pytest.raises(ValueError, match="non-TOF"):
        BASELINES.get("reproject3d")(dataclasses.replace(st, y=y.numpy()[:3], memo={}), planes)
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, got 'gpu'"):
        BASELINES.get("reproject3d")(st, planes, device="gpu")


def test_hpc_predict_method_reproject3d(tmp_path, capsys):
    """`hpc predict --method reproject3d` through hpc.repair.methods: measured bins keep their bytes,
    gaps get positive model counts, the blur switch reaches the baseline."""
    from hpc.cli import main
    from hpc.io.headers import read_header
    from hpc.io.sinogram import SinogramReader, write_sinogram

    sc = G.get_scanner("test")  # 4 rings, 12 views x 12 bins
    lay = PD.span1_layout(sc, [0, -1, 1])
    vol = default_volume(lay)
    truth = Projector3D(lay, vol).forward(torch.ones(vol.shape)).numpy()
    rng = np.random.default_rng(3)
    data = rng.poisson(truth * 20 / truth.max() + 1).astype(np.float32)
    mask = np.ones(data.shape, np.uint8)
    mask[:, 3:6, 4:8] = 0
    src = write_sinogram(tmp_path / "s", data * mask, fmt="stir", layout=lay)
    msk = write_sinogram(tmp_path / "m", mask, fmt="stir", layout=lay)
    outs = {}
    for name, params in (("blur", []), ("noblur", ["--method-param", "blur=false"])):
        rc = main(["predict", "--method", "reproject3d", "--method-param", "iters=2", *params, str(src),
                   "--mask", str(msk), "-o", str(tmp_path / f"{name}.hs"), "--quiet"])
        assert rc == 0, capsys.readouterr().err
        with SinogramReader(read_header(tmp_path / f"{name}.hs")) as r:
            outs[name] = r.read(0, r.spec.num_slices)
    got = outs["blur"]
    assert np.array_equal(got[mask > 0], data[mask > 0]) and (got[mask == 0] > 0).all()
    assert not np.array_equal(got, outs["noblur"])


def test_baseline_without_layout(recwarn):
    """hpc evaluate hands segment stacks without a layout: span-1 segment 0 (one plane per ring) is
    still reconstructed in 3-D; any other stack falls back to the 2-D reproject, with a warning."""
    lay = PD.span1_layout(TINY, [0])
    y, mult, add, w = noise_free(lay)
    st = Stack(y.numpy(), w.numpy(), np.ones(y.shape, bool), mult.numpy(), add.numpy(), TINY)
    planes = np.arange(TINY.rings)
    got = BASELINES.get("reproject3d")(st, planes, iters=2)
    want = BASELINES.get("reproject3d")(dataclasses.replace(st, layout=lay, memo={}), planes, iters=2)
    np.testing.assert_array_equal(got, want)
    assert not recwarn.list
    part = dataclasses.replace(st, y=st.y[:3], w=st.w[:3], valid=st.valid[:3], mult=st.mult[:3],
                               randoms=st.randoms[:3], memo={})
    with pytest.warns(UserWarning, match="2-D reproject"):
        got = BASELINES.get("reproject3d")(part, np.arange(3), iters=2)
    np.testing.assert_array_equal(got, BASELINES.get("reproject")(part, np.arange(3), iters=2))


def test_a_slab_of_central_planes_is_its_rings_of_the_whole():
    """A layout of central planes (hpc simulate --planes) touches rings 1..2 only: its volume starts at
    ring 1 and its projection is the whole scanner's projection of those planes."""
    whole = PD.cti_layout(TINY, span=3, max_ring_diff=1)  # segment 0 only: 7 planes at half-ring steps
    part = PD.Layout(TINY, (0,), (-1,), (1,), (3,))  # its 3 central planes
    vp, vw = volume(part), volume(whole)
    assert (vp.ring0, vp.nz, vw.nz) == (1, 3, 7)
    x = torch.rand(*vw.shape, dtype=torch.float64)
    x[:2], x[5:] = 0, 0  # nothing outside the part's rings
    got = Projector3D(part, vp, dtype=torch.float64).forward(x[2:5])
    want = Projector3D(whole, vw, dtype=torch.float64).forward(x)[2:5]
    assert torch.allclose(got, want, rtol=1e-12, atol=0)


def test_planned_iteration_counts_come_from_one_run():
    """hpc evaluate's tuning plans several iteration counts on one stack: the first call runs OSEM once
    to the largest and keeps every planned count; each equals a run of its own."""
    lay = PD.span1_layout(TINY, [0])
    y, mult, add, w = noise_free(lay)
    st = Stack(y.numpy(), w.numpy(), np.ones(y.shape, bool), mult.numpy(), add.numpy(), TINY, layout=lay)
    st.planned["reproject3d"] = [{"iters": 1}, {"iters": 3}, {"iters": 3, "blur": False}]
    planes = np.arange(TINY.rings)
    first = BASELINES.get("reproject3d")(st, planes, iters=1)
    assert {k for k in st.memo if k[0] == "reproject3d"} == {("reproject3d", 1, True), ("reproject3d", 3, True)}
    for iters, got in ((1, first), (3, BASELINES.get("reproject3d")(st, planes, iters=3))):
        alone = BASELINES.get("reproject3d")(dataclasses.replace(st, memo={}, planned={}), planes, iters=iters)
        np.testing.assert_allclose(got, alone, rtol=1e-6)
    assert not np.allclose(first, BASELINES.get("reproject3d")(st, planes, iters=3))
