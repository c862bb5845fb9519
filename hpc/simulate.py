"""Simulate PET studies: random anatomy-like phantoms, exact line integrals on a scanner's
geometry, optional TOF, Poisson counts; written as raw sinograms + Interfile headers.

Each study is a seeded 3D phantom (body outline, lungs, heart, liver, kidneys, bladder, spine, hot
lesions; ellipsoids, so every plane differs smoothly) placed at a random couch position. Each stored
LOR gets the exact integral of the phantom along its chord (non-arc-corrected geometry, see
hpc.geometry), split over TOF bins with a Gaussian timing kernel, scaled to --counts in total and
drawn from a Poisson distribution. LORs through virtual crystals (mMR, mCT gaps) stay 0.

Files per study in DIR: <id>.s + <id>.s.hdr (full count, the training target); --low-dose F adds
<id>_low (each count kept with probability F); --dead-blocks K adds <id>_gaps (the LORs of K random
dead blocks zeroed) and <id>_mask (uint8, 1 = measured). --format stir writes STIR .hs headers.
studies.json lists ids, seeds, counts and dead blocks. Headers record `originating system`, so
`hpc convert` knows the scanner.

examples:
  hpc simulate -o data/sim --studies 6 --scanner demo --dead-blocks 2 --low-dose 0.25 --seed 1
  hpc convert data/sim/s00{0..5}.s.hdr --mask data/sim/s00{0..5}_mask.s.hdr -o data/sim-ds
  hpc simulate -o data/mmr --studies 1 --scanner mmr --counts 2e7 --png mmr.png
  hpc simulate -o data/mct --studies 1 --scanner mct --max-ring-diff 2 --format stir
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import ndtr

from hpc import geometry as G
from hpc.errors import InputError, OutputError
from hpc.io.atomic import atomic_path, atomic_write_text
from hpc.progress import Progress

UINT16_MAX = np.iinfo(np.uint16).max
BODY_LENGTH_MM = 700.0  # shoulders to pelvis: the axial range the couch positions cover

# Organs in the body's frame: centre (x, y) and semi-axes (a, b) in units of the body's semi-axes,
# axial centre and half-length in mm along the body, activity added to the body's 1.0.
ORGANS = (  # name, x, y, a, b, z_centre, z_half, activity
    ("lung_r", -0.45, 0.05, 0.32, 0.55, 170.0, 140.0, -0.8),
    ("lung_l", 0.45, 0.05, 0.30, 0.55, 170.0, 140.0, -0.8),
    ("heart", 0.15, 0.25, 0.25, 0.28, 230.0, 60.0, 2.5),
    ("liver", -0.35, 0.05, 0.45, 0.55, 340.0, 90.0, 1.0),
    ("spleen", 0.50, -0.25, 0.15, 0.22, 330.0, 50.0, 0.8),
    ("kidney_r", -0.35, -0.40, 0.14, 0.20, 420.0, 55.0, 2.0),
    ("kidney_l", 0.35, -0.40, 0.14, 0.20, 420.0, 55.0, 2.0),
    ("bladder", 0.0, 0.25, 0.22, 0.25, 640.0, 45.0, 8.0),
    ("spine", 0.0, -0.70, 0.10, 0.12, 350.0, 400.0, -0.4),
)


@dataclass
class Phantom:
    """Ellipsoids, each row one: x, y (mm), a, b (mm), rotation (rad), activity, z centre, z half."""
    body: np.ndarray  # (7,) x, y, a, b, rotation, axial phase, axial frequency (1/mm)
    organs: np.ndarray  # (E, 8)
    z0: float  # body coordinate (mm) of the first ring's centre


def random_phantom(sc: G.Scanner, rng: np.random.Generator) -> Phantom:
    """A random patient that fits the scanner's field of view."""
    fov, axial_len = sc.fov_radius_mm, sc.rings * sc.ring_spacing_mm
    ba, bb = fov * rng.uniform(0.62, 0.78), fov * rng.uniform(0.42, 0.55)
    rot = rng.uniform(-0.1, 0.1)
    body = np.array([*rng.normal(0, 0.03 * fov, 2), ba, bb, rot, rng.uniform(0, 2 * np.pi),
                     rng.uniform(1 / 600, 1 / 250)])
    c, s = np.cos(rot), np.sin(rot)
    rows = []
    for _, x, y, a, b, zc, zh, act in ORGANS:
        x, y = (np.array([x, y]) + rng.normal(0, 0.04, 2)) * (ba, bb)
        rows.append([body[0] + c * x - s * y, body[1] + s * x + c * y, a * ba * rng.uniform(0.85, 1.15),
                     b * bb * rng.uniform(0.85, 1.15), rot + rng.uniform(-0.3, 0.3), act * rng.uniform(0.7, 1.3),
                     zc + rng.normal(0, 15), zh * rng.uniform(0.85, 1.15)])
    z0 = rng.uniform(0, max(BODY_LENGTH_MM - axial_len, 0))
    for _ in range(rng.integers(1, 5)):  # hot lesions inside the scanned part of the body
        r, ang = 0.6 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        size = rng.uniform(0.025, 0.06) * fov
        rows.append([body[0] + r * ba * np.cos(ang), body[1] + r * bb * np.sin(ang), size, size * rng.uniform(0.7, 1),
                     rng.uniform(0, np.pi), rng.uniform(3, 10), z0 + rng.uniform(0, axial_len),
                     max(size, 2 * sc.ring_spacing_mm)])
    return Phantom(body, np.array(rows), z0)


