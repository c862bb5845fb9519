"""Fully 3-D lines of response: exact integrals of a phantom's activity and attenuation along each
oblique LOR, z varying along it (``hpc simulate --preset realistic``).

The 2-D simulator (hpc.simulate.counts.plane_integrals) samples an oblique plane at its mid z and
lengthens each chord by the tilt; here every ring pair (ring_a, ring_b) is its own set of lines

    p(t) = d1 + t (d2 - d1),   z(t) = z_a + t (z_b - z_a),   t in [0, 1]

with d1 (in ring_a), d2 the detector positions of ``hpc.physics.geometry.lor_endpoints`` (V, X, 2)
mm and z_r = ph.z0 + r * ring_spacing_mm (the phantom's frame, as plane_integrals). A ring has a
width (its spacing): a pair's integral is the mean over ``sub`` x ``sub`` lines from sub-positions
across the two rings' widths. Organs and lesions are ellipsoids: a line enters and leaves one where
a quadratic in t vanishes, so the chords are exact. The body is an elliptic cylinder whose outline
scales smoothly with z (phantom._sections' wobble): its entry and exit solve the quadratic with the
outline at the crossing's own z, found by a few fixed-point steps (dwobble/dz ~ 1e-3, so they
converge to ~1e-6 mm in 3 steps).

    lines = Lines(sc, ph)
    act, mu = lines.integrals(z_a, z_b)           # (V, X) each, mm x activity and mm x mu / mm
    y = pair_attenuated(sc, ph, ra, rb)           # (M, V, X) mean over sub-lines of A exp(-mu)
"""
from __future__ import annotations

import numpy as np

from hpc.physics import factors as F
from hpc.physics import geometry as G
from hpc.simulate.counts import tof_weights
from hpc.simulate.phantom import Phantom

BODY_STEPS = 3  # fixed-point steps of the body's wobbling outline (each shrinks the error ~100x)
BODY_TOL_MM = 1e-3  # a body crossing's error estimate |g / g'| (mm along the line) above this: bisection
SUB = 2  # sub-positions across each ring's width: SUB x SUB lines per ring pair


def ring_z(sc: G.Scanner, ph: Phantom, ring: np.ndarray | int) -> np.ndarray:
    """Body coordinate (mm) of the centre of ``ring``: what plane_integrals samples a plane at."""
    return ph.z0 + np.asarray(ring, np.float64) * sc.ring_spacing_mm


def sub_offsets(sc: G.Scanner, sub: int) -> np.ndarray:
    """(sub,) axial offsets (mm) from a ring's centre: midpoints of ``sub`` equal parts of its width."""
    if sub < 1:
        raise ValueError(f"sub-positions per ring must be >= 1, got {sub}")
    return ((np.arange(sub) + 0.5) / sub - 0.5) * sc.ring_spacing_mm


def wobble(ph: Phantom, z: np.ndarray) -> np.ndarray:
    """The body outline's scale at body coordinate z (phantom._sections)."""
    phase, freq = ph.body[5], ph.body[6]
    return 1 + 0.04 * (1 + np.sin(2 * np.pi * freq * z + phase))


def wobble_slope(ph: Phantom, z: np.ndarray) -> np.ndarray:
    """d wobble / dz (1/mm)."""
    phase, freq = ph.body[5], ph.body[6]
    return 0.04 * 2 * np.pi * freq * np.cos(2 * np.pi * freq * z + phase)


