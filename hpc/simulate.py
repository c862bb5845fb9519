"""Simulate PET studies: random anatomy-like phantoms, exact line integrals on a scanner's
geometry, attenuation, detector efficiencies, randoms, optional TOF, Poisson counts; written as raw
sinograms + Interfile headers, with the noise-free parts next to them.

Each study is a seeded 3D phantom (hpc.phantom: body outline, lungs, heart, liver, kidneys, bladder,
spine, 1-4 lesions of known contrast; ellipsoids, so every plane differs smoothly) at a random couch
position, with a mu-map of the same ellipsoids (soft tissue, lung, bone). Each stored LOR gets the
exact integral of the activity along its chord (non-arc-corrected geometry, see hpc.geometry), split
over TOF bins with a Gaussian timing kernel, times its attenuation factor exp(-integral of mu) and
its crystals' efficiencies, plus a smooth randoms background (hpc.physics); scaled to --counts (a
total, or a count level like a clinical scan's) and drawn from a Poisson distribution. LORs through
virtual crystals (mMR, mCT gaps) stay 0. --test-studies N draws the last N studies from a phantom
variant the others never use (arms beside a slimmer body, fainter lesions): held-out test data.

Files per study in DIR: <id>.s + <id>.s.hdr (prompts, the training target); <id>_expected (float32
noise-free expected prompts), <id>_randoms (float32 expected randoms) and <id>_mult (float32
efficiency x attenuation factors, what a reconstruction multiplies its projection by), unless
--no-truth; --low-dose F adds <id>_low (each count kept with probability F); --dead-blocks K adds
<id>_gaps (the counts the LORs of K random dead blocks leave: binomial thinning by the surviving
fraction of each bin's LORs) and <id>_mask (the measured fraction: uint8 0/1, float32 where span or
view mashing make bins partly lost). The layout is the scanner's own (mMR span 11, mCT TOF with
view mashing; hpc.projdata, hpc.sim_layout) unless --span etc. say otherwise. --format stir writes
STIR .hs headers; both kinds of header are valid STIR input.
studies.json lists ids, seeds, variants, counts, dead blocks and the
lesions (centre x, y in mm, z in mm from the first ring's centre, semi-axes, contrast = lesion to
background activity at its centre). Headers record `originating system`, so `hpc convert` knows
the scanner.

examples:
  hpc simulate -o data/sim --studies 6 --scanner demo --dead-blocks 2 --low-dose 0.25 --seed 1
  hpc simulate -o data/clin --studies 8 --test-studies 2 --counts clinical --randoms 0.3 --dead-blocks 2
  hpc convert data/sim/s00{0..5}.s.hdr --mask data/sim/s00{0..5}_mask.s.hdr -o data/sim-ds
  hpc simulate -o data/mmr --studies 1 --scanner mmr --counts 2e7 --png mmr.png
  hpc simulate -o data/mct --studies 1 --scanner mct --format stir     # 621 x 168 x 400 x 13 TOF
  hpc simulate -o data/t --scanner mmr --span 1 --max-segment 2 --dead-blocks 2   # span 1, 5 segments
  hpc simulate -o data/ci --scanner mct --max-segment 0 --planes 4 --randoms 0    # real size, 4 planes
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import ndtr

from hpc import geometry as G
from hpc import physics as P
from hpc.errors import InputError, OutputError
from hpc.io.atomic import atomic_path, atomic_write_text
from hpc.phantom import Phantom, ellipses_at, mu_at, random_phantom
from hpc.progress import Progress

UINT16_MAX = np.iinfo(np.uint16).max


def _phi_integral(x: np.ndarray) -> np.ndarray:
    """Antiderivative of the normal CDF: x Phi(x) + phi(x)."""
    return x * ndtr(x) + np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)


def tof_weights(sc: G.Scanner, l1: np.ndarray, l2: np.ndarray) -> np.ndarray:
    """(T, ...) fraction of a uniform segment [l1, l2] along the LOR (mm from its midpoint) that each
    TOF bin records: the bin's box convolved with the Gaussian timing kernel. The outer bins are
    open-ended, so the weights sum to 1 and TOF sums back to the non-TOF projection."""
    sigma, edges = G.tof_kernel(sc)
    far = 10 * sc.radius_mm / sigma  # beyond every chord: Phi is exactly 0 or 1 there
    edges = np.clip(edges / sigma, -far, far)
    length = np.maximum(l2 - l1, 1e-12) / sigma
    cdf = [_phi_integral(e - l1 / sigma) - _phi_integral(e - l2 / sigma) for e in edges]  # (T+1) x (...)
    return np.stack([(cdf[k + 1] - cdf[k]) / length for k in range(sc.tof_bins)])


def project(sc: G.Scanner, ell: np.ndarray, phi: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Line integrals of the ellipses ``ell`` (E, 6) along the LORs (phi, s) (V, X) -> (T, V, X).

    LOR: points s n + l d with n = (cos phi, sin phi), d = (-sin phi, cos phi); each ellipse is cut
    on l in [l1, l2] (a quadratic in l), contributing activity x chord length.
    """
    x0, y0, a, b, rot, act = (ell[:, i, None, None] for i in range(6))  # (E, 1, 1)
    cr, sr = np.cos(rot), np.sin(rot)
    n = np.cos(phi), np.sin(phi)
    d = -n[1], n[0]
    # direction and normal in each ellipse's frame, scaled by its semi-axes
    nx, ny = (n[0] * cr + n[1] * sr) / a, (-n[0] * sr + n[1] * cr) / b  # (E, V, X)
    dx, dy = (d[0] * cr + d[1] * sr) / a, (-d[0] * sr + d[1] * cr) / b
    s_rel = s - (x0 * n[0] + y0 * n[1])
    qa, qb, qc = dx * dx + dy * dy, s_rel * (nx * dx + ny * dy), s_rel ** 2 * (nx * nx + ny * ny) - 1
    root = np.sqrt(np.maximum(qb * qb - qa * qc, 0))
    if sc.tof_bins == 1:
        return (act * 2 * root / qa).sum(axis=0)[None]
    # TOF only where an ellipse is cut: most (ellipse, LOR) pairs miss the small organs
    e, v, x = np.nonzero(root > 0)
    half = root[e, v, x] / qa[e, v, x]
    l_mid = (x0 * d[0] + y0 * d[1])[e, v, x] - qb[e, v, x] / qa[e, v, x]  # chord midpoint on the LOR
    w = tof_weights(sc, l_mid - half, l_mid + half) * (act[e, 0, 0] * 2 * half)  # (T, hits)
    out = np.zeros((sc.tof_bins, sc.views * sc.bins))
    for k in range(sc.tof_bins):
        out[k] = np.bincount(v * sc.bins + x, weights=w[k], minlength=sc.views * sc.bins)
    return out.reshape(sc.tof_bins, sc.views, sc.bins)


