"""The ``realistic`` simulation preset (``hpc simulate --preset realistic``): the physics that decides
how repair methods rank, each an option of :class:`Preset`:

- fully 3-D lines of response with finite ring width (hpc.simulate.lines3d; off: the 2-D planes of
  hpc.simulate.counts, each ring pair at its mid z, chords lengthened by the tilt);
- detector blur across bins (hpc.physics.blur), applied to the attenuated projection before the
  efficiencies: expected prompts = eff x K(att x A x) + scatter + randoms;
- scatter (hpc.simulate.scatter), a fraction of the prompts in the body;
- estimated factors (hpc.simulate.estimates): the files the methods read hold eff_hat x att_hat
  (``_mult``) and randoms_hat + scatter_hat (``_randoms``), ``_expected`` the true expected prompts;
- a clinical count level: mean expected prompts per bin in the body (``counts_per_bin``);
- a slab of the scanner's first ``rings`` rings (hpc.physics.geometry.slab), its own span.

TOF (mCT): each 3-D chord is split over the TOF bins by the Gaussian timing kernel along the 3-D
line (lines3d.Lines.tof_integrals; a LOR's split is its central line's), blurred per TOF bin;
scatter follows each TOF bin's smoothed trues, randoms spread evenly. Fractions and the count
level are of the expected prompts (TOF bins summed) over the bins in the body (bins whose real
LORs cross the phantom's activity).

    means, info = realistic_means(layout, phantom, Preset(), rng)
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import numpy as np

from hpc.physics import blur as B
from hpc.physics import factors as F
from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.physics import randoms as PR
from hpc.simulate import counts as SC
from hpc.simulate import estimates as E
from hpc.simulate import layout as SL
from hpc.simulate import lines3d as L3
from hpc.simulate import scatter as S
from hpc.simulate.phantom import Phantom, mu_at


@dataclass(frozen=True)
class Preset:
    """What the engine simulates; ``NONE`` turns every option off, ``REALISTIC`` on."""
    lines3d: bool = True  # 3-D LORs with ring width (else 2-D mid-z planes)
    sub: int = L3.SUB  # sub-positions across each ring's width (3-D lines)
    blur_fwhm_mm: float = B.FWHM0_MM  # detector blur FWHM at the centre (0 = none); widens off centre
    scatter: float = S.FRACTION  # scatter fraction of the prompts in the body
    randoms: float = 0.25  # randoms fraction of the prompts in the body
    eff_error: float = E.EFF_ERROR  # relative error of the estimated crystal efficiencies
    mu_shift_mm: float = E.MU_SHIFT_MM  # misregistration of the estimated mu-map (x)
    mu_bone: bool = False  # does the estimated mu-map have bone
    randoms_estimate: bool = True  # randoms from ML singles of noisy delayeds (else exact)
    scatter_error: float = E.SCATTER_ERROR  # estimate = (1 + error) x truth
    counts_per_bin: float = 4.0  # mean expected prompts per bin in the body
    rings: int = 8  # slab of the scanner's first rings (0 = all)


NONE = Preset(lines3d=False, sub=1, blur_fwhm_mm=0.0, scatter=0.0, eff_error=0.0, mu_shift_mm=0.0, mu_bone=True,
              randoms_estimate=False, scatter_error=0.0, rings=0)
REALISTIC = Preset()


def check(p: Preset) -> None:
    """ValueError naming the first value out of range."""
    checks = [(p.sub >= 1, f"sub-positions must be >= 1, got {p.sub}"),
              (p.blur_fwhm_mm >= 0, f"blur FWHM must be >= 0 mm, got {p.blur_fwhm_mm}"),
              (0 <= p.scatter < 1 and 0 <= p.randoms < 1 and p.scatter + p.randoms < 1,
               f"scatter {p.scatter} and randoms {p.randoms} fractions must be in [0, 1) with a sum < 1"),
              (p.eff_error >= 0, f"efficiency error must be >= 0, got {p.eff_error}"),
              (p.scatter_error > -1, f"scatter error must be > -1, got {p.scatter_error}"),
              (p.counts_per_bin > 0, f"counts per bin must be > 0, got {p.counts_per_bin}"),
              (p.rings >= 0, f"rings must be >= 0, got {p.rings}")]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


@dataclass
class Parts:
    """Per plane (P, V, X) sums over each bin's LORs, in arbitrary units until scaled."""
    trues: np.ndarray  # (T, P, V, X) eff x K(att x A): the true trues (T = 1 without TOF)
    smooth: np.ndarray  # (T, P, V, X) K(att x A): what scatter follows (no efficiencies)
    geo: np.ndarray  # A: where the activity is (the body)
    mult_hat: np.ndarray  # eff_hat x att_hat, summed (divided by lors for the mean)
    lors: np.ndarray  # number of real LORs


