"""Simulate PET studies: random anatomy-like phantoms, exact line integrals on a scanner's
geometry, attenuation, detector efficiencies, randoms, optional TOF, Poisson counts; written as raw
sinograms + Interfile headers, with the noise-free parts next to them.

Each study is a seeded 3D phantom (hpc.simulate.phantom: body outline, lungs, heart, liver, kidneys, bladder,
spine, 1-4 lesions of known contrast; ellipsoids, so every plane differs smoothly) at a random couch
position, with a mu-map of the same ellipsoids (soft tissue, lung, bone). Each stored LOR gets the
exact integral of the activity along its chord (non-arc-corrected geometry, see hpc.physics.geometry), split
over TOF bins with a Gaussian timing kernel, times its attenuation factor exp(-integral of mu) and
its crystals' efficiencies, plus a smooth randoms background (hpc.physics.factors); scaled to --counts (a
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
view mashing; hpc.physics.projdata, hpc.simulate.layout) unless --span etc. say otherwise. --format stir writes
STIR .hs headers; both kinds of header are valid STIR input.
--preset realistic (hpc.simulate.realistic) adds the physics that decides how repair methods rank:
fully 3-D LORs with finite ring width, detector blur, scatter (35 % of the prompts in the body),
and factor files that hold ESTIMATES (_mult = eff_hat x att_hat: 2 % crystal errors, a bone-free
mu-map shifted 3 mm; _randoms = ML randoms from noisy delayeds + scatter estimated 15 % low), while
_expected holds the true expected prompts; 4 expected prompts per body bin (--counts-per-bin); a slab
of --rings K rings (default 8) of the real scanner, TOF as the layout says (its files name the scanner
'<name> slab K', which hpc convert / evaluate resolve to a K-ring scanner). One core: ~13 s per mMR
8-ring study, ~40 s per mCT one (13 TOF bins, 1.8 GB).
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
  hpc simulate -o data/ci --scanner mct --planes 5 --randoms 0     # real transaxial size, 5 central planes
  hpc simulate -o data/real --studies 4 --scanner mmr --preset realistic --rings 8 --dead-blocks 2
  hpc simulate -o data/blur --scanner mmr --rings 8 --blur-fwhm 4.3      # only the blur (2-D planes)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpc.errors import InputError, OutputError
from hpc.io.atomic import atomic_path, atomic_write_text
from hpc.io.sinogram import write_sinogram
from hpc.physics import factors as F
from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.progress import Progress
from hpc.simulate import layout as SL
from hpc.simulate import realistic as R
from hpc.simulate.counts import Means, Physics, efficiencies, study_means, to_uint16
from hpc.simulate.layout import add_layout_arguments, layout_from_args, storage_tof
from hpc.simulate.phantom import random_phantom


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
    realistic: dict = field(default_factory=dict)  # measured fractions and factor errors (--preset realistic)


def simulate_study(sc: G.Scanner, study_id: str, seed: int, counts: float | str, segments: tuple[int, ...],
                   dead_blocks: int = 0, low_dose: float = 0.0, phys: Physics = Physics(),  # noqa: B008 (frozen)
                   variant: str = "train", layout=None, planes: int | None = None,
                   preset: R.Preset | None = None) -> Study:
    """One study, a function of ``seed`` (and the physics, variant and layout) only. ``layout``
    (hpc.physics.projdata.Layout; default: span 1 with ``segments``): compressed planes, mashed views and
    TOF; ``planes``: only the first planes get counts (hpc.simulate.layout). ``preset``: the
    realistic engine (hpc.simulate.realistic) instead of ``counts`` and ``phys``."""
    layout = layout or P.span1_layout(sc, segments, tof_bins=sc.tof_bins)
    rng = np.random.default_rng(seed)
    ph = random_phantom(sc, rng, variant)
    info: dict = {}
    if preset is not None:
        try:
            means, info = R.realistic_means(layout, ph, preset, rng)
        except ValueError as exc:
            raise InputError(f"--preset/--rings/...: {exc}") from None
        full = to_uint16(rng.poisson(means.expected), study_id)
    elif SL.plain(layout, planes):
        means = study_means(sc, ph, layout.segments, counts, phys)
        full = to_uint16(rng.poisson(means.expected), study_id)
    else:
        means, full = SL.sample(layout, ph, counts, phys, planes, rng, study_id)
    dead = _dead_blocks(layout, dead_blocks, rng)
    # its own stream: a study is the same with or without its low-dose twin
    low = np.random.default_rng([seed, 1]).binomial(full, low_dose).astype(np.uint16) if low_dose > 0 else None
    gaps = mask = None
    if dead_blocks > 0:
        gaps, mask = SL.thin_dead_blocks(layout, full, dead, rng)
        if np.isin(mask, (0.0, 1.0)).all():
            mask = mask.astype(np.uint8)
    return Study(study_id, seed, full, low, mask, [int(b) for b in dead], means, ph.lesions, variant, gaps, info)


def _dead_blocks(layout, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct dead blocks, sorted: any for a scanner's full layout, and for a cut of a few
    central planes (--planes) among those that reach its middle plane (layout.reaching_blocks): a
    dead block that takes nothing from the simulated planes would leave its gap files without gaps."""
    if k <= 0:
        return np.zeros(0, np.int64)
    reach = SL.reaching_blocks(layout)
    if reach is None:
        return G.random_blocks(layout.scanner, k, rng)
    if k > len(reach):
        raise InputError(f"--dead-blocks {k}: only {len(reach)} blocks reach the middle of these planes")
    return np.sort(rng.choice(reach, size=k, replace=False))