class Lines:
    """The transaxial part of every LOR's quadratic, per ellipsoid, computed once: only the z of the
    two ends changes between ring pairs. Shapes: (E, V, X) per organ row, (V, X) for the body."""

    def __init__(self, sc: G.Scanner, ph: Phantom) -> None:
        e1, e2 = G.lor_endpoints(sc)  # (V, X, 2) each
        self.ph = ph
        self.dxy = e2 - e1  # (V, X, 2)
        self.len2 = (self.dxy ** 2).sum(-1)  # (V, X) squared transaxial length
        phi = G.lor_coordinates(sc)[0]
        # +1 where d1 -> d2 runs along d = (-sin phi, cos phi), the direction TOF positions are measured in
        self.tof_sign = np.sign(-self.dxy[..., 0] * np.sin(phi) + self.dxy[..., 1] * np.cos(phi))  # (V, X)
        o = ph.organs
        self.quad = self._quadratics(e1, o[:, 0], o[:, 1], o[:, 2], o[:, 3], o[:, 4])  # 3 x (E, V, X)
        x0, y0, a, b, rot = ph.body[:5]
        self.body = [q[0] for q in self._quadratics(e1, *(np.array([v]) for v in (x0, y0, a, b, rot)))]

    def _quadratics(self, e1: np.ndarray, x0, y0, a, b, rot) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(A, B, C), each (E, V, X): |u0 + t du|^2 = A t^2 + 2 B t + C, u the point in the ellipse's
        frame scaled by its semi-axes (u = 1 on the outline)."""
        c, s = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
        a, b = a[:, None, None], b[:, None, None]
        px, py = e1[None, ..., 0] - x0[:, None, None], e1[None, ..., 1] - y0[:, None, None]
        dx, dy = self.dxy[None, ..., 0], self.dxy[None, ..., 1]
        u0x, u0y = (px * c + py * s) / a, (-px * s + py * c) / b
        dux, duy = (dx * c + dy * s) / a, (-dx * s + dy * c) / b
        return dux ** 2 + duy ** 2, u0x * dux + u0y * duy, u0x ** 2 + u0y ** 2

    def _body_span(self, za: float, dz: float) -> tuple[np.ndarray, np.ndarray]:
        """(t_in, t_out) (V, X) where the lines enter and leave the body (equal where they miss it):
        roots of g(t) = |u(t)|^2 - wobble(z(t))^2, the outline's scale at each crossing's own z. A
        few fixed-point steps solve almost every line; a grazing one (where the step does not
        contract) is bisected in [0, t_min] / [t_min, 1] around g's minimum t_min."""
        qa, qb, qc = self.body

        def g(t: np.ndarray, i) -> np.ndarray:
            return (qa[i] * t + 2 * qb[i]) * t + qc[i] - wobble(self.ph, za + t * dz) ** 2

        everywhere = np.s_[...]
        t_min = -qb / qa  # g's minimum: the quadratic's, moved by the outline's slope (g' = 0)
        for _ in range(BODY_STEPS):
            z = za + np.clip(t_min, 0, 1) * dz
            t_min = (-qb + wobble(self.ph, z) * wobble_slope(self.ph, z) * dz) / qa
        t_min = np.clip(t_min, 0, 1)
        inside = g(t_min, everywhere) < 0  # the deepest point of the line is in the body
        t = []
        for sign in (-1.0, 1.0):  # entry, exit
            w = np.full(qa.shape, wobble(self.ph, za + 0.5 * dz))
            for _ in range(BODY_STEPS):
                root = np.sqrt(np.maximum(qb * qb - qa * (qc - w * w), 0))
                tk = np.clip((-qb + sign * root) / qa, 0, 1)
                w = wobble(self.ph, za + tk * dz)
            slope = np.maximum(np.abs(2 * (qa * tk + qb)), 1e-12)  # |dg/dt| without the wobble's small part
            error_mm = np.abs(g(tk, everywhere)) / slope * np.sqrt(self.len2 + dz * dz)
            bad = np.flatnonzero((inside & (error_mm > BODY_TOL_MM)).ravel())
            if bad.size:
                i = np.unravel_index(bad, qa.shape)
                lo, hi = (np.zeros(bad.size), t_min[i]) if sign < 0 else (t_min[i], np.ones(bad.size))
                tk[i] = _bisect(lambda t, i=i, sg=sign: g(t, i) * sg, lo, hi)  # f < 0 on the body side
            t.append(tk)
        return np.where(inside, t[0], 0.0), np.where(inside, t[1], 0.0)

    def chords(self, za: float, zb: float) -> list[tuple[float, float, np.ndarray, np.ndarray]]:
        """(activity, mu, t_in, t_out) of the body and of every organ row whose z range the lines from
        (d1, za) to (d2, zb) meet; t_in, t_out (V, X) in [0, 1], equal where a line misses it."""
        o = self.ph.organs
        dz = zb - za
        out = [(1.0, F.MU["soft tissue"], *self._body_span(za, dz))]
        lo, hi = min(za, zb), max(za, zb)
        for e in np.flatnonzero((o[:, 6] - o[:, 7] < hi) & (o[:, 6] + o[:, 7] > lo)):
            out.append((float(o[e, 5]), float(o[e, 8]), *self._ellipsoid_span(e, za, dz)))
        return out

    def integrals(self, za: float, zb: float) -> tuple[np.ndarray, np.ndarray]:
        """(activity, mu) line integrals (V, X) along the lines from (d1, za) to (d2, zb)."""
        length = np.sqrt(self.len2 + (zb - za) ** 2)  # (V, X) mm, 3-D
        act, mu = np.zeros_like(length), np.zeros_like(length)
        for a, m, t1, t2 in self.chords(za, zb):
            act += a * (t2 - t1)
            mu += m * (t2 - t1)
        return act * length, mu * length

    def tof_integrals(self, za: float, zb: float, sc: G.Scanner) -> tuple[np.ndarray, np.ndarray]:
        """(activity (T, V, X) split over ``sc``'s TOF bins, mu (V, X)): each chord's share of every
        TOF bin is the Gaussian kernel integrated over it (hpc.simulate.counts.tof_weights), its
        positions measured along the 3-D line from its midpoint in the direction d = (-sin phi,
        cos phi) of hpc.physics.geometry.tof_kernel (the 2-D simulator's convention)."""
        length = np.sqrt(self.len2 + (zb - za) ** 2)
        out = np.zeros((sc.tof_bins, *length.shape))
        mu = np.zeros_like(length)
        for a, m, t1, t2 in self.chords(za, zb):
            mu += m * (t2 - t1) * length
            v, x = np.nonzero(t2 > t1)
            if a == 0 or v.size == 0:
                continue
            sign, ln = self.tof_sign[v, x], length[v, x]
            l1, l2 = sign * (t1[v, x] - 0.5) * ln, sign * (t2[v, x] - 0.5) * ln
            w = tof_weights(sc, np.minimum(l1, l2), np.maximum(l1, l2))  # (T, hits)
            out[:, v, x] += w * (a * (t2[v, x] - t1[v, x]) * ln)
        return out, mu

    def _ellipsoid_span(self, e: int, za: float, dz: float) -> tuple[np.ndarray, np.ndarray]:
        """(t_in, t_out) (V, X) of the lines through organ row ``e`` (an ellipsoid)."""
        zc, zh = self.ph.organs[e, 6], self.ph.organs[e, 7]
        w0, dw = (za - zc) / zh, dz / zh
        qa, qb, qc = self.quad[0][e] + dw * dw, self.quad[1][e] + w0 * dw, self.quad[2][e] + w0 * w0 - 1
        root = np.sqrt(np.maximum(qb * qb - qa * qc, 0))
        return np.clip((-qb - root) / qa, 0, 1), np.clip((-qb + root) / qa, 0, 1)