def ellipses_at(ph: Phantom, z: float) -> np.ndarray:
    """(E, 6) cross-sections at body coordinate z: x, y, a, b, rotation, activity."""
    x, y, a, b, rot, phase, freq = ph.body
    # smooth change of the outline; never narrower than the organs were placed in
    wobble = 1 + 0.04 * (1 + np.sin(2 * np.pi * freq * z + phase))
    body = np.array([[x, y, a * wobble, b * wobble, rot, 1.0]])
    o = ph.organs
    u = (z - o[:, 6]) / o[:, 7]
    inside = np.abs(u) < 1
    scale = np.sqrt(1 - u[inside] ** 2)[:, None]  # an ellipsoid's cross-section
    organs = np.concatenate([o[inside, :2], o[inside, 2:4] * scale, o[inside, 4:6]], axis=1)
    return np.concatenate([body, organs])


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


def expected_counts(sc: G.Scanner, ph: Phantom, segments: tuple[int, ...]) -> np.ndarray:
    """Noise-free projection (T, P, V, X) of a phantom, planes of ``segments`` in storage order.
    An oblique plane samples the phantom at its mid-point and lengthens each chord by its tilt."""
    phi, s = G.lor_coordinates(sc)  # (V, X)
    chord = 2 * np.sqrt(np.maximum(sc.radius_mm ** 2 - s ** 2, 1e-9))
    ra, rb = G.plane_list(sc, segments)
    out = np.empty((sc.tof_bins, ra.size, sc.views, sc.bins))
    for p, (a, b) in enumerate(zip(ra, rb, strict=True)):
        z = ph.z0 + (a + b) / 2 * sc.ring_spacing_mm
        tilt = np.sqrt(1 + ((b - a) * sc.ring_spacing_mm / chord) ** 2)
        out[:, p] = project(sc, ellipses_at(ph, z), phi, s) * tilt
    # clip the ~1e-16 rounding residue of the TOF split where there is no activity at all
    return np.maximum(out, 0) * G.gap_mask(sc)


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
    full: np.ndarray  # (T, P, V, X) uint16 Poisson counts
    low: np.ndarray | None  # binomially thinned twin
    mask: np.ndarray | None  # (P, V, X) uint8, 1 = measured
    dead: list[int]


def simulate_study(sc: G.Scanner, study_id: str, seed: int, counts: float, segments: tuple[int, ...],
                   dead_blocks: int = 0, low_dose: float = 0.0) -> Study:
    """One study, a function of ``seed`` only."""
    rng = np.random.default_rng(seed)
    mean = expected_counts(sc, random_phantom(sc, rng), segments)
    full = to_uint16(rng.poisson(mean * (counts / mean.sum())), study_id)
    low = rng.binomial(full, low_dose).astype(np.uint16) if low_dose > 0 else None
    dead = G.random_blocks(sc, dead_blocks, rng) if dead_blocks > 0 else np.zeros(0, np.int64)
    mask = G.dead_block_mask(sc, dead, segments) if dead_blocks > 0 else None
    return Study(study_id, seed, full, low, mask, [int(b) for b in dead])