def study_seeds(seed: int, n: int) -> list[int]:
    """Independent per-study seeds: study i is the same whatever --studies is."""
    return [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(n)]


def write_study(out: Path, st: Study, sc: G.Scanner, fmt: str, segments: tuple[int, ...],
                truth: bool = True, layout=None) -> dict[str, str]:
    """Write the study's files through hpc.io.sinogram in ``layout`` (default: span 1 with
    ``segments``), headers STIR reads; returns {role: header name}."""
    layout = layout or P.span1_layout(sc, segments, tof_bins=st.full.shape[0])

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


def write_listmode_files(out: Path, st: Study, sc: G.Scanner, layout, phys: Physics, seconds: float) -> dict[str, str]:
    """The study as list mode over ``seconds``, the scanner's normalisation and the phantom's mu-map
    (hpc.simulate.listmode): {role: file name} for studies.json."""
    from hpc.io.mumap import write_mumap  # late: only --listmode writes these files
    from hpc.io.normfile import write_norm  # late, as above
    from hpc.simulate import listmode as SLM  # late, as above

    rng = np.random.default_rng([st.seed, 25])  # the delayeds and event times: their own stream
    prompts = storage_tof(st.full, "siemens")
    lm = SLM.write_acquisition(out, st.id, layout, prompts, storage_tof(st.means.randoms, "siemens"), seconds, rng)
    norm = write_norm(out / st.id, SLM.scanner_norm(sc, efficiencies(sc, phys)))
    ph = random_phantom(sc, np.random.default_rng(st.seed), st.variant)  # the study's phantom: its first draw
    mu = write_mumap(out / f"{st.id}_umap", SLM.phantom_mumap(sc, ph))
    return {"listmode": lm.name, "norm": norm.name, "mu_map": mu.name}