def _pair_geometry(sc: G.Scanner, ph: Phantom, ra: int, rb: int, preset: Preset, lines: L3.Lines | None,
                   tof: G.Scanner) -> tuple[np.ndarray, np.ndarray]:
    """(att x A (T, V, X) over the TOF bins of ``tof``, A (V, X)) of one ring pair: 3-D sub-lines,
    or the 2-D plane at its mid z."""
    flat = dataclasses.replace(sc, tof_bins=1, tof_mashing=1)
    if lines is not None:
        att, geo = L3.pair_attenuated(sc, ph, np.array([ra]), np.array([rb]), preset.sub, lines=lines,
                                      tof=tof if tof.tof_bins > 1 else None)
        return att[0].reshape(tof.tof_bins, sc.views, sc.bins), geo[0]
    act = SC.plane_integrals(tof, ph, [ra], [rb])[:, 0]  # (T, V, X)
    return act * np.exp(-SC.plane_integrals(flat, ph, [ra], [rb], mu_at)[0, 0]), act.sum(0)


def _hat_acf(sc: G.Scanner, ph_hat: Phantom, ra: int, rb: int, lines_hat: L3.Lines | None) -> np.ndarray:
    """(V, X) estimated attenuation factors of one ring pair: the central line through the mu-map."""
    if lines_hat is not None:
        z = L3.ring_z(sc, ph_hat, np.array([ra, rb]))
        return np.exp(-lines_hat.integrals(z[0], z[1])[1])
    flat = dataclasses.replace(sc, tof_bins=1, tof_mashing=1)  # attenuation does not depend on TOF
    return np.exp(-SC.plane_integrals(flat, ph_hat, [ra], [rb], mu_at)[0, 0])


def parts(layout: P.Layout, ph: Phantom, preset: Preset, eff: np.ndarray, eff_hat: np.ndarray) -> Parts:
    """Every ring pair of ``layout`` projected, blurred, weighted and summed into its plane and
    mashed view (the convention of hpc.simulate.layout: a plane sums its ring pairs' LORs)."""
    sc = layout.scanner
    tof = SL.tof_scanner(layout)  # the layout's (mashed) TOF bins as the scanner's own
    plane, ra, rb = layout.ring_pairs
    k = B.blur_matrix(sc, preset.blur_fwhm_mm).T if preset.blur_fwhm_mm > 0 else None  # (X_in, X_out)
    ph_hat = E.mu_phantom(ph, preset.mu_shift_mm, preset.mu_bone)
    lines = L3.Lines(sc, ph) if preset.lines3d else None
    lines_hat = L3.Lines(sc, ph_hat) if preset.lines3d else None
    shape = (layout.planes, layout.views, layout.bins)
    out = Parts(np.zeros((layout.tof_bins, *shape)), np.zeros((layout.tof_bins, *shape)),
                *(np.zeros(shape) for _ in range(3)))
    m = layout.view_mashing

    def add(arr: np.ndarray, p: int, x: np.ndarray) -> None:  # (..., U, X) uncompressed views -> mashed
        mashed = x.reshape(*x.shape[:-2], layout.views, m, layout.bins).sum(-2)
        if arr.ndim == 4:
            arr[:, p] += mashed
        else:
            arr[p] += mashed

    for p, a, b in zip(plane, ra, rb, strict=True):
        att, geo = _pair_geometry(sc, ph, int(a), int(b), preset, lines, tof)
        blurred = att @ k if k is not None else att
        w = F.lor_product(sc, eff, [a], [b])[0]  # (U, X), 0 through virtual crystals
        w_hat = F.lor_product(sc, eff_hat, [a], [b])[0]
        add(out.trues, p, w * blurred)
        add(out.smooth, p, blurred * (w > 0))
        add(out.geo, p, geo * (w > 0))
        add(out.mult_hat, p, w_hat * _hat_acf(sc, ph_hat, int(a), int(b), lines_hat))
        add(out.lors, p, (w > 0).astype(np.float64))
    return out