def study_seeds(seed: int, n: int) -> list[int]:
    """Independent per-study seeds: study i is the same whatever --studies is."""
    return [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(n)]


def write_study(out: Path, st: Study, sc: G.Scanner, fmt: str, segments: tuple[int, ...]) -> dict[str, str]:
    """Write the study's files through hpc.io.sinogram; returns {role: header name}."""
    from hpc.io.sinogram import write_sinogram

    kw = dict(fmt=fmt, segments=list(segments), axial_counts=list(G.axial_counts(sc, segments)),
              fields={"originating system": sc.name})
    files = {"target": write_sinogram(out / f"{st.id}.s", st.full, **kw)}
    if st.low is not None:
        files["input"] = write_sinogram(out / f"{st.id}_low.s", st.low, **kw)
    if st.mask is not None:
        files["gaps"] = write_sinogram(out / f"{st.id}_gaps.s", st.full * st.mask, **kw)
        mask = np.broadcast_to(st.mask, st.full.shape)  # one mask slice per data slice (TOF too)
        files["mask"] = write_sinogram(out / f"{st.id}_mask.s", mask, **kw)
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
    p.add_argument("--counts", type=float, default=3e6, help="expected total counts per study (default 3e6)")
    p.add_argument("--dead-blocks", type=int, default=0, metavar="K",
                   help="dead blocks per study: adds <id>_gaps and <id>_mask files")
    p.add_argument("--low-dose", type=float, default=0.0, metavar="F",
                   help="adds <id>_low, each count kept with probability F in (0, 1)")
    p.add_argument("--max-ring-diff", type=int, default=0,
                   help="oblique segments up to this ring difference (span 1; needs --format stir)")
    p.add_argument("--seed", type=int, default=0, help="random seed (each study derives its own)")
    p.add_argument("--format", choices=("siemens", "stir"), default="siemens",
                   help="Siemens .s.hdr (default) or STIR .hs headers")
    p.add_argument("--png", metavar="FILE", help="picture of the first study (planes, dead blocks, mask)")


def _check_args(args: argparse.Namespace) -> G.Scanner:
    try:
        sc = G.get_scanner(args.scanner)
    except ValueError as exc:
        raise InputError(f"--scanner: {exc}") from None
    n_blocks = G.block_counts(sc)[1]
    checks = [(args.studies >= 1, f"--studies must be >= 1, got {args.studies}"),
              (args.counts > 0, f"--counts must be > 0, got {args.counts}"),
              (0 <= args.dead_blocks <= n_blocks, f"--dead-blocks must be in [0, {n_blocks}] on {sc.name}"),
              (0 <= args.low_dose < 1, f"--low-dose must be in (0, 1) (0 = none), got {args.low_dose}"),
              (0 <= args.max_ring_diff < sc.rings, f"--max-ring-diff must be in [0, {sc.rings})"),
              (args.max_ring_diff == 0 or args.format == "stir",
               "--max-ring-diff > 0 needs --format stir: Siemens headers do not record segment numbers")]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)
    if (Path(args.output) / "studies.json").exists():
        raise OutputError(f"{args.output}: already holds a simulation (studies.json); choose another -o")
    return sc


def run(args: argparse.Namespace) -> int:
    sc = _check_args(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    segments = G.segment_sequence(args.max_ring_diff)
    records, first = [], None
    with Progress(total=args.studies, unit="studies", desc="simulate") as bar:
        for i, seed in enumerate(study_seeds(args.seed, args.studies)):
            st = simulate_study(sc, f"s{i:03d}", seed, args.counts, segments, args.dead_blocks, args.low_dose)
            files = write_study(out, st, sc, args.format, segments)
            records.append({"id": st.id, "seed": seed, "counts": int(st.full.sum(dtype=np.int64)),
                            "max": int(st.full.max()), "dead_blocks": st.dead, "files": files})
            first = first or st
            bar.update(1)
    meta = {"scanner": sc.name, "format": args.format, "seed": args.seed, "counts": args.counts,
            "low_dose": args.low_dose, "segments": list(segments), "shape": list(first.full.shape),
            "studies": records}
    atomic_write_text(out / "studies.json", json.dumps(meta, indent=1) + "\n")
    if args.png:
        render_png(first, sc, Path(args.png))
    print(f"simulate: {args.studies} studies (T, planes, V, X) = {tuple(first.full.shape)} on {sc.name} -> {out}")
    return 0