def png_planes(st: Study, layout) -> list[int]:
    """Up to two planes (storage indices) to draw: for each of the first dead blocks the middle of
    the planes it reaches, else the plane with the most counts and the central one."""
    planes = []
    for b in st.dead[:2]:
        hit = np.flatnonzero(P.hit_planes(layout, [b]) & layout.valid_planes)
        if hit.size:
            planes.append(int(hit[hit.size // 2]))
    if not planes:
        planes = [int(st.full.sum(axis=(0, 2, 3)).argmax()), layout.planes // 2]
    return sorted(set(planes))


def render_png(st: Study, sc: G.Scanner, png: Path, layout) -> Path:
    """Rows: planes through the first dead blocks (else the fullest and the central plane, see
    png_planes); columns: full-count sinogram, the same with the dead blocks' LORs thinned, the
    mask. TOF bins summed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = st.full.sum(axis=0)  # (P, V, X)
    gaps = st.gaps.sum(axis=0) if st.gaps is not None else data
    mask = st.mask if st.mask is not None else np.ones_like(data, np.uint8)
    seg, axial = layout.plane_segment_axial()
    planes = png_planes(st, layout)
    cols = [("full count", data), (f"dead blocks {st.dead}", gaps), ("mask (1 = measured)", mask)]
    fig, axes = plt.subplots(len(planes), 3, squeeze=False, figsize=(10.5, 3.4 * len(planes) + 0.4))
    for row, p in enumerate(planes):
        for col, (label, arr) in enumerate(cols):
            ax = axes[row][col]
            kw = {"cmap": "gray", "vmin": 0, "vmax": 1} if col == 2 else {"cmap": "inferno", "vmin": 0}
            im = ax.imshow(arr[p], aspect="auto", interpolation="nearest", **kw)
            ax.set_title(f"plane {p} (segment {seg[p]}, axial {axial[p]}): {label}", fontsize=8)
            ax.set_xlabel("radial bin", fontsize=7)
            ax.set_ylabel("view", fontsize=7)
            ax.tick_params(labelsize=6)
            fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
    fig.suptitle(f"hpc simulate: study {st.id} on scanner {sc.name} ({layout.views} views x {layout.bins} bins, "
                 f"{layout.planes} planes)")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.88, hspace=0.45, wspace=0.3)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--studies", type=int, default=4, help="number of studies (default 4)")
    p.add_argument("--scanner", default="demo", help=f"geometry preset: {', '.join(G.SCANNERS)} (default demo)")
    p.add_argument("--counts", default=None,
                   help="expected total prompts per study, or a count level: "
                        f"{', '.join(f'{k} ({v:g})' for k, v in F.COUNT_LEVELS.items())} mean prompts per LOR through "
                        "the body, for an mMR-sized LOR (scaled by the scanner's bin area; default 3e6; with "
                        "--preset realistic use --counts-per-bin)")
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
    add_layout_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (each study derives its own)")
    p.add_argument("--format", choices=("siemens", "stir"), default=None,
                   help="Siemens .s.hdr (default) or STIR .hs headers (the default with --planes, whose cut of "
                        "the layout a Siemens header cannot state)")
    p.add_argument("--png", metavar="FILE", help="picture of the first study (planes, dead blocks, mask)")
    p.add_argument("--listmode", type=float, metavar="SECONDS",
                   help="also write each study as Siemens PETLINK list mode over SECONDS (<id>.l + .l.hdr: its "
                        "prompts, delayeds drawn from its randoms), with the scanner's normalisation (<id>.n.hdr) "
                        "and the phantom's mu-map (<id>_umap.hv); needs --span 1 (hpc.simulate.listmode)")
    R.add_arguments(p)


def _count_level(text: str) -> float | str:
    if text in F.COUNT_LEVELS:
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InputError(f"--counts must be a number > 0 or one of {', '.join(F.COUNT_LEVELS)}, got {text!r}")
    return value


def _check_args(args: argparse.Namespace) -> G.Scanner:
    try:
        sc = G.get_scanner(args.scanner)
    except ValueError as exc:
        raise InputError(f"--scanner: {exc}") from None
    try:
        args.realistic = R.preset_from_args(args)
        if args.realistic is not None and args.realistic.rings:
            sc = G.slab(sc, args.realistic.rings)
    except ValueError as exc:
        raise InputError(f"--preset/--rings/...: {exc}") from None
    if args.realistic is not None and args.counts is not None:
        raise InputError(f"--counts {args.counts}: the realistic engine sets its count level with --counts-per-bin")
    n_blocks = G.block_counts(sc)[1]
    args.counts = _count_level(args.counts or "3e6")
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
    name = re.compile(r"(s\d{3,})(?:_(?:low|gaps|mask|expected|randoms|mult|umap))?\.")
    return sorted(p.name for p in out.iterdir() if (m := name.match(p.name)) and m.group(1) in ids)


def run(args: argparse.Namespace) -> int:

    sc = _check_args(args)
    preset = args.realistic
    if preset is not None and args.listmode is not None:
        raise InputError("the realistic engine (--preset, --rings, ...) writes sinograms only: drop --listmode")
    layout = layout_from_args(args, sc)
    if args.listmode is not None and (not args.listmode > 0 or layout.span != 1 or layout.view_mashing != 1
                                      or args.planes is not None):
        raise InputError(f"--listmode {args.listmode}: needs SECONDS > 0 and a whole span-1, unmashed layout "
                         f"(--span 1, no --planes; got span {layout.span}, view mashing {layout.view_mashing})")
    if args.planes is not None and args.format == "siemens":
        raise InputError(f"--planes {args.planes}: a Siemens header states a scanner's span and maximum ring "
                         "difference only, not a cut of its planes; use --format stir (the default with --planes)")
    args.format = args.format or ("stir" if args.planes is not None else "siemens")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    segments = layout.segments
    phys = Physics(not args.no_attenuation, not args.no_normalisation, args.randoms)
    records, first = [], None
    with Progress(total=args.studies, unit="studies", desc="simulate") as bar:
        for i, seed in enumerate(study_seeds(args.seed, args.studies)):
            variant = "test" if i >= args.studies - args.test_studies else "train"
            st = simulate_study(sc, f"s{i:03d}", seed, args.counts, segments, args.dead_blocks, args.low_dose,
                                phys, variant, layout, preset=preset)
            files = write_study(out, st, sc, args.format, segments, truth=not args.no_truth, layout=layout)
            if args.listmode:
                files.update(write_listmode_files(out, st, sc, layout, phys, args.listmode))
            records.append({"id": st.id, "seed": seed, "variant": variant, "counts": int(st.full.sum(dtype=np.int64)),
                            "randoms": float(st.means.randoms.sum()), "max": int(st.full.max()),
                            "dead_blocks": st.dead, "lesions": st.lesions, "files": files})
            if preset is not None:
                records[-1]["realistic"] = st.realistic
            first = first or st
            bar.update(1)
    meta = {"scanner": sc.name, "format": args.format, "seed": args.seed, "counts": args.counts,
            "physics": dataclasses.asdict(phys), "low_dose": args.low_dose, "segments": list(segments),
            "layout": {"span": layout.span, "min_rd": list(layout.min_rd), "max_rd": list(layout.max_rd),
                       "axial_counts": list(layout.axial_counts), "views": layout.views,
                       "view_mashing": layout.view_mashing, "tof_bins": layout.tof_bins, "planes": args.planes},
            "shape": list(first.full.shape), "studies": records}
    if preset is not None:
        meta["realistic"] = R.describe(preset, sc, args.preset)
        meta["counts"] = f"{preset.counts_per_bin:g} per bin in the body"
    atomic_write_text(out / "studies.json", json.dumps(meta, indent=1) + "\n")
    if args.png:
        render_png(first, sc, Path(args.png), layout)
    print(f"simulate: {args.studies} studies (T, planes, V, X) = {tuple(first.full.shape)} on {sc.name} -> {out}")
    return 0
