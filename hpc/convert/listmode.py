"""`hpc convert` of Siemens list mode (``.l.hdr``) and of the scanner's calibration (``--norm``,
``--mu-map``): what is planned, staged and recorded. The converter itself is unchanged: each
list-mode frame becomes a study whose files (hpc.convert.factors: the frame's prompts + delayeds,
its ``randoms``, the source's ``mult``) are staged in ``DATASET/shards/.staging/`` first and then
converted like any Siemens sinogram (shards verified, renamed, --resume); the manifest records the
list-mode file, frame and factors the study came from, and the staging directory goes once the
manifest is written. A killed run leaves it: ``--resume`` reuses every staged file whose key
(SHA-256 of the sources, frame, layout, dtype) matches, so nothing is histogrammed twice.

    hpc convert scan.l.hdr -o DATASET --frames 0:60,60:300 --norm scan.n.hdr --mu-map mu.hv
    hpc convert scan.s.hdr -o DATASET --norm scan.n.hdr --mu-map mu.hv         # mult for a sinogram
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from hpc.convert import factors as F
from hpc.convert.pool import available_cores
from hpc.convert.study import Study, sha256_file
from hpc.distributed.launcher import mpi_world
from hpc.errors import InputError
from hpc.io import listmode as L
from hpc.io.atomic import atomic_write_text
from hpc.io.headers import check_siemens_layout, read_header
from hpc.io.interfile import data_kind, parse_header
from hpc.io.lmhistogram import DEFAULT_DEVICE, DEVICES, default_target, frame_ranges, histogram
from hpc.io.normfile import read_norm
from hpc.io.spec import SinogramSpec
from hpc.physics import geometry as G
from hpc.physics import norm as N
from hpc.physics import projdata as P
from hpc.physics import randoms as R

STAGING = Path("shards") / ".staging"  # inside the dataset: same file system, kept for --resume
SHARED = "sources"  # in STAGING: the files every frame of a source shares (mult, mask)
MAX_LM_THREADS = 8  # list mode's default threads (one shared histogram; measured here on 2 cores only)
HEADER_KEYS = ("isotope name", "radiopharmaceutical", "study date (yyyy:mm:dd)", "patient orientation")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("list mode (INPUT = a Siemens .l.hdr) and the scanner's calibration")
    g.add_argument("--span", type=int, help="list mode: axial compression of the sinograms (default the scanner's, "
                                            "mMR 11)")
    g.add_argument("--view-mashing", type=int, help="list mode: views summed per stored view (default the scanner's)")
    g.add_argument("--max-segment", type=int, help="list mode: keep segments |k| <= K only")
    g.add_argument("--frames", help="list mode: time frames START:STOP,... in seconds from the first time mark "
                                    "(e.g. 0:60,60:300): one study each, ids <stem>-f0, <stem>-f1, ...")
    g.add_argument("--norm", nargs="+", default=[], metavar="FILE",
                   help="Siemens component normalisation (.n.hdr), one for all INPUTs or one each: adds `mult`")
    g.add_argument("--mu-map", nargs="+", default=[], metavar="FILE",
                   help="mu-map (STIR .hv or Siemens .v.hdr, 1/cm), one for all INPUTs or one each: adds `mult`")
    g.add_argument("--dead-blocks", metavar="IDS",
                   help="list mode: dead detector blocks (comma-separated ids, hpc.physics.geometry's numbering) "
                        "stored as the gap `mask` of every frame, from the geometry (measured fraction of each bin): "
                        "what `hpc evaluate --dataset` and training with stored masks use")
    g.add_argument("--lm-workers", type=int,
                   help=f"list mode: threads histogramming each frame (numba; default: the cores, at most "
                        f"{MAX_LM_THREADS}), or processes (numpy: one more histogram each; default 1)")
    g.add_argument("--lm-device", choices=DEVICES, default=DEFAULT_DEVICE,
                   help=f"list mode: histogramming kernel (numba compiled, numpy, or torch on cpu / cuda; "
                        f"default here {DEFAULT_DEVICE}; docs/BENCHMARKS.md)")
    g.add_argument("--histogram-dtype", choices=("uint16", "uint32"), default="uint16",
                   help="list mode: counts per bin as stored (uint16, as the vendor's sinograms: more is an error)")


def is_listmode(path: str, args: argparse.Namespace) -> bool:
    """A header that describes list mode (raw inputs, --shape, never are)."""
    if args.shape:
        return False
    try:
        return data_kind(parse_header(path)) == "list mode data"
    except InputError:
        return False  # not a header: the sinogram path says why


@dataclass(frozen=True)
class Source:
    """A list-mode file, or the calibration of a sinogram input: what staging reads."""
    header: Path | None  # the .l.hdr (None: a sinogram input's factors only)
    layout: P.Layout  # the target layout
    norm: Path | None = None
    mu_map: Path | None = None
    workers: int = 1
    device: str = DEFAULT_DEVICE
    stem: str = ""  # staged names of the files its frames share: <stem>_mult, <stem>_mask
    dead_blocks: tuple[int, ...] = ()


@dataclass(frozen=True)
class StagedStudy(Study):
    """A study whose files are staged before it is converted: ``frame`` of ``source`` (list mode),
    or only its mult (a sinogram input with --norm/--mu-map)."""
    source: Source | None = None
    frame: tuple[int, int] | None = None
    staged: dict[str, SinogramSpec] = field(default_factory=dict)  # role -> spec of a staged file


def _per_input(args: argparse.Namespace, role: str, k: int) -> Path | None:
    files = getattr(args, role)
    if not files:
        return None
    if len(files) not in (1, len(args.sources)):
        raise InputError(f"--{role.replace('_', '-')}: {len(files)} files for {len(args.sources)} inputs "
                         "(one for all, or one per input)")
    return Path(files[0] if len(files) == 1 else files[k])


def _check_calibration(args: argparse.Namespace, listmode: bool) -> None:
    if (args.norm or args.mu_map) and getattr(args, "mult", None):
        raise InputError("--mult and --norm/--mu-map both give `mult`: use one")
    taken = [f"--{r}" for r in ("input", "mask", "expected", "randoms", "mult") if getattr(args, r, None)]
    if listmode and taken:
        raise InputError(f"{taken[0]}: not with list-mode inputs (their randoms come from the delayeds, their mult "
                         "from --norm/--mu-map)")
    world = mpi_world()
    if (listmode or args.norm or args.mu_map) and world and world.world > 1:
        raise InputError("list mode and --norm/--mu-map are staged by one process: run hpc convert without mpirun "
                         "(--lm-workers N histograms in parallel)")
    if args.lm_workers is not None and args.lm_workers < 1:
        raise InputError(f"--lm-workers must be >= 1, got {args.lm_workers}")


def _target_layout(hdr: L.ListModeHeader, args: argparse.Namespace) -> P.Layout:
    src, base = hdr.layout, default_target(hdr.layout)
    if args.span is None and args.view_mashing is None and args.max_segment is None:
        return base
    try:
        lay = P.cti_layout(src.scanner, args.span or base.span, None if args.span else max(base.max_rd),
                           args.view_mashing or base.view_mashing, base.tof_mashing, args.max_segment)
        L.bin_map(src, lay)  # a span the file's addresses cannot be rebinned to: refused now
        check_siemens_layout(lay)
    except ValueError as exc:
        raise InputError(f"{hdr.path}: --span/--view-mashing/--max-segment: {exc}") from None
    return lay


def listmode_studies(path: str, k: int, args: argparse.Namespace, taken: set[str]) -> list[StagedStudy]:
    """The studies of list-mode input ``k`` (one per frame), checked now: header against its data
    file, frames against its time marks, --norm/--mu-map headers against its scanner."""
    _check_calibration(args, listmode=True)
    hdr = L.read_header(path)
    layout = _target_layout(hdr, args)
    try:
        frames = L.parse_frames(args.frames) if args.frames else None
        if frames:
            frame_ranges(hdr, frames)  # refuses a file without time marks
    except ValueError as exc:
        raise InputError(f"{hdr.path}: --frames: {exc}") from None
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", re.sub(r"(\.l)?\.hdr$", "", hdr.path.name)) or "listmode"
    workers = args.lm_workers or (min(available_cores(), MAX_LM_THREADS) if args.lm_device == "numba" else 1)
    source = Source(hdr.path, layout, _per_input(args, "norm", k), _per_input(args, "mu_map", k), workers,
                    args.lm_device, _source_stem(stem, taken), _dead_blocks(hdr, layout, args.dead_blocks))
    _check_factor_files(source)
    out, fields = Path(args.output) / STAGING, {key: hdr.fields[key] for key in HEADER_KEYS if key in hdr.fields}
    studies = []
    for i, frame in enumerate(frames or [None]):
        sid = _unique(f"{stem}-f{i}" if frames else stem, taken)
        duration = (frame[1] - frame[0]) / 1000 if frame else hdr.fields.get("image duration (sec)", "")
        f = {**fields, "image duration (sec)": duration} if duration != "" else fields
        target = F.staged_spec(out / f"{sid}.s.hdr", layout, np.dtype(args.histogram_dtype), True, f)
        staged = {"target": target}
        if _has_fansums(hdr.layout):
            staged["randoms"] = F.staged_spec(out / f"{sid}_randoms.s.hdr", layout, np.float32, False, {})
        if source.norm or source.mu_map:
            staged["mult"] = F.staged_spec(out / SHARED / f"{source.stem}_mult.s.hdr", layout, np.float32, False, {})
        if source.dead_blocks:  # one slice per plane, shared by TOF bins (hpc.io.sinogram.MaskReader)
            flat = replace(layout, tof_bins=1)
            staged["mask"] = F.staged_spec(out / SHARED / f"{source.stem}_mask.s.hdr", flat, np.float32, False, {})
        truth = tuple((r, staged[r]) for r in ("randoms", "mult") if r in staged)
        studies.append(StagedStudy(sid, target, mask=staged.get("mask"), truth=truth, source=source, frame=frame,
                                   staged=staged))
    return studies


def _dead_blocks(hdr: L.ListModeHeader, layout: P.Layout, text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        ids = [int(v) for v in text.split(",") if v.strip()]
        return tuple(int(b) for b in G.check_blocks(layout.scanner, ids))
    except ValueError as exc:
        raise InputError(f"{hdr.path}: --dead-blocks {text!r}: {exc}") from None


LISTMODE_ONLY = {"span": None, "view_mashing": None, "max_segment": None, "frames": None, "dead_blocks": None,
                 "lm_workers": None, "lm_device": DEFAULT_DEVICE, "histogram_dtype": "uint16"}


def with_factors(study: Study, k: int, args: argparse.Namespace, taken: set[str]) -> Study:
    """A sinogram input's study with a staged `mult` from --norm/--mu-map (unchanged without them)."""
    given = [key for key, default in LISTMODE_ONLY.items() if getattr(args, key) != default]
    if given and not any(is_listmode(src, args) for src in args.sources):
        raise InputError(f"--{given[0].replace('_', '-')}: applies to list-mode inputs (.l.hdr) only; "
                         f"{study.target.source} is a sinogram")
    if not (args.norm or args.mu_map):
        return study
    _check_calibration(args, listmode=False)
    t = study.target
    try:
        layout = t.layout()
    except ValueError as exc:
        raise InputError(f"{t.source}: --norm/--mu-map need the scanner and layout of the sinogram: {exc}") from None
    source = Source(None, layout, _per_input(args, "norm", k), _per_input(args, "mu_map", k),
                    stem=_source_stem(study.id, taken))
    _check_factor_files(source)
    mult = F.staged_spec(Path(args.output) / STAGING / SHARED / f"{source.stem}_mult.s.hdr", layout, np.float32,
                         False, {})
    return StagedStudy(study.id, t, study.input, study.mask, (*study.truth, ("mult", mult)), source=source,
                       staged={"mult": mult})


