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
converge to rounding in 3-4 steps).

    lines = Lines(sc, ph)
    act, mu = lines.integrals(z_a, z_b)           # (V, X) each, mm x activity and mm x mu / mm
    y = pair_attenuated(sc, ph, ra, rb)           # (M, V, X) mean over sub-lines of A exp(-mu)
"""
from __future__ import annotations

import numpy as np

from hpc.physics import factors as F
from hpc.physics import geometry as G
from hpc.simulate.phantom import Phantom

BODY_STEPS = 4  # fixed-point steps of the body's wobbling outline (converged to ~1e-12 mm)
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


class Lines:
    """The transaxial part of every LOR's quadratic, per ellipsoid, computed once: only the z of the
    two ends changes between ring pairs. Shapes: (E, V, X) per organ row, (V, X) for the body."""

    def __init__(self, sc: G.Scanner, ph: Phantom) -> None:
        e1, e2 = G.lor_endpoints(sc)  # (V, X, 2) each
        self.ph = ph
        self.dxy = e2 - e1  # (V, X, 2)
        self.len2 = (self.dxy ** 2).sum(-1)  # (V, X) squared transaxial length
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

    def _body_span(self, za: float, dz: float) -> np.ndarray:
        """(V, X) fraction of t in [0, 1] inside the body; outline scale taken at each crossing's z."""
        qa, qb, qc = self.body
        t = []
        for sign in (-1.0, 1.0):  # entry, exit
            w = np.full(qa.shape, wobble(self.ph, za + 0.5 * dz))
            for _ in range(BODY_STEPS):
                root = np.sqrt(np.maximum(qb * qb - qa * (qc - w * w), 0))
                tk = (-qb + sign * root) / qa
                w = wobble(self.ph, za + np.clip(tk, 0, 1) * dz)
            t.append(np.clip(tk, 0, 1))
        inside = qb * qb - qa * (qc - w * w) > 0
        return np.where(inside, t[1] - t[0], 0.0)

    def integrals(self, za: float, zb: float) -> tuple[np.ndarray, np.ndarray]:
        """(activity, mu) line integrals (V, X) along the lines from (d1, za) to (d2, zb)."""
        o = self.ph.organs
        dz = zb - za
        length = np.sqrt(self.len2 + dz * dz)  # (V, X) mm, 3-D
        body = self._body_span(za, dz)
        act, mu = body * 1.0, body * F.MU["soft tissue"]
        lo, hi = min(za, zb), max(za, zb)
        for e in np.flatnonzero((o[:, 6] - o[:, 7] < hi) & (o[:, 6] + o[:, 7] > lo)):  # organs the line's z meets
            span = self._ellipsoid_span(e, za, dz)
            act = act + o[e, 5] * span
            mu = mu + o[e, 8] * span
        return act * length, mu * length

    def _ellipsoid_span(self, e: int, za: float, dz: float) -> np.ndarray:
        """(V, X) fraction of t in [0, 1] inside organ row ``e`` (an ellipsoid)."""
        zc, zh = self.ph.organs[e, 6], self.ph.organs[e, 7]
        w0, dw = (za - zc) / zh, dz / zh
        qa, qb, qc = self.quad[0][e] + dw * dw, self.quad[1][e] + w0 * dw, self.quad[2][e] + w0 * w0 - 1
        root = np.sqrt(np.maximum(qb * qb - qa * qc, 0))
        t1, t2 = np.clip((-qb - root) / qa, 0, 1), np.clip((-qb + root) / qa, 0, 1)
        return t2 - t1


def pair_attenuated(sc: G.Scanner, ph: Phantom, ring_a: np.ndarray, ring_b: np.ndarray, sub: int = SUB,
                    attenuation: bool = True, lines: Lines | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(attenuated activity, activity) integrals (M, V, X) for the ring pairs ``ring_a``, ``ring_b``
    (M,): each the mean over the pair's ``sub`` x ``sub`` sub-lines of A exp(-mu) (of A). Virtual
    crystals get their geometric integral; the efficiencies zero them."""
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
    return att / sub ** 2, geo / sub ** 2


def pair_acf(sc: G.Scanner, ph: Phantom, ring_a: np.ndarray, ring_b: np.ndarray) -> np.ndarray:
    """(M, V, X) attenuation factors exp(-integral of mu) along each pair's central line: what a
    reconstruction computes from a mu-map (hpc.simulate.estimates gives it an estimated phantom)."""
    lines = Lines(sc, ph)
    za, zb = ring_z(sc, ph, ring_a), ring_z(sc, ph, ring_b)
    return np.stack([np.exp(-lines.integrals(a, b)[1]) for a, b in zip(za, zb, strict=True)])


def numeric_integrals(ph: Phantom, p1: np.ndarray, p2: np.ndarray, steps: int = 20000
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(activity, mu) integrals (L,) along the 3-D segments p1 -> p2 (L, 3) by the midpoint rule with
    ``steps`` points: an independent check of :class:`Lines` (point-in-ellipsoid tests only)."""
    t = (np.arange(steps) + 0.5) / steps  # (S,)
    pts = p1[:, None, :] + t[None, :, None] * (p2 - p1)[:, None, :]  # (L, S, 3)
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    step = np.linalg.norm(p2 - p1, axis=1) / steps  # (L,)
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
    return act.sum(1) * step, mu.sum(1) * step
