"""Random anatomy-like phantoms for `hpc simulate`: a patient is a body outline plus organs, arms
and lesions, each an ellipsoid with an activity and an attenuation coefficient; ``ellipses_at`` /
``mu_at`` give the (E, 6) ellipses of a transverse cross-section, which hpc.simulate.simulate projects.

    ph = random_phantom(get_scanner("demo"), np.random.default_rng(1), "train")
    ell = ellipses_at(ph, ph.z0 + 40.0)   # (E, 6): x, y, a, b, rotation, activity
    ph.lesions                            # known positions (mm) and contrasts

"train" patients and held-out "test" patients differ (VARIANTS): training never sees the latter.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hpc.physics import factors as P
from hpc.physics import geometry as G

BODY_LENGTH_MM = 700.0  # shoulders to pelvis: the axial range the couch positions cover

# Organs in the body's frame: centre (x, y) and semi-axes (a, b) in units of the body's semi-axes,
# axial centre and half-length in mm along the body, activity added to the body's 1.0, attenuation
# coefficient added to soft tissue's (per mm, hpc.physics.factors.MU).
_LUNG, _BONE = P.MU["lung"] - P.MU["soft tissue"], P.MU["bone"] - P.MU["soft tissue"]
ORGANS = (  # name, x, y, a, b, z_centre, z_half, activity, mu
    ("lung_r", -0.45, 0.05, 0.32, 0.55, 170.0, 140.0, -0.8, _LUNG),
    ("lung_l", 0.45, 0.05, 0.30, 0.55, 170.0, 140.0, -0.8, _LUNG),
    ("heart", 0.15, 0.25, 0.25, 0.28, 230.0, 60.0, 2.5, 0.0),
    ("liver", -0.35, 0.05, 0.45, 0.55, 340.0, 90.0, 1.0, 0.0),
    ("spleen", 0.50, -0.25, 0.15, 0.22, 330.0, 50.0, 0.8, 0.0),
    ("kidney_r", -0.35, -0.40, 0.14, 0.20, 420.0, 55.0, 2.0, 0.0),
    ("kidney_l", 0.35, -0.40, 0.14, 0.20, 420.0, 55.0, 2.0, 0.0),
    ("bladder", 0.0, 0.25, 0.22, 0.25, 640.0, 45.0, 8.0, 0.0),
    ("spine", 0.0, -0.70, 0.10, 0.12, 350.0, 400.0, -0.4, _BONE),
)
# Phantom variations: training studies draw from "train"; held-out test studies from "test", which
# training never sees: slimmer patients with their arms down beside the body, fainter lesions.
VARIANTS = {  # body semi-axes (fraction of the FOV radius), arms, lesion contrast range
    "train": {"a": (0.62, 0.78), "b": (0.42, 0.55), "arms": False, "contrast": (3.0, 8.0)},
    "test": {"a": (0.50, 0.60), "b": (0.36, 0.42), "arms": True, "contrast": (1.8, 3.0)},
}
ARM = (0.10, 0.13, 0.6)  # semi-axes (fraction of the FOV radius) and activity of an arm


@dataclass
class Phantom:
    """Ellipsoids, each row one: x, y (mm), a, b (mm), rotation (rad), activity, z centre, z half, mu.
    Rows add up where they overlap; the body (activity 1, soft tissue) is under every organ and lesion."""
    body: np.ndarray  # (7,) x, y, a, b, rotation, axial phase, axial frequency (1/mm)
    organs: np.ndarray  # (E, 9) organs, arms, lesions
    z0: float  # body coordinate (mm) of the first ring's centre
    lesions: list[dict] = field(default_factory=list)  # known positions and contrasts (scanner frame)


def _inside(ell: np.ndarray, x: float, y: float) -> np.ndarray:
    """(E,) whether (x, y) lies in each ellipse (E, >= 5) x, y, a, b, rotation."""
    c, s = np.cos(ell[:, 4]), np.sin(ell[:, 4])
    dx, dy = x - ell[:, 0], y - ell[:, 1]
    return ((dx * c + dy * s) / ell[:, 2]) ** 2 + ((dy * c - dx * s) / ell[:, 3]) ** 2 <= 1


def _add_lesions(sc: G.Scanner, ph: Phantom, rng: np.random.Generator, contrast: tuple[float, float]) -> None:
    """1-4 lesions inside the scanned body, each with a known lesion-to-background ratio at its
    centre: the added activity is (contrast - 1) x the background there."""
    fov, axial_len = sc.fov_radius_mm, sc.rings * sc.ring_spacing_mm
    x0, y0, ba, bb = ph.body[:4]
    rows = []
    for _ in range(rng.integers(1, 5)):
        r, ang = 0.6 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        size = rng.uniform(0.025, 0.06) * fov
        x, y, zc = x0 + r * ba * np.cos(ang), y0 + r * bb * np.sin(ang), ph.z0 + rng.uniform(0, axial_len)
        ell = ellipses_at(ph, zc)
        background = float(ell[_inside(ell, x, y), 5].sum())
        c = rng.uniform(*contrast)
        row = [x, y, size, size * rng.uniform(0.7, 1), rng.uniform(0, np.pi), (c - 1) * background, zc,
               max(size, 2 * sc.ring_spacing_mm), 0.0]
        rows.append(row)
        ph.lesions.append({"x": float(x), "y": float(y), "z": float(zc - ph.z0), "a": row[2], "b": row[3],
                           "rotation": row[4], "z_half": row[7], "contrast": c, "background": background})
    ph.organs = np.concatenate([ph.organs, np.array(rows)])


def random_phantom(sc: G.Scanner, rng: np.random.Generator, variant: str = "train") -> Phantom:
    """A random patient of ``variant`` (VARIANTS) that fits the scanner's field of view."""
    v = VARIANTS[variant]
    fov, axial_len = sc.fov_radius_mm, sc.rings * sc.ring_spacing_mm
    ba, bb = fov * rng.uniform(*v["a"]), fov * rng.uniform(*v["b"])
    rot = rng.uniform(-0.1, 0.1)
    body = np.array([*rng.normal(0, 0.03 * fov, 2), ba, bb, rot, rng.uniform(0, 2 * np.pi),
                     rng.uniform(1 / 600, 1 / 250)])
    c, s = np.cos(rot), np.sin(rot)
    rows = []
    for _, x, y, a, b, zc, zh, act, mu in ORGANS:
        x, y = (np.array([x, y]) + rng.normal(0, 0.04, 2)) * (ba, bb)
        rows.append([body[0] + c * x - s * y, body[1] + s * x + c * y, a * ba * rng.uniform(0.85, 1.15),
                     b * bb * rng.uniform(0.85, 1.15), rot + rng.uniform(-0.3, 0.3), act * rng.uniform(0.7, 1.3),
                     zc + rng.normal(0, 15), zh * rng.uniform(0.85, 1.15), mu])
    if v["arms"]:  # beside the widest outline (wobble <= 8 %), not part of the body: absolute values
        aa, ab, act = ARM
        for side in (-1, 1):
            x = side * (1.08 * ba + 0.03 * fov + aa * fov)
            rows.append([body[0] + c * x, body[1] + s * x, aa * fov, ab * fov, rot, act, 350.0, 400.0,
                         P.MU["soft tissue"]])
    ph = Phantom(body, np.array(rows), rng.uniform(0, max(BODY_LENGTH_MM - axial_len, 0)))
    _add_lesions(sc, ph, rng, v["contrast"])
    return ph