def _unique(name: str, taken: set[str]) -> str:
    sid, k = name, 2
    while sid in taken:
        sid, k = f"{name}-{k}", k + 1
    taken.add(sid)
    return sid


def _source_stem(stem: str, taken: set[str]) -> str:
    """A name for the files a source's studies share (SHARED/<stem>_mult, _mask), unique among the
    sources (a separate namespace from the study ids, kept in the same set)."""
    return _unique(f"source:{stem}", taken)[len("source:"):]


def _has_fansums(src: P.Layout) -> bool:
    """Randoms from the delayeds need each event's two crystals: span-1, unmashed addresses (the mMR's)."""
    return src.span == 1 and src.view_mashing == 1 and all(lo == hi for lo, hi in zip(src.min_rd, src.max_rd,
                                                                                        strict=True))


def _check_factor_files(source: Source) -> None:
    """Read the norm and mu-map now (small files): a wrong file is refused before anything is written."""
    sc = source.layout.scanner
    if source.norm:
        comp = read_norm(source.norm)
        if comp.scanner.name != sc.name:
            raise InputError(f"{source.norm}: a normalisation of {comp.scanner.stir_name}, the data is {sc.stir_name}")
    if source.mu_map:
        from hpc.io.mumap import read_mumap  # late: the physics of attenuation (and torch) only when asked for

        read_mumap(source.mu_map)
    if source.layout.bins != sc.bins and (source.norm or source.mu_map):
        raise InputError(f"{source.norm or source.mu_map}: factors need the scanner's {sc.bins} bins, "
                         f"the data has {source.layout.bins}")


