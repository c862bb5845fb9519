"""Mu-maps: STIR and Siemens headers (hpc.io.mumap), attenuation factors (hpc.physics.attenuation)
of a uniform cylinder against exp(-mu L) with analytic chord lengths, span / mashing averages, STIR's
centring, off-centre maps, one-line refusals. The real NEMA mu-map's checks are
bench/listmode_real.py (SIRF's file is not in the repository)."""
from __future__ import annotations

import numpy as np
import pytest

from hpc.errors import InputError
from hpc.io import mumap as MF
from hpc.physics import attenuation as M
from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.physics import projector as J

MU = 0.096  # 1/cm, water
RADIUS = 150.0  # mm


def cylinder(n: int, px: float, slices: int = 40, dz: float = 6.0, shift: tuple[float, float] = (0, 0)) -> M.MuMap:
    """A uniform cylinder centred on STIR's pixel 0 (index n // 2) + ``shift`` (x, y mm), partial
    pixels area-weighted."""
    centre = (n // 2 - (n - 1) / 2) * px  # hpc's grid is centred on (n - 1) / 2
    ell = np.array([[centre + shift[0], centre + shift[1], RADIUS, RADIUS, 0, MU]])
    img = J.ellipse_image(ell, J.ImageGrid(n, n, px), oversample=8)
    return M.MuMap(np.repeat(img[None], slices, 0).astype(np.float32), (dz, px, px))


def chord(s: np.ndarray) -> np.ndarray:
    return 2 * np.sqrt(np.clip(RADIUS ** 2 - s ** 2, 0, None))


@pytest.mark.parametrize("fmt", ["stir", "siemens"])
def test_cylinder_matches_exp_mu_l(tmp_path, fmt):
    sc = G.get_scanner("demo")
    mu = MF.read_mumap(MF.write_mumap(tmp_path / "cyl", cylinder(151, 4.0), fmt))
    lay = P.cti_layout(sc, 1, 7)
    af = M.attenuation_factors(mu, lay)
    _, s = G.lor_coordinates(sc)
    pl, ra, rb = lay.ring_pairs
    f = M.obliquity(sc, rb - ra, M.transaxial_length(sc))  # (P, U, X): span 1, one pair per plane
    line = -np.log(af)  # integral of mu (1/mm x mm)
    exact = MU / 10 * chord(s)[None] * f
    inner = np.broadcast_to(np.abs(s) < RADIUS - 8, line.shape)
    np.testing.assert_allclose(line[inner], exact[inner], rtol=0.01)
    lo = MU / 10 * chord(np.abs(s) + 4.0)[None] * f - 1e-3  # a pixel's worth of edge either way
    hi = MU / 10 * chord(np.maximum(np.abs(s) - 4.0, 0))[None] * f + 1e-3
    assert (((line >= lo) & (line <= hi)) | (np.abs(line - exact) <= 0.01 * exact)).all()
    assert (af[np.broadcast_to(np.abs(s) > RADIUS + 6, af.shape)] == 1).all()


def test_span_and_mashing_average_ring_pairs_and_views(tmp_path):
    sc = G.get_scanner("demo")
    mu = cylinder(151, 4.0)
    one, lay = M.attenuation_factors(mu, P.cti_layout(sc, 1, 7)), P.cti_layout(sc, 3, 7, view_mashing=2)
    af = M.attenuation_factors(mu, lay)
    src = P.cti_layout(sc, 1, 7)
    plane, ra, rb = lay.ring_pairs
    want = np.zeros((lay.planes, sc.views, sc.bins))
    np.add.at(want, plane, one[src.plane_of(rb - ra, np.minimum(ra, rb))])
    want /= np.bincount(plane)[:, None, None]
    np.testing.assert_allclose(af, want.reshape(lay.planes, lay.views, 2, -1).mean(2), rtol=1e-5)


def test_even_sizes_are_centred_like_stir():
    sc = G.get_scanner("demo")
    lay = P.cti_layout(sc, 1, 0)
    odd, even = cylinder(151, 4.0), cylinder(150, 4.0)
    np.testing.assert_allclose(M.attenuation_factors(even, lay), M.attenuation_factors(odd, lay), atol=2e-3)


def test_read_errors(tmp_path):
    header = MF.write_mumap(tmp_path / "m", cylinder(21, 10.0, 4))
    (tmp_path / "m.v").write_bytes((tmp_path / "m.v").read_bytes()[:-4])
    with pytest.raises(InputError, match="truncated"):
        MF.read_mumap(header)
    big = cylinder(21, 10.0, 4)
    header = MF.write_mumap(tmp_path / "b", M.MuMap(big.values * 10000, big.voxel_mm))
    with pytest.raises(InputError, match="1/cm"):
        MF.read_mumap(header)
    header = MF.write_mumap(tmp_path / "o", cylinder(21, 10.0, 4))
    header.write_text(header.read_text().replace("!END", "first pixel offset (mm) [3] := 5\n!END"))
    with pytest.raises(InputError, match="axial offset is not supported") as exc:
        MF.read_mumap(header)
    assert "\n" not in str(exc.value) and "o.hv" in str(exc.value)


@pytest.mark.parametrize("fmt", ["stir", "siemens"])
def test_first_pixel_offsets_place_the_map(tmp_path, fmt):
    """A map cropped (no longer centred on the axis) with `first pixel offset (mm)` saying where its
    pixels are gives the same factors as the centred map (whole pixels: an exact shift); a map whose
    header moves it by 40 mm gives the factors of a cylinder moved by 40 mm."""
    sc = G.get_scanner("demo")
    lay = P.cti_layout(sc, 1, 0)
    full = cylinder(151, 4.0, slices=8, dz=16.0)  # axis at index 75 in both directions
    crop = M.MuMap(full.values[:, 12:, 3:140].copy(), full.voxel_mm, origin_mm=(-63 * 4.0, -72 * 4.0))
    back = MF.read_mumap(MF.write_mumap(tmp_path / "crop", crop, fmt))
    assert back.origin_mm == pytest.approx((-252.0, -288.0))
    np.testing.assert_allclose(M.attenuation_factors(back, lay), M.attenuation_factors(full, lay), atol=1e-6)
    moved = M.MuMap(full.values, full.voxel_mm, origin_mm=(-300.0, -260.0))  # +40 mm in x
    want = cylinder(151, 4.0, slices=8, dz=16.0, shift=(40.0, 0.0))
    np.testing.assert_allclose(M.attenuation_factors(moved, lay), M.attenuation_factors(want, lay), atol=2e-3)