def _randoms(layout: P.Layout, ph: Phantom, eff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true singles (R, N), randoms shape (P, V, X)): singles from the attenuated direct planes
    (hpc.simulate.counts.single_rates), randoms s_a s_b summed over each bin's LORs."""
    sc = layout.scanner
    flat = dataclasses.replace(sc, tof_bins=1, tof_mashing=1)
    rings = np.arange(sc.rings)
    direct = SC.plane_integrals(flat, ph, rings, rings)[0] * np.exp(-SC.plane_integrals(flat, ph, rings, rings,
                                                                                          mu_at)[0])
    singles = F.singles(sc, direct, eff)
    return singles, PR.randoms(singles, layout).astype(np.float64)


def realistic_means(layout: P.Layout, ph: Phantom, preset: Preset, rng: np.random.Generator,
                    parts_out: dict | None = None) -> tuple[SC.Means, dict]:
    """(means, info): ``means.expected`` (T, P, V, X) the true expected prompts, ``means.randoms``
    (T, P, V, X) the additive estimate randoms_hat + scatter_hat, ``means.mult`` (P, V, X) the mean over each
    bin's real LORs of eff_hat x att_hat; ``info`` the measured fractions and errors (studies.json).
    ``parts_out``, if given, receives the (P, V, X) float64 truths and estimates by name (tests)."""
    check(preset)
    sc = layout.scanner
    if layout.bins != sc.bins:
        raise ValueError(f"the realistic engine needs the scanner's {sc.bins} bins; got {layout.bins}")
    eff = F.crystal_efficiencies(sc)
    eff_hat = E.efficiencies(eff, preset.eff_error, rng)
    pt = parts(layout, ph, preset, eff, eff_hat)
    body = (pt.geo > 1e-6 * pt.geo.max()) & (pt.lors > 0)  # (P, V, X) bins whose real LORs cross activity
    singles, r_shape = _randoms(layout, ph, eff)
    s_shape = np.stack([S.scatter_shape(layout, sm, pt.lors) for sm in pt.smooth])  # (T, P, V, X)
    trues_fraction = 1 - preset.scatter - preset.randoms
    n_body = int(body.sum())  # counts per bin and fractions: of the TOF bins summed
    k = preset.counts_per_bin * n_body * trues_fraction / float(pt.trues[:, body].sum())  # counts per unit
    trues = pt.trues * k
    prompts_body = float(trues[:, body].sum()) / trues_fraction
    scatter = S.scale_to_fraction(s_shape, body, prompts_body, preset.scatter)
    c = preset.randoms * prompts_body / float(r_shape[body].sum()) if preset.randoms > 0 else 0.0
    randoms = r_shape * c
    if preset.randoms > 0 and preset.randoms_estimate:
        randoms_hat, r_info = E.randoms_estimate(layout, singles * np.sqrt(c), rng)
    else:
        randoms_hat, r_info = randoms.copy(), {}
    scatter_hat = E.scatter_estimate(scatter, preset.scatter_error)
    t = layout.tof_bins  # randoms: spread evenly over the TOF bins (hpc.simulate.counts)
    expected = trues + scatter + randoms[None] / t  # (T, P, V, X)
    mult = np.where(pt.lors > 0, pt.mult_hat / np.maximum(pt.lors, 1), 0.0)
    means = SC.Means(expected.astype(np.float32), (randoms_hat[None] / t + scatter_hat).astype(np.float32),
                     mult.astype(np.float32))
    trues, scatter, scatter_hat, expected = trues.sum(0), scatter.sum(0), scatter_hat.sum(0), expected.sum(0)
    info = measure(expected, trues, scatter, scatter_hat, randoms, randoms_hat, body, eff, eff_hat)
    if parts_out is not None:  # TOF bins summed
        parts_out.update(expected=expected, trues=trues, scatter=scatter, scatter_hat=scatter_hat, randoms=randoms,
                         randoms_hat=randoms_hat, body=body, eff=eff, eff_hat=eff_hat, lors=pt.lors)
    info.update(r_info)
    return means, info