def plane_integrals(sc: G.Scanner, ph: Phantom, ring_a: np.ndarray, ring_b: np.ndarray, sections=None
                    ) -> np.ndarray:
    """Line integrals (T, P, V, X) of the phantom (``sections(ph, z)``: ``ellipses_at`` for activity,
    ``mu_at`` for attenuation) for the planes joining ``ring_a`` and ``ring_b`` (P,). A plane samples
    the phantom at its mid-point and lengthens each chord by its tilt. LORs through virtual crystals
    get their geometric integral too: the detector efficiencies (hpc.physics) zero them."""
    phi, s = G.lor_coordinates(sc)  # (V, X)
    chord = 2 * np.sqrt(np.maximum(sc.radius_mm ** 2 - s ** 2, 1e-9))
    sections = sections or ellipses_at
    out = np.empty((sc.tof_bins, len(ring_a), sc.views, sc.bins))
    ring_a, ring_b = np.asarray(ring_a), np.asarray(ring_b)
    for total in np.unique(ring_a + ring_b):  # ring pairs of one mid-point share its projection (span)
        flat = project(sc, sections(ph, ph.z0 + total / 2 * sc.ring_spacing_mm), phi, s)
        for p in np.flatnonzero(ring_a + ring_b == total):
            tilt = np.sqrt(1 + ((ring_b[p] - ring_a[p]) * sc.ring_spacing_mm / chord) ** 2)
            out[:, p] = flat * tilt
    # clip the ~1e-16 rounding residue of the TOF split where there is no activity at all
    return np.maximum(out, 0)