def _bisect(f, lo: np.ndarray, hi: np.ndarray, steps: int = 48) -> np.ndarray:
    """Roots of ``f`` (vectorised, f(lo) < 0 <= f(hi)) to (hi - lo) / 2^steps."""
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        neg = f(mid) < 0
        lo, hi = np.where(neg, mid, lo), np.where(neg, hi, mid)
    return 0.5 * (lo + hi)


def pair_attenuated(sc: G.Scanner, ph: Phantom, ring_a: np.ndarray, ring_b: np.ndarray, sub: int = SUB,
                    attenuation: bool = True, lines: Lines | None = None, tof: G.Scanner | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(attenuated activity (M, V, X), or (M, T, V, X) split over the TOF bins of ``tof``; activity
    (M, V, X)) for the ring pairs ``ring_a``, ``ring_b`` (M,): each the mean over the pair's ``sub``
    x ``sub`` sub-lines of A exp(-mu) (of A). With TOF, each LOR's split over the bins is the central
    line's (exact for it; the sub-lines move a chord by under a ring width, against a TOF kernel of
    ~100 mm sigma): 4x faster. Virtual crystals get their geometric integral; the efficiencies zero them."""
    lines = lines or Lines(sc, ph)
    off = sub_offsets(sc, sub)
    za, zb = ring_z(sc, ph, ring_a), ring_z(sc, ph, ring_b)
    att = np.zeros((len(za), sc.views, sc.bins))
    geo = np.zeros_like(att)
    for m in range(len(za)):
        for ua in off:
            for ub in off:
                act, mu = lines.integrals(za[m] + ua, zb[m] + ub)
                geo[m] += act
                att[m] += act * np.exp(-mu) if attenuation else act
    att, geo = att / sub ** 2, geo / sub ** 2
    if tof is None:
        return att, geo
    split = np.empty((len(za), tof.tof_bins, sc.views, sc.bins))
    for m in range(len(za)):
        central = lines.tof_integrals(float(za[m]), float(zb[m]), tof)[0]  # (T, V, X)
        total = central.sum(0)
        frac = np.where(total > 0, central / np.where(total > 0, total, 1), 1 / tof.tof_bins)  # a miss: even
        split[m] = att[m] * frac
    return split, geo


def pair_acf(sc: G.Scanner, ph: Phantom, ring_a: np.ndarray, ring_b: np.ndarray) -> np.ndarray:
    """(M, V, X) attenuation factors exp(-integral of mu) along each pair's central line: what a
    reconstruction computes from a mu-map (hpc.simulate.estimates gives it an estimated phantom)."""
    lines = Lines(sc, ph)
    za, zb = ring_z(sc, ph, ring_a), ring_z(sc, ph, ring_b)
    return np.stack([np.exp(-lines.integrals(a, b)[1]) for a, b in zip(za, zb, strict=True)])


def point_values(ph: Phantom, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(activity, mu) at 3-D points (..., 3) by point-in-ellipsoid tests only (checks of :class:`Lines`)."""
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    x0, y0, a, b, rot = ph.body[:5]
    w = wobble(ph, z)
    c, s = np.cos(rot), np.sin(rot)
    inb = (((x - x0) * c + (y - y0) * s) / (a * w)) ** 2 + ((-(x - x0) * s + (y - y0) * c) / (b * w)) ** 2 <= 1
    act, mu = inb * 1.0, inb * F.MU["soft tissue"]
    for o in ph.organs:
        c, s = np.cos(o[4]), np.sin(o[4])
        q = (((x - o[0]) * c + (y - o[1]) * s) / o[2]) ** 2 + ((-(x - o[0]) * s + (y - o[1]) * c) / o[3]) ** 2
        inside = q + ((z - o[6]) / o[7]) ** 2 <= 1
        act, mu = act + o[5] * inside, mu + o[8] * inside
    return act, mu


def numeric_integrals(ph: Phantom, p1: np.ndarray, p2: np.ndarray, steps: int = 20000
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(activity, mu) integrals (L,) along the 3-D segments p1 -> p2 (L, 3) by the midpoint rule with
    ``steps`` points: an independent check of :class:`Lines`."""
    t = (np.arange(steps) + 0.5) / steps  # (S,)
    pts = p1[:, None, :] + t[None, :, None] * (p2 - p1)[:, None, :]  # (L, S, 3)
    step = np.linalg.norm(p2 - p1, axis=1) / steps  # (L,)
    act, mu = point_values(ph, pts)
    return act.sum(1) * step, mu.sum(1) * step