class Staging:
    """Writes the staged files of the planned studies (``run``), rewrites their manifest entries
    to name the list-mode file, frame and factors (``provenance``), and removes the staging
    directory once the manifest is written (``finish``)."""

    def __init__(self, out: Path, resume: bool, quiet: bool):
        self.dir, self.resume, self.quiet = Path(out) / STAGING, resume, quiet
        self.info: dict[str, dict] = {}  # study id -> provenance
        self._sums: dict[Path, str] = {}
        self.check: Callable[[], None] | None = None

    def run(self, studies: list[Study], check: Callable[[], None] | None = None) -> list[Study]:
        """Stage what ``studies`` need; returns them as plain studies of the staged files. ``check``
        is called between chunks of list mode (hpc convert's Ctrl-C: raises KeyboardInterrupt)."""
        self.check = check
        staged = [s for s in studies if isinstance(s, StagedStudy)]
        if not staged:
            return studies
        (self.dir / SHARED).mkdir(parents=True, exist_ok=True)
        by_source: dict[Source, list[StagedStudy]] = {}
        for s in staged:
            by_source.setdefault(s.source, []).append(s)
        for source, group in by_source.items():
            self._stage_source(source, group)
        return [self._plain(s) if isinstance(s, StagedStudy) else s for s in studies]

    def _sha(self, path: Path) -> str:
        if path not in self._sums:
            self._sums[path] = sha256_file(path)
        return self._sums[path]

    def _key(self, source: Source, role: str, frame) -> dict:
        lay = source.layout
        key = {"role": role, "layout": [lay.scanner.name, list(lay.segments), list(lay.min_rd), list(lay.max_rd),
                                        lay.view_mashing, lay.tof_bins, lay.bins], "frame_ms": frame}
        if role == "mult":
            key["norm"] = self._sha(_data_file(source.norm)) if source.norm else None
            key["mu_map"] = self._sha(_data_file(source.mu_map)) if source.mu_map else None
        elif role == "mask":
            key["dead_blocks"] = list(source.dead_blocks)
        else:
            key["listmode"] = self._sha(L.read_header(source.header).data_path)
        return key

    def _fresh(self, spec: SinogramSpec, key: dict) -> bool:
        """A staged file from an earlier run that --resume may keep: complete, same key."""
        sidecar = spec.header_path.with_name(spec.header_path.name + ".key.json")
        if not (self.resume and spec.header_path.is_file() and sidecar.is_file()):
            return False
        try:
            return json.loads(sidecar.read_text()) == json.loads(json.dumps({**key, "dtype": spec.dtype.str}))
        except ValueError:
            return False

    def _done(self, spec: SinogramSpec, key: dict) -> None:
        sidecar = spec.header_path.with_name(spec.header_path.name + ".key.json")
        atomic_write_text(sidecar, json.dumps({**key, "dtype": spec.dtype.str}, sort_keys=True))

    def _stage_source(self, source: Source, group: list[StagedStudy]) -> None:
        first = group[0]
        if "mult" in first.staged:
            spec, key = first.staged["mult"], self._key(source, "mult", None)
            if not self._fresh(spec, key):
                self._say(f"mult of {first.id}: {source.norm or 'no norm'} x {source.mu_map or 'no mu-map'}")
                F.write_floats(spec, source.layout, _mult(source), "mult = efficiency x attenuation, by hpc convert")
                self._done(spec, key)
        if "mask" in first.staged:
            spec, key = first.staged["mask"], self._key(source, "mask", None)
            if not self._fresh(spec, key):
                flat = replace(source.layout, tof_bins=1)
                F.write_floats(spec, flat, P.dead_fractions(source.layout, list(source.dead_blocks)),
                               f"measured fraction with dead blocks {list(source.dead_blocks)}, by hpc convert")
                self._done(spec, key)
        if source.header is not None:
            self._stage_frames(source, group)

    def _stage_frames(self, source: Source, group: list[StagedStudy]) -> None:
        hdr = L.read_header(source.header)
        todo = []
        for s in group:
            keys = {r: self._key(source, r, s.frame) for r in ("target", "randoms") if r in s.staged}
            self.info[s.id] = self._provenance(hdr, s)
            if not all(self._fresh(s.staged[r], k) for r, k in keys.items()):
                todo.append((s, keys))
            else:  # the counts of the earlier run, kept beside its histogram
                self.info[s.id]["counts"] = json.loads(_counts_file(s.staged["target"]).read_text())
        if not todo:
            return
        frames = [s.frame for s, _ in todo] if todo[0][0].frame else None
        fans = "randoms" in todo[0][0].staged
        t0 = time.perf_counter()
        runs = histogram(hdr, source.layout, frames, source.workers, fansums=fans, device=source.device,
                         check=self.check)
        for (s, keys), h in zip(todo, runs, strict=True):
            what = f"{hdr.path.name}" + (f" frame {s.frame[0] / 1000:g}:{s.frame[1] / 1000:g} s" if s.frame else "")
            F.write_histogram(s.staged["target"], source.layout, h, f"histogrammed by hpc convert from {what}")
            counts = {k: h.stats[k] for k in ("prompts", "delayeds", "dropped_prompts", "dropped_delayeds", "words")}
            atomic_write_text(_counts_file(s.staged["target"]), json.dumps(counts))
            self._done(s.staged["target"], keys["target"])  # last: the key says the histogram is complete
            self.info[s.id]["counts"] = counts
            self._say(f"{what}: {h.stats['prompts']} prompts, {h.stats['delayeds']} delayeds "
                      f"({time.perf_counter() - t0:.1f} s)")
            if fans:
                h.prompts = h.delayeds = None  # the accumulators go before the randoms' arrays come
                F.write_floats(s.staged["randoms"], source.layout, _randoms(hdr, h.fansums, source.layout),
                               "randoms = ML singles from the delayeds' fan sums, by hpc convert")
                self._done(s.staged["randoms"], keys["randoms"])

    def _provenance(self, hdr: L.ListModeHeader, s: StagedStudy) -> dict:
        return {"source": str(hdr.path.resolve()), "data": str(hdr.data_path.resolve()),
                "sha256": self._sha(hdr.data_path), "frame_ms": list(s.frame) if s.frame else None,
                "span": s.source.layout.span, "view_mashing": s.source.layout.view_mashing,
                "dead_blocks": list(s.source.dead_blocks),
                "randoms": "ML singles from the delayeds' fan sums" if "randoms" in s.staged else None}

    def _plain(self, s: StagedStudy) -> Study:
        """The study with the staged files as read back from their headers (checked like any input)."""
        read = {role: read_header(spec.header_path) for role, spec in s.staged.items()}
        truth = tuple((r, read.get(r, spec)) for r, spec in s.truth)
        factors = {"norm": s.source.norm, "mu_map": s.source.mu_map} if "mult" in s.staged else {}
        self.info.setdefault(s.id, {})["factors"] = {
            k: {"source": str(v.resolve()), "sha256": self._sha(_data_file(v))} for k, v in factors.items() if v}
        return Study(s.id, read.get("target", s.target), s.input, read.get("mask", s.mask), truth)

    def provenance(self, entries: list[dict]) -> list[dict]:
        """Manifest entries of staged studies name what the user gave (the staged files go)."""
        out = []
        for e in entries:
            info = self.info.get(e["id"])
            if info:
                e = dict(e)
                if "source" in info:
                    e.update(source=info["source"], kind="listmode",
                             listmode={k: v for k, v in info.items() if k not in ("source", "factors")})
                    e.pop("randoms_source", None)
                    if s_blocks := info.get("dead_blocks"):
                        e["mask_source"] = f"dead blocks {s_blocks} (geometry)"
                if info.get("factors"):
                    e["factors"] = info["factors"]
                    e["mult_source"] = next(iter(info["factors"].values()))["source"]
            out.append(e)
        return out

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(f"convert: {text}", flush=True)