def expected_counts(sc: G.Scanner, ph: Phantom, segments: tuple[int, ...]) -> np.ndarray:
    """Noise-free projection (T, P, V, X) of a phantom's activity (geometric trues: no attenuation,
    normalisation or randoms), planes of ``segments`` in storage order; 0 through virtual crystals."""
    return plane_integrals(sc, ph, *G.plane_list(sc, segments)) * G.gap_mask(sc)


@dataclass(frozen=True)
class Physics:
    """What a simulated acquisition includes besides the geometric trues (see hpc.physics)."""
    attenuation: bool = True  # exp(-integral of mu) on every LOR
    normalisation: bool = True  # crystal efficiencies (hpc.physics.crystal_efficiencies)
    randoms: float = 0.25  # randoms fraction of the prompts (0 = none)


@dataclass
class Means:
    """The noise-free parts of a study, all scaled to its count level."""
    expected: np.ndarray  # (T, P, V, X) expected prompts = mult * trues + randoms
    randoms: np.ndarray  # (T, P, V, X) expected randoms (spread evenly over TOF bins)
    mult: np.ndarray  # (P, V, X) efficiency product x attenuation factor (0 through virtual crystals)


def efficiencies(sc: G.Scanner, phys: Physics) -> np.ndarray:
    return P.crystal_efficiencies(sc) if phys.normalisation else P.crystal_efficiencies(sc, 0.0, 0.0)


def single_rates(sc: G.Scanner, ph: Phantom, phys: Physics) -> np.ndarray:
    """(rings, N) singles of the study (from its attenuated direct-plane trues): what randoms follow."""
    flat = dataclasses.replace(sc, tof_bins=1, tof_mashing=1)
    rings = np.arange(sc.rings)
    direct = plane_integrals(flat, ph, rings, rings)[0]
    if phys.attenuation:
        direct = direct * np.exp(-plane_integrals(flat, ph, rings, rings, mu_at)[0])
    return P.singles(sc, direct, efficiencies(sc, phys))


def study_means(sc: G.Scanner, ph: Phantom, segments: tuple[int, ...], counts: float | str | None,
                phys: Physics = Physics(), pairs: tuple[np.ndarray, np.ndarray] | None = None,
                singles: np.ndarray | None = None) -> Means:
    """Expected prompts of a phantom: counts = total expected prompts, or a count level
    (hpc.physics.COUNT_LEVELS: mean prompts per LOR through the body); None: unscaled. ``pairs``
    (ring_a, ring_b) instead of the span-1 planes of ``segments`` and precomputed ``singles``: how
    hpc.sim_layout builds compressed planes from their ring pairs, a few at a time."""
    ra, rb = G.plane_list(sc, segments) if pairs is None else pairs
    trues = plane_integrals(sc, ph, ra, rb)  # (T, P, V, X) geometric
    flat = dataclasses.replace(sc, tof_bins=1, tof_mashing=1)  # attenuation and singles do not depend on TOF
    acf = np.exp(-plane_integrals(flat, ph, ra, rb, mu_at)[0]) if phys.attenuation else np.ones(trues.shape[1:])
    eff = efficiencies(sc, phys)
    mult = P.lor_product(sc, eff, ra, rb) * acf * G.gap_mask(sc)  # (P, V, X)
    trues = trues * mult
    randoms = np.zeros_like(trues)
    if phys.randoms > 0:
        rates = single_rates(sc, ph, phys) if singles is None else singles
        shape = P.randoms_shape(sc, rates, ra, rb)  # (P, V, X)
        total = phys.randoms / (1 - phys.randoms) * trues.sum()
        randoms = np.broadcast_to(shape * (total / shape.sum() / sc.tof_bins), trues.shape)
    expected = trues + randoms
    if counts is None:
        return Means(expected, randoms, mult)
    k = P.body_scale(sc, counts, expected.sum(axis=0), trues.sum(axis=0) > 0)  # per LOR, TOF bins summed
    return Means(expected * k, randoms * k, mult)