def _sections(ph: Phantom, z: float, column: int, body_value: float) -> np.ndarray:
    x, y, a, b, rot, phase, freq = ph.body
    # smooth change of the outline; never narrower than the organs were placed in
    wobble = 1 + 0.04 * (1 + np.sin(2 * np.pi * freq * z + phase))
    body = np.array([[x, y, a * wobble, b * wobble, rot, body_value]])
    o = ph.organs
    u = (z - o[:, 6]) / o[:, 7]
    inside = np.abs(u) < 1
    scale = np.sqrt(1 - u[inside] ** 2)[:, None]  # an ellipsoid's cross-section
    organs = np.concatenate([o[inside, :2], o[inside, 2:4] * scale, o[inside, 4:5], o[inside, column:column + 1]],
                            axis=1)
    return np.concatenate([body, organs])


def ellipses_at(ph: Phantom, z: float) -> np.ndarray:
    """(E, 6) cross-sections at body coordinate z: x, y, a, b, rotation, activity."""
    return _sections(ph, z, 5, 1.0)


def mu_at(ph: Phantom, z: float) -> np.ndarray:
    """(E, 6) cross-sections of the attenuation map at body coordinate z: ..., mu (per mm)."""
    return _sections(ph, z, 8, P.MU["soft tissue"])