def _counts_file(spec: SinogramSpec) -> Path:
    return spec.header_path.with_name(spec.header_path.name + ".counts.json")


def _data_file(header: Path) -> Path:
    """The data file a norm or mu-map header names (its SHA-256 identifies it)."""
    h = parse_header(header)
    return h.resolve(h.require("name of data file"))


def _mult(source: Source) -> np.ndarray:
    """(P, V, X) mult of the source's layout from its norm and mu-map."""
    from hpc.io.mumap import read_mumap  # late: torch (the projector) only when a mu-map is given
    from hpc.physics import attenuation as A  # late, as above

    lay = source.layout
    flat = replace(lay, tof_bins=1)
    eff = att = None
    if source.norm:
        comp = read_norm(source.norm)
        eff = lambda planes: N.bin_efficiencies(comp, flat, planes)  # noqa: E731
    if source.mu_map:
        mu = read_mumap(source.mu_map)
        att = lambda planes: A.attenuation_factors(mu, flat, planes)  # noqa: E731
    return F.mult_planes(flat, eff, att)


def _randoms(hdr: L.ListModeHeader, fansums: np.ndarray, layout: P.Layout) -> np.ndarray:
    singles, _ = R.ml_singles(fansums, hdr.layout)
    return F.randoms_planes(layout, singles, R.randoms)