def to_uint16(x: np.ndarray, what: str) -> np.ndarray:
    """Counts as uint16; a count above 65535 is an error naming the maximum, never clipped."""
    peak = int(x.max())
    if peak > UINT16_MAX:
        raise InputError(f"--counts: {what} has a bin with {peak} counts, above the uint16 maximum "
                         f"{UINT16_MAX}; lower --counts")
    return x.astype(np.uint16)


@dataclass
class Study:
    id: str
    seed: int
    full: np.ndarray  # (T, P, V, X) uint16 Poisson counts (prompts)
    low: np.ndarray | None  # binomially thinned twin
    mask: np.ndarray | None  # (P, V, X) measured fraction: uint8 0/1, float32 where compression makes partial bins
    dead: list[int]
    means: Means | None = None  # noise-free expected prompts, randoms, multiplicative factors
    lesions: list[dict] = field(default_factory=list)  # positions (mm, z from ring 0's centre), contrasts
    variant: str = "train"
    gaps: np.ndarray | None = None  # (T, P, V, X) the counts the dead blocks leave (binomial thinning)


def simulate_study(sc: G.Scanner, study_id: str, seed: int, counts: float | str, segments: tuple[int, ...],
                   dead_blocks: int = 0, low_dose: float = 0.0, phys: Physics = Physics(),
                   variant: str = "train", layout=None, planes: int | None = None) -> Study:
    """One study, a function of ``seed`` (and the physics, variant and layout) only. ``layout``
    (hpc.projdata.Layout; default: span 1 with ``segments``): compressed planes, mashed views and
    TOF; ``planes``: only the first planes get counts (hpc.sim_layout)."""
    from hpc import sim_layout as SL
    from hpc.projdata import span1_layout

    layout = layout or span1_layout(sc, segments, tof_bins=sc.tof_bins)
    rng = np.random.default_rng(seed)
    ph = random_phantom(sc, rng, variant)
    if SL.plain(layout, planes):
        means = study_means(sc, ph, layout.segments, counts, phys)
        full = to_uint16(rng.poisson(means.expected), study_id)
    else:
        means, full = SL.sample(layout, ph, counts, phys, planes, rng, study_id)
    low = rng.binomial(full, low_dose).astype(np.uint16) if low_dose > 0 else None
    dead = G.random_blocks(sc, dead_blocks, rng) if dead_blocks > 0 else np.zeros(0, np.int64)
    gaps = mask = None
    if dead_blocks > 0:
        gaps, mask = SL.thin_dead_blocks(layout, full, dead, rng)
        if np.isin(mask, (0.0, 1.0)).all():
            mask = mask.astype(np.uint8)
    return Study(study_id, seed, full, low, mask, [int(b) for b in dead], means, ph.lesions, variant, gaps)


def study_seeds(seed: int, n: int) -> list[int]:
    """Independent per-study seeds: study i is the same whatever --studies is."""
    return [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(n)]


def write_study(out: Path, st: Study, sc: G.Scanner, fmt: str, segments: tuple[int, ...],
                truth: bool = True, layout=None) -> dict[str, str]:
    """Write the study's files through hpc.io.sinogram in ``layout`` (default: span 1 with
    ``segments``), headers STIR reads; returns {role: header name}."""
    from hpc.io.sinogram import write_sinogram
    from hpc.projdata import span1_layout
    from hpc.sim_layout import storage_tof

    layout = layout or span1_layout(sc, segments, tof_bins=st.full.shape[0])

    def write(name: str, data: np.ndarray) -> Path:  # TOF axis ascending -> the file's storage order
        return write_sinogram(out / f"{st.id}{name}.s", storage_tof(data, fmt), fmt, layout=layout)

    files = {"target": write("", st.full)}
    if st.low is not None:
        files["input"] = write("_low", st.low)
    if st.mask is not None:
        files["gaps"] = write("_gaps", st.gaps if st.gaps is not None else st.full * st.mask)
        files["mask"] = write("_mask", np.broadcast_to(st.mask, st.full.shape))  # a mask slice per data slice
    if truth and st.means is not None:  # float32, same layout: what evaluation scores against
        m = st.means
        files["expected"] = write("_expected", m.expected.astype(np.float32))
        files["randoms"] = write("_randoms", m.randoms.astype(np.float32))
        files["mult"] = write("_mult", np.broadcast_to(m.mult.astype(np.float32), st.full.shape))
    return {role: path.name for role, path in files.items()}