def measure(expected: np.ndarray, trues: np.ndarray, scatter: np.ndarray, scatter_hat: np.ndarray,
            randoms: np.ndarray, randoms_hat: np.ndarray, body: np.ndarray, eff: np.ndarray,
            eff_hat: np.ndarray) -> dict:
    """What studies.json records of a study: fractions in the body, counts per bin, factor errors."""
    pb = float(expected[body].sum())
    real = eff > 0
    log_ratio = np.log(eff_hat[real] / eff[real])
    rb = randoms[body]
    rel = (randoms_hat[body] - rb) / np.maximum(rb, 1e-30)
    counts = expected[body]
    return {"scatter_fraction": float(scatter[body].sum()) / pb, "randoms_fraction": float(rb.sum()) / pb,
            "trues_fraction": float(trues[body].sum()) / pb,
            "counts_per_bin": {"mean": float(counts.mean()), "p5": float(np.percentile(counts, 5)),
                               "p95": float(np.percentile(counts, 95)), "body_bins": int(body.sum())},
            "eff_error_rms": float(np.sqrt(np.mean(log_ratio ** 2))),
            "scatter_estimate_ratio": float(scatter_hat[body].sum() / max(float(scatter[body].sum()), 1e-30)),
            "randoms_estimate_ratio": float(randoms_hat[body].sum() / max(float(rb.sum()), 1e-30)),
            "randoms_error_rms": float(np.sqrt(np.mean(rel ** 2)))}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "realistic physics (--preset realistic turns all on; any option below alone turns on just it; "
        "the scanner's bins; see hpc.simulate.realistic)")
    g.add_argument("--preset", choices=("realistic",), help="3-D LORs with ring width, detector blur, scatter, "
                   "estimated factors, --counts-per-bin, a slab of --rings rings")
    g.add_argument("--rings", type=int, metavar="K",
                   help="simulate the scanner's first K rings (a slab, max ring difference K-1, its own span; "
                        f"default {REALISTIC.rings} with --preset realistic, else all)")
    g.add_argument("--lines", choices=("2d", "3d"), help="LORs: 3d (exact, z along the line, ring width) or 2d "
                   "(each plane at its mid z); default 3d with the preset")
    g.add_argument("--blur-fwhm", type=float, metavar="MM",
                   help=f"detector blur FWHM at the centre, mm (default {B.FWHM0_MM} with the preset; 0 = none)")
    g.add_argument("--scatter", type=float, metavar="F",
                   help=f"scatter fraction of the prompts in the body (default {S.FRACTION} with the preset)")
    g.add_argument("--eff-error", type=float, metavar="E", help="relative error of the estimated crystal "
                   f"efficiencies (default {E.EFF_ERROR} with the preset)")
    g.add_argument("--mu-shift", type=float, metavar="MM", help="x shift of the estimated mu-map (bone-free "
                   f"with the preset; default {E.MU_SHIFT_MM} with the preset)")
    g.add_argument("--scatter-error", type=float, metavar="E",
                   help=f"relative error of the scatter estimate (default {E.SCATTER_ERROR} with the preset)")
    g.add_argument("--counts-per-bin", type=float, metavar="C", help="mean expected prompts per bin in the body "
                   f"(default {REALISTIC.counts_per_bin} with the preset; replaces --counts)")


def describe(p: Preset, sc: G.Scanner, name: str | None) -> dict:
    """studies.json's record of the engine: every preset value, the blur's FWHM at 0 / 100 / 200 mm,
    the scanner (slab) and what the factor files hold."""
    fwhm = B.fwhm_mm(np.array([0.0, 100.0, 200.0]), p.blur_fwhm_mm) if p.blur_fwhm_mm > 0 else np.zeros(3)
    return {"preset": name or "custom", **dataclasses.asdict(p), "scanner": sc.name, "scanner_rings": sc.rings,
            "blur_fwhm_mm_at_0_100_200": [round(float(f), 3) for f in fwhm],
            "files": {"expected": "true expected prompts eff K(att A) + scatter + randoms",
                      "mult": "estimate: mean over a bin's LORs of eff_hat x att_hat",
                      "randoms": "estimate: randoms_hat + scatter_hat (the additive term)"}}


OPTIONS = ("rings", "lines", "blur_fwhm", "scatter", "eff_error", "mu_shift", "scatter_error", "counts_per_bin")


def preset_from_args(args: argparse.Namespace) -> Preset | None:
    """The engine's preset from the options, or None when neither --preset nor one of its options
    is given (the 2-D simulator of hpc.simulate.simulate); ValueError for a value out of range."""
    given = {k: getattr(args, k) for k in OPTIONS if getattr(args, k, None) is not None}
    if args.preset is None and not given:
        return None
    base = REALISTIC if args.preset == "realistic" else NONE
    change = {"rings": given.get("rings"), "blur_fwhm_mm": given.get("blur_fwhm"), "scatter": given.get("scatter"),
              "eff_error": given.get("eff_error"), "mu_shift_mm": given.get("mu_shift"),
              "scatter_error": given.get("scatter_error"), "counts_per_bin": given.get("counts_per_bin"),
              "randoms": args.randoms}
    if "lines" in given:
        change["lines3d"] = given["lines"] == "3d"
    preset = dataclasses.replace(base, **{k: v for k, v in change.items() if v is not None})
    check(preset)
    return preset