def render_png(st: Study, sc: G.Scanner, png: Path) -> Path:
    """Rows: direct planes through the first dead blocks (else the first and last plane); columns:
    full-count sinogram, the same with the dead blocks' LORs zeroed, the mask. TOF bins summed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = st.full.sum(axis=0)  # (P, V, X)
    mask = st.mask if st.mask is not None else np.ones_like(data, np.uint8)
    # direct plane r (ring r with itself) is stored at index r; take the middle ring of a dead block
    n_trans = G.block_counts(sc)[0]
    centres = [min(b // n_trans * sc.block_axial + sc.block_axial // 2, sc.rings - 1) for b in st.dead]
    planes = sorted(set(centres))[:2] or sorted({0, sc.rings - 1})
    cols = [("full count", data), (f"dead blocks {st.dead}", data * mask), ("mask (1 = measured)", mask)]
    fig, axes = plt.subplots(len(planes), 3, squeeze=False, figsize=(10.5, 3.4 * len(planes) + 0.4))
    for row, p in enumerate(planes):
        for col, (label, arr) in enumerate(cols):
            ax = axes[row][col]
            kw = {"cmap": "gray", "vmin": 0, "vmax": 1} if col == 2 else {"cmap": "inferno", "vmin": 0}
            ax.imshow(arr[p], aspect="auto", interpolation="nearest", **kw)
            ax.set_title(f"plane {p}: {label}", fontsize=8)
            ax.set_xlabel("radial bin", fontsize=7)
            ax.set_ylabel("view", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle(f"hpc simulate: study {st.id} on scanner {sc.name} ({sc.views} views x {sc.bins} bins)")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.88, hspace=0.45, wspace=0.3)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--studies", type=int, default=4, help="number of studies (default 4)")
    p.add_argument("--scanner", default="demo", help=f"geometry preset: {', '.join(G.SCANNERS)} (default demo)")
    p.add_argument("--counts", default="3e6",
                   help="expected total prompts per study, or a count level: "
                        f"{', '.join(f'{k} ({v:g})' for k, v in P.COUNT_LEVELS.items())} mean prompts per LOR through "
                        "the body, for an mMR-sized LOR (scaled by the scanner's bin area; default 3e6)")
    p.add_argument("--randoms", type=float, default=Physics.randoms, metavar="F",
                   help=f"randoms fraction of the prompts (default {Physics.randoms}; 0 = none)")
    p.add_argument("--no-attenuation", action="store_true", help="no attenuation (mu-map of each phantom)")
    p.add_argument("--no-normalisation", action="store_true", help="ideal detectors (no crystal efficiencies)")
    p.add_argument("--test-studies", type=int, default=0, metavar="N",
                   help="the last N studies are drawn from the held-out phantom variant (arms, slimmer, fainter "
                        "lesions) that the others never use")
    p.add_argument("--no-truth", action="store_true",
                   help="do not write <id>_expected, <id>_randoms, <id>_mult (float32 noise-free parts)")
    p.add_argument("--dead-blocks", type=int, default=0, metavar="K",
                   help="dead blocks per study: adds <id>_gaps and <id>_mask files")
    p.add_argument("--low-dose", type=float, default=0.0, metavar="F",
                   help="adds <id>_low, each count kept with probability F in (0, 1)")
    from hpc.sim_layout import add_layout_arguments
    add_layout_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (each study derives its own)")
    p.add_argument("--format", choices=("siemens", "stir"), default="siemens",
                   help="Siemens .s.hdr (default) or STIR .hs headers")
    p.add_argument("--png", metavar="FILE", help="picture of the first study (planes, dead blocks, mask)")


def _count_level(text: str) -> float | str:
    if text in P.COUNT_LEVELS:
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InputError(f"--counts must be a number > 0 or one of {', '.join(P.COUNT_LEVELS)}, got {text!r}")
    return value


def _check_args(args: argparse.Namespace) -> G.Scanner:
    try:
        sc = G.get_scanner(args.scanner)
    except ValueError as exc:
        raise InputError(f"--scanner: {exc}") from None
    n_blocks = G.block_counts(sc)[1]
    args.counts = _count_level(args.counts)
    checks = [(args.studies >= 1, f"--studies must be >= 1, got {args.studies}"),
              (0 <= args.test_studies <= args.studies, f"--test-studies must be in [0, {args.studies}]"),
              (0 <= args.randoms < 1, f"--randoms must be in [0, 1), got {args.randoms}"),
              (0 <= args.dead_blocks <= n_blocks, f"--dead-blocks must be in [0, {n_blocks}] on {sc.name}"),
              (0 <= args.low_dose < 1, f"--low-dose must be in (0, 1) (0 = none), got {args.low_dose}")]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)
    out = Path(args.output)
    if (out / "studies.json").exists():
        raise OutputError(f"{out}: already holds a simulation (studies.json); choose another -o")
    taken = _would_replace(out, args.studies)
    if taken:  # a user's own files of the same names are never replaced (issue 12: nothing is lost)
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise OutputError(f"{out}: would replace {taken[0]}{more}; choose another -o")
    return sc


def _would_replace(out: Path, studies: int) -> list[str]:
    """Files already in ``out`` with the names a simulation of ``studies`` studies writes (write_study)."""
    if not out.is_dir():
        return []
    ids = {f"s{i:03d}" for i in range(studies)}
    name = re.compile(r"(s\d{3,})(?:_(?:low|gaps|mask|expected|randoms|mult))?\.")
    return sorted(p.name for p in out.iterdir() if (m := name.match(p.name)) and m.group(1) in ids)


def run(args: argparse.Namespace) -> int:
    from hpc.sim_layout import layout_from_args

    sc = _check_args(args)
    layout = layout_from_args(args, sc)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    segments = layout.segments
    phys = Physics(not args.no_attenuation, not args.no_normalisation, args.randoms)
    records, first = [], None
    with Progress(total=args.studies, unit="studies", desc="simulate") as bar:
        for i, seed in enumerate(study_seeds(args.seed, args.studies)):
            variant = "test" if i >= args.studies - args.test_studies else "train"
            st = simulate_study(sc, f"s{i:03d}", seed, args.counts, segments, args.dead_blocks, args.low_dose,
                                phys, variant, layout, args.planes)
            files = write_study(out, st, sc, args.format, segments, truth=not args.no_truth, layout=layout)
            records.append({"id": st.id, "seed": seed, "variant": variant, "counts": int(st.full.sum(dtype=np.int64)),
                            "randoms": float(st.means.randoms.sum()), "max": int(st.full.max()),
                            "dead_blocks": st.dead, "lesions": st.lesions, "files": files})
            first = first or st
            bar.update(1)
    meta = {"scanner": sc.name, "format": args.format, "seed": args.seed, "counts": args.counts,
            "physics": dataclasses.asdict(phys), "low_dose": args.low_dose, "segments": list(segments),
            "layout": {"span": layout.span, "min_rd": list(layout.min_rd), "max_rd": list(layout.max_rd),
                       "axial_counts": list(layout.axial_counts), "views": layout.views,
                       "view_mashing": layout.view_mashing, "tof_bins": layout.tof_bins, "planes": args.planes},
            "shape": list(first.full.shape), "studies": records}
    atomic_write_text(out / "studies.json", json.dumps(meta, indent=1) + "\n")
    if args.png:
        render_png(first, sc, Path(args.png))
    print(f"simulate: {args.studies} studies (T, planes, V, X) = {tuple(first.full.shape)} on {sc.name} -> {out}")
    return 0
