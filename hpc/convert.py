"""Convert raw / Interfile sinograms into chunked HDF5 shards (shard format v2, docs/FORMAT.md).

Inputs are Interfile headers (STIR `.hs`, Siemens `.s.hdr`/`.mhdr`) or, with --shape/--dtype, raw
files. Each input file is one study; --input/--mask add a paired acquisition and a gap mask to the
study at the same position, --expected/--randoms/--mult its noise-free expected counts, randoms and
multiplicative factors (float32; hpc simulate writes them). Shards appear atomically (temporary
name, verified, renamed); manifest.json is written last, so a dataset is complete once it exists.
--resume keeps the shards whose checksums verify and redoes the rest. Under `mpirun -np N` the ranks split the files.

examples:
  hpc convert scans/*.s.hdr -o data/scans
  hpc convert big.s.hdr -o data/big --workers 8                         # 8 compressing threads
  hpc convert full1.hs full2.hs --input low1.hs low2.hs --mask gap1.s.hdr gap2.s.hdr -o data/paired
  hpc convert study.raw --shape 1,837,252,344 --dtype uint16 --endian big -o data/raw
  mpirun -np 4 hpc convert scans/*.s.hdr -o data/scans --resume
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import numpy as np

from hpc import __version__
from hpc.distributed.launcher import mpi_world
from hpc.errors import HpcError, InputError, OutputError
from hpc.io.atomic import atomic_write_text, output_error
from hpc.io.chunks import HashLane
from hpc.io.shards import COMPRESSIONS, DEFAULT_COMPRESSION, FORMAT, FORMAT_VERSION, TRUTH, ShardWriter, verify_shard
from hpc.io.sinogram import MaskReader, SinogramReader, SinogramSpec, raw_spec, read_header
from hpc.progress import Progress

SLAB_BYTES = 8 << 20  # read/write a few slices at a time: memory stays flat whatever the file size
HEADER_ATTRS = ("originating system", "pet data type", "tof mashing factor", "isotope name",
                "image duration (sec)", "scanner type", "applied corrections")
Report = Callable[[int], None]  # called with the number of slices just converted
TMP_NAME = re.compile(r"^\..+\.h5(\.[0-9a-f]{16})?\.tmp$")  # the atomic writer's temporary shards


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="INPUT", help="Interfile headers or raw files (one study each)")
    p.add_argument("-o", "--output", required=True, help="dataset directory to create")
    p.add_argument("--input", nargs="+", default=[], metavar="FILE",
                   help="paired acquisitions (e.g. low-count), one per INPUT, same shape")
    p.add_argument("--mask", nargs="+", default=[], metavar="FILE",
                   help="gap masks (1 = measured), one per INPUT: same shape, or a single slice")
    for role, what in (("expected", "noise-free expected counts of the target (simulations)"),
                       ("randoms", "expected randoms (part of the target's expected counts)"),
                       ("mult", "multiplicative factors: detector efficiencies x attenuation")):
        p.add_argument(f"--{role}", nargs="+", default=[], metavar="FILE",
                       help=f"{what}, one per INPUT, same shape; stored as float32 `{role}`")
    raw = p.add_argument_group("raw files (no header)")
    raw.add_argument("--shape", help="T,S,V,X (TOF bins, sinograms, views, bins) or S,V,X")
    raw.add_argument("--dtype", default="", help="numpy dtype, e.g. uint16, int16, float32")
    raw.add_argument("--endian", choices=("little", "big"), default="little")
    raw.add_argument("--offset", type=int, default=0, help="bytes to skip at the start of each file")
    p.add_argument("--shard-slices", type=int, default=0, help="slices per shard (overrides --shard-mb)")
    p.add_argument("--shard-mb", type=float, default=256.0, help="approximate uncompressed shard size")
    p.add_argument("--compression", choices=COMPRESSIONS, default=DEFAULT_COMPRESSION,
                   help=f"chunk codec (default {DEFAULT_COMPRESSION}: blosc lz4 + byte shuffle, about half the raw "
                        "size of Poisson counts and the fastest to read; readers need `import hdf5plugin`); "
                        "lzf and gzip need only h5py (docs/FORMAT.md)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="keep verified shards, redo the rest")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.add_argument("--workers", type=int, default=available_cores(),
                   help="threads compressing chunks (default: the cores this process may use)")
    p.add_argument("--processes", type=int, default=1,
                   help="processes sharing the shards of all files, without mpirun (each with --workers threads)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


# `scan data type description` of a Siemens file's second data set: randoms measured as delayed coincidences
DELAYED_NAMES = ("randoms", "delayed", "delays")


@dataclass(frozen=True)
class Study:
    id: str
    target: SinogramSpec
    input: SinogramSpec | None = None
    mask: SinogramSpec | None = None
    truth: tuple[tuple[str, SinogramSpec], ...] = ()  # (role in TRUTH, spec)

    @property
    def delayed(self) -> SinogramSpec | None:
        """The randoms data set of the target's own file (Siemens prompts + randoms: delayed
        coincidences, counts), if it has one; stored as `delayed` (`randoms` are expected randoms)."""
        name = next((n for n, _ in self.target.datasets if n in DELAYED_NAMES), None)
        return self.target.dataset(name) if name else None

    @property
    def specs(self) -> dict[str, SinogramSpec]:
        pairs = (("target", self.target), ("input", self.input), ("mask", self.mask), *self.truth,
                 ("delayed", self.delayed))
        return {k: s for k, s in pairs if s}

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())


@dataclass(frozen=True)
class Options:
    compression: str
    shard_slices: int
    shard_mb: float
    resume: bool
    workers: int = 1  # chunk-encoding threads per process

    def per_shard(self, study: Study) -> int:
        if self.shard_slices > 0:
            return self.shard_slices
        per_slice = study.nbytes // study.target.num_slices
        return max(1, int(self.shard_mb * 1e6) // per_slice)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask: a Slurm task's share, not the node's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _open_source(path: str, args: argparse.Namespace) -> SinogramSpec:
    if not args.shape:
        return read_header(path)
    try:
        shape = tuple(int(v) for v in args.shape.split(","))
    except ValueError:
        raise InputError(f"--shape: expected comma-separated integers like 1,837,252,344, got {args.shape!r}") from None
    if not args.dtype:
        raise InputError(f"{path}: a raw file needs --dtype (e.g. uint16)")
    return raw_spec(path, shape, args.dtype, args.endian, args.offset)


def _study_id(path: Path, taken: set[str]) -> str:
    name = path.name
    for suffix in (".s.hdr", ".mhdr", ".hs", ".hdr", ".s", ".raw", ".bin"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    sid, k = base, 2
    while sid in taken:
        sid, k = f"{base}-{k}", k + 1
    taken.add(sid)
    return sid


def _check_pair(target: SinogramSpec, other: SinogramSpec, role: str) -> None:
    counts = (target.num_slices, target.planes, 1) if role == "mask" else (target.num_slices,)
    if other.slice_shape != target.slice_shape or other.num_slices not in counts:
        raise InputError(f"{other.source}: {role} shape {other.num_slices}x{other.views}x{other.bins} "
                         f"does not match {target.source} ({target.num_slices}x{target.views}x{target.bins})")


def plan(args: argparse.Namespace) -> list[Study]:
    """Parse and check every file before anything is written."""
    extra = {role: getattr(args, role, []) or [] for role in ("input", "mask", *TRUTH)}
    for role, files in extra.items():
        if files and len(files) != len(args.sources):
            raise InputError(f"--{role}: {len(files)} files for {len(args.sources)} inputs (lists pair by position)")
    studies, taken = [], set()
    for k, src in enumerate(args.sources):
        target = _open_source(src, args)
        specs = {role: _open_source(files[k], args) for role, files in extra.items() if files}
        for role, spec in specs.items():
            _check_pair(target, spec, role)
        truth = tuple((role, specs[role]) for role in TRUTH if role in specs)
        studies.append(Study(_study_id(Path(src), taken), target, specs.get("input"), specs.get("mask"), truth))
    first = studies[0].target
    for s in studies[1:]:
        same_dtype = s.target.dtype.newbyteorder("=") == first.dtype.newbyteorder("=")
        if s.target.slice_shape != first.slice_shape or not same_dtype:
            raise InputError(f"{s.target.source}: slices {s.target.slice_shape} {s.target.dtype.name} differ from "
                             f"{first.source} ({first.slice_shape} {first.dtype.name}); "
                             "convert them into separate datasets")
    return studies


MARKER = ".hpc-dataset"  # written first into every output directory: "this tool writes here"


def is_ours(out: Path) -> bool:
    """A directory hpc convert wrote: its marker, or (older datasets) an hpc manifest.json."""
    if (out / MARKER).is_file():
        return True
    try:
        return json.loads((out / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def is_hpc_shard(path: Path) -> bool:
    """An HDF5 file this tool wrote (root attribute format = hpc-sinogram): the only .h5 files
    --overwrite and a smaller re-conversion may delete."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT
    except OSError:
        return False


def prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty directory unless resuming/overwriting a dataset this tool wrote (a user's
    own files are never deleted); hide any old manifest first, so the directory is never a valid
    dataset while shards change."""
    try:
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: exists and is not a directory")
        if out.is_dir() and any(out.iterdir()):
            if not (resume or overwrite):
                raise OutputError(f"{out}: output directory is not empty (use --resume to continue or "
                                  "--overwrite to replace)")
            if not is_ours(out):  # the user's own directory: never resume into it, never replace their files
                clash = [p.name for p in (out / "manifest.json", out / "shards") if p.exists()]
                if resume or clash:
                    raise OutputError(f"{out}: not a dataset written by hpc convert (no {MARKER} or hpc "
                                      f"manifest.json){' and it has ' + clash[0] if clash else ''}; refusing to "
                                      f"{'resume' if resume else 'overwrite'} into it (nothing changed)")
        shards = out / "shards"
        shards.mkdir(parents=True, exist_ok=True)
        if not (out / MARKER).is_file():
            atomic_write_text(out / MARKER, json.dumps({"created_by": f"hpc {__version__}", "format": FORMAT}) + "\n")
        (out / "manifest.json").unlink(missing_ok=True)
        for f in shards.iterdir():  # temporary shards of a killed run go; --overwrite also drops finished ones
            if TMP_NAME.match(f.name) or (overwrite and f.suffix == ".h5" and is_hpc_shard(f)):
                f.unlink()
    except OSError as exc:
        raise output_error(out, exc, "nothing converted") or \
            OutputError(f"{out}: cannot write the dataset: {exc.strerror or exc}") from None


def sweep_temporaries(out: Path) -> None:
    """Remove the hidden temporary shards left by workers that were stopped (interrupt, error)."""
    with contextlib.suppress(OSError):
        for f in (out / "shards").iterdir():
            if TMP_NAME.match(f.name):
                f.unlink(missing_ok=True)


def sha256_file(path: Path, block: int = 8 << 20) -> str:
    h, buf = hashlib.sha256(), bytearray(block)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _shard_attrs(study: Study, sums: dict[str, str], first: int, count: int, opts: Options) -> dict:
    t = study.target
    attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "axes": "slice,view,bin",
             "source": t.source.name, "source_sha256": sums["target"], "study": study.id,
             "first_slice": first, "study_num_slices": t.num_slices, "source_kind": t.kind,
             "source_dtype": t.dtype.str, "scanner": t.scanner or t.fields.get("originating system", ""),
             "tof_bins": t.tof_bins, "segments": list(t.segments), "axial_counts": list(t.axial_counts),
             "ring_diffs": json.dumps(t.ring_diffs), "compression": opts.compression}
    for role in ("input", "mask", *TRUTH):
        if role in sums:
            attrs[f"{role}_source"], attrs[f"{role}_sha256"] = study.specs[role].source.name, sums[role]
    attrs["has_delayed"] = study.delayed is not None  # from the target's own file (same sha256)
    attrs.update({f"header:{k}": t.fields[k] for k in HEADER_ATTRS if k in t.fields})
    # what makes a finished shard reusable by --resume: same sources, range and encoding
    key = {k: attrs.get(k) for k in ("source_sha256", "input_sha256", "mask_sha256", "first_slice",
                                     "compression", "source_dtype")}
    key.update({f"{r}_sha256": attrs[f"{r}_sha256"] for r in TRUTH if f"{r}_sha256" in attrs})
    attrs["convert_key"] = json.dumps({**key, "num_slices": count}, sort_keys=True)
    return attrs


def _reusable(path: Path, attrs: dict) -> dict | None:
    """Shard info of a finished shard from an earlier run, if it verifies and matches ``attrs``."""
    import h5py

    if not path.is_file() or not verify_shard(path)[0]:
        return None
    with h5py.File(path, "r") as f:
        if f.attrs.get("convert_key") != attrs["convert_key"]:
            return None
        return {"sha256": {n: d.attrs["sha256"] for n, d in f.items()},
                "max": {n: float(f[n].attrs["max"]) for n in ("target", "input") if n in f},
                "bytes": path.stat().st_size}


def _finite(slab: np.ndarray, spec: SinogramSpec, start: int) -> None:
    if slab.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(slab).all(axis=(1, 2)))
        if bad.size:
            raise InputError(f"{spec.source}: slice {start + int(bad[0])} contains NaN or inf")


def _arrays(study: Study, count: int) -> dict:
    t = study.target
    v, x = t.slice_shape
    arrays = {"target": ((count, v, x), t.dtype)}
    if study.input:
        arrays["input"] = ((count, v, x), study.input.dtype)
    if study.delayed:
        arrays["delayed"] = ((count, v, x), study.delayed.dtype)
    if study.mask:  # 0/1 masks as uint8; measured fractions (a float mask file) as float32
        arrays["mask"] = ((v, x) if _mask_2d(study) else (count, v, x), mask_dtype(study.mask))
    arrays.update({role: ((count, v, x), np.float32) for role, _ in study.truth})
    arrays.update({k: ((count,), np.int32) for k in ("tof", "segment", "axial")})
    return arrays


def _mask_2d(study: Study) -> bool:
    return study.mask is not None and study.mask.num_slices == 1


def _fill_shard(study: Study, readers: dict[str, SinogramReader], w: ShardWriter, first: int, count: int,
                report: Report, digests: dict | None = None) -> None:
    """Slabs [first, first + count) of every role into ``w``; ``digests`` (role -> hashlib object)
    are fed the source files' bytes by the same reads."""
    t, mask_2d, digests = study.target, _mask_2d(study), digests or {}
    meta = dict(zip(("tof", "segment", "axial"), t.meta(), strict=True))
    slab = max(1, SLAB_BYTES // (study.nbytes // t.num_slices))
    mask_type = mask_dtype(study.mask) if study.mask else None
    if mask_2d:
        w.write(0, mask=readers["mask"].read(0, 1)[0].astype(mask_type))
    for k in range(first, first + count, slab):
        stop = min(k + slab, first + count)
        slabs = {role: r.read(k, stop, digest=digests.get(role)) for role, r in readers.items()
                 if not (role == "mask" and mask_2d)}
        for role in ("target", "input", "delayed", *TRUTH):
            if role in slabs:
                _finite(slabs[role], study.specs[role], k)
        if "mask" in slabs:  # fractions: uint8 0/1 for integer masks, float32 for float ones
            slabs["mask"] = slabs["mask"].astype(mask_type)
        w.write(k - first, **slabs, **{m: a[k:stop] for m, a in meta.items()})
        report(stop - k)


def mask_dtype(spec: SinogramSpec) -> np.dtype:
    """How a mask is stored: uint8 0/1 from an integer mask file, float32 measured fractions in
    [0, 1] from a float one (span-compressed data: a bin partly lost)."""
    return np.dtype(np.float32) if spec.dtype.kind == "f" else np.dtype(np.uint8)


def _readers(study: Study) -> dict[str, SinogramReader | MaskReader]:
    return {role: MaskReader(spec, study.target) if role == "mask" else SinogramReader(spec)
            for role, spec in study.specs.items()}


def _write_shard(study: Study, readers: dict[str, SinogramReader], path: Path, first: int, count: int,
                 attrs: dict, opts: Options, report: Report) -> dict:
    with ShardWriter(path, _arrays(study, count), opts.compression, attrs, _pool(opts)) as w:
        _fill_shard(study, readers, w, first, count, report)
        return w.commit()


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (pid, threads) -> pool


def _pool(opts: Options) -> ThreadPoolExecutor | None:
    """This process's chunk-encoding threads (numcodecs' blosc and zlib release the GIL); keyed by
    the process id too: a forked child inherits the pool object without its threads."""
    if opts.workers <= 1:
        return None
    key = (os.getpid(), opts.workers)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(opts.workers, thread_name_prefix="hpc-encode")
    return _POOLS[key]


def hash_sources(study: Study) -> dict[str, str]:
    """role -> SHA-256 of its data file (recorded in every shard; --resume compares it)."""
    return {role: sha256_file(spec.data_path) for role, spec in study.specs.items()
            if role != "delayed"}  # the delayed share the target's data file


def shard_ranges(study: Study, opts: Options) -> list[tuple[int, int]]:
    """(first slice, count) of each shard of the study."""
    n, per = study.target.num_slices, opts.per_shard(study)
    return [(first, min(per, n - first)) for first in range(0, n, per)]


def convert_shard(study: Study, sums: dict[str, str], k: int, first: int, count: int, out: Path,
                  opts: Options, report: Report) -> dict:
    """Write (or, with --resume, reuse) shard ``k`` of a study. Returns its manifest entry."""
    rel = f"shards/{study.id}-{k:04d}.h5"
    attrs = _shard_attrs(study, sums, first, count, opts)
    info = _reusable(out / rel, attrs) if opts.resume else None
    if info is not None:
        report(count)
    else:
        readers = _readers(study)
        try:
            info = _write_shard(study, readers, out / rel, first, count, attrs, opts, report)
        finally:
            for r in readers.values():
                r.close()
    return {"path": rel, "first_slice": first, "num_slices": count, "sha256": info["sha256"],
            "bytes": info["bytes"], "max": info["max"].get("target", 0.0)}


def convert_study(study: Study, out: Path, opts: Options, report: Report) -> dict:
    """All shards of a study, one after the other. Returns the study's manifest entry.

    Each source file is read once: its SHA-256 is fed from the slabs the shards are written from
    (``convert_study_fused``). With --resume, or a file whose slice order is not its byte order
    (STIR view-major), the sources are hashed first (resume compares the checksums before deciding
    which shards to keep), then converted shard by shard."""
    readers = _readers(study)
    try:
        if not opts.resume and all(r.contiguous for r in readers.values()):
            return convert_study_fused(study, readers, out, opts, report)
    finally:
        for r in readers.values():
            r.close()
    sums = hash_sources(study)
    shards = [convert_shard(study, sums, k, first, count, out, opts, report)
              for k, (first, count) in enumerate(shard_ranges(study, opts))]
    return study_entry(study, sums, shards)


def convert_study_fused(study: Study, readers: dict[str, SinogramReader], out: Path, opts: Options,
                        report: Report) -> dict:
    """One pass over the sources: every shard is written and kept open (a hidden temporary), the
    sources' checksums grow with the reads, and once they are complete every shard gets them (its
    ``source_sha256`` and ``convert_key``), is verified and renamed into place. A run killed before
    that leaves only temporaries, which the next run removes."""
    # a file whose slices are read once in order is hashed by those reads; a mask repeated per
    # plane or for every slice is a small file, hashed on its own; the delayed share the target's file
    digests = {role: HashLane(hashlib.sha256()) for role, r in readers.items()
               if role != "delayed" and getattr(r, "streams", True)}
    pending = {role: "" for role in study.specs if role != "delayed"}  # checksums not known yet
    writers, shards = [], []
    try:
        for k, (first, count) in enumerate(shard_ranges(study, opts)):
            rel = f"shards/{study.id}-{k:04d}.h5"
            w = ShardWriter(out / rel, _arrays(study, count), opts.compression,
                            _shard_attrs(study, pending, first, count, opts), _pool(opts))
            writers.append(w)
            _fill_shard(study, readers, w, first, count, report, digests)
            w.finish()  # closed until the checksums are known: memory stays flat in the file size
            shards.append((rel, first, count))
        sums = {}
        for role in pending:
            if role in digests:
                readers[role].digest_rest(digests[role])
                sums[role] = digests[role].hexdigest()
            else:  # a mask of one slice or one per plane: a small file, hashed on its own
                sums[role] = sha256_file(study.specs[role].data_path)
        infos = [w.commit(_shard_attrs(study, sums, first, count, opts))
                 for w, (_, first, count) in zip(writers, shards, strict=True)]
    finally:
        for w in writers:
            w.__exit__(None, None, None)  # removes the temporary of a shard that was not committed
        for lane in digests.values():
            lane.close()
    entries = [{"path": rel, "first_slice": first, "num_slices": count, "sha256": info["sha256"],
                "bytes": info["bytes"], "max": info["max"].get("target", 0.0)}
               for (rel, first, count), info in zip(shards, infos, strict=True)]
    return study_entry(study, sums, entries)


def study_entry(study: Study, sums: dict[str, str], shards: list[dict]) -> dict:
    t = study.target
    vmax = max(sh.pop("max") for sh in shards)
    entry = {"id": study.id, "source": str(t.source.resolve()), "kind": t.kind, "sha256": sums["target"],
             "num_slices": t.num_slices, "slice_shape": list(t.slice_shape), "dtype": t.dtype.newbyteorder("=").name,
             "tof_bins": t.tof_bins, "segments": list(t.segments), "axial_counts": list(t.axial_counts),
             "ring_diffs": [list(r) for r in t.ring_diffs] if t.ring_diffs else None,
             "has_input": study.input is not None, "has_mask": study.mask is not None,
             **{f"has_{role}": True for role, _ in study.truth},
             "has_delayed": study.delayed is not None,
             "scanner": t.scanner or t.fields.get("originating system", ""), "max": vmax, "shards": shards}
    for role in ("input", "mask", *TRUTH):
        if role in sums:
            entry[f"{role}_source"] = str(study.specs[role].source.resolve())
            entry[f"{role}_sha256"] = sums[role]
    return entry


def write_manifest(out: Path, entries: list[dict], options: dict) -> Path:
    scanners = {e["scanner"] for e in entries}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"hpc {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "options": options,
        "slice_shape": entries[0]["slice_shape"], "dtype": entries[0]["dtype"],
        "scanner": scanners.pop() if len(scanners) == 1 else "",
        "scale": max(e["max"] for e in entries),
        "num_slices": sum(e["num_slices"] for e in entries),
        "studies": entries, "shards": [s["path"] for e in entries for s in e["shards"]],
    }
    listed = set(manifest["shards"])
    for f in (out / "shards").glob("*.h5"):  # shards of an earlier run that this one does not use
        if f"shards/{f.name}" not in listed and is_hpc_shard(f):
            f.unlink()
    return atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")


def balance(sizes: list[int], parts: int) -> list[list[int]]:
    """Split items into ``parts`` lists of similar total size (largest first, to the lightest)."""
    load, groups = [0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        j = load.index(min(load))
        groups[j].append(i)
        load[j] += sizes[i]
    return [sorted(g) for g in groups]




def _options(args: argparse.Namespace) -> dict:
    raw = {"shape": args.shape, "dtype": args.dtype, "endian": args.endian, "offset": args.offset}
    return {"compression": args.compression, "shard_slices": args.shard_slices, "shard_mb": args.shard_mb,
            "raw": raw if args.shape else None}


def _progress(studies: list[Study], quiet: bool, desc: str) -> Progress:
    n = sum(s.target.num_slices for s in studies)
    per_slice = sum(s.nbytes for s in studies) // max(n, 1)
    return Progress(total=n, unit="slices", desc=desc, bytes_per_unit=per_slice, enabled=not quiet)


def _summary(out: Path, entries: list[dict], seconds: float) -> str:
    slices = sum(e["num_slices"] for e in entries)
    shards = sum(len(e["shards"]) for e in entries)
    mb = sum(s["bytes"] for e in entries for s in e["shards"]) / 1e6
    return (f"{out}: {len(entries)} studies, {slices} slices, {shards} shards, {mb:.1f} MB "
            f"in {seconds:.1f} s")


def _attempt(fn: Callable[[], object]) -> tuple[object, str | None]:
    try:
        return fn(), None
    except HpcError as exc:
        return None, str(exc)


def _run_mpi(studies: list[Study], out: Path, opts: Options, args: argparse.Namespace) -> int:
    """Ranks split the studies (balanced by size); rank 0 checks the output first and writes the
    manifest after everyone is done. Every rank reaches every collective, even after an error."""
    from mpi4py import MPI

    comm, t0 = MPI.COMM_WORLD, time.perf_counter()
    rank, size = comm.Get_rank(), comm.Get_size()
    error = _attempt(lambda: prepare_output(out, args.resume, args.overwrite))[1] if rank == 0 else None
    error = comm.bcast(error, root=0)
    result: tuple[object, str | None] = ({}, error)
    if error is None:
        mine = balance([s.nbytes for s in studies], size)[rank]
        with _progress([studies[i] for i in mine], args.quiet or rank != 0, f"convert rank {rank}/{size}") as bar:
            result = _attempt(lambda: {i: convert_study(studies[i], out, opts, bar.update) for i in mine})
    results = comm.gather(result, root=0)  # the barrier: rank 0 goes on once every rank is done
    error = None
    if rank == 0:
        error = next((e for _, e in results if e), None)
        if error is None:
            merged = {i: entry for done, _ in results for i, entry in done.items()}
            entries = [merged[i] for i in range(len(studies))]
            error = _attempt(lambda: write_manifest(out, entries, _options(args)))[1]
        if error is None:
            print(_summary(out, entries, time.perf_counter() - t0), flush=True)
    error = comm.bcast(error, root=0)
    if error is not None and rank == 0:
        raise HpcError(error)
    return 0 if error is None else HpcError.exit_code


class Interrupt:
    """Ctrl-C (SIGINT) only sets a flag; ``check()``, called between slabs and while waiting for
    workers, raises KeyboardInterrupt (exit 130 from the CLI) from ordinary code. Raised from the
    handler itself it could land inside a weakref or h5py callback, where Python prints "Exception
    ignored" and carries on (the conversion then finished with exit 0), or between an mmap's views
    and its close (BufferError). A second Ctrl-C raises at once."""

    def __enter__(self) -> Interrupt:
        self.hit = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def check(self) -> None:
        if self.hit:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)


def run(args: argparse.Namespace) -> int:
    if args.shard_slices < 0 or args.shard_mb <= 0 or args.workers < 1 or args.processes < 1:
        raise InputError("--shard-slices must be >= 0, --shard-mb > 0, --workers and --processes >= 1")
    out = Path(args.output)
    opts = Options(args.compression, args.shard_slices, args.shard_mb, args.resume, args.workers)
    world = mpi_world()  # under mpirun: ranks split the studies (a plain run never imports MPI)
    rank, size = (world.rank, world.world) if world else (0, 1)
    try:
        studies = plan(args)  # every rank parses the headers: cheap, and the same everywhere
    except HpcError:
        if rank != 0:
            return HpcError.exit_code  # rank 0 prints the one error line
        raise
    if size > 1:
        return _run_mpi(studies, out, opts, args)
    t0 = time.perf_counter()
    prepare_output(out, args.resume, args.overwrite)
    with Interrupt() as stop, _progress(studies, args.quiet, "convert") as bar:
        def report(n: int) -> None:  # after every slab
            stop.check()
            bar.update(n)

        if args.processes > 1:
            from hpc.convert_pool import run_pool

            entries = run_pool(studies, out, opts, args.processes, bar, stop.check)
        else:
            entries = [convert_study(s, out, opts, report) for s in studies]
        stop.check()  # never a manifest after Ctrl-C
        write_manifest(out, entries, _options(args))
    print(_summary(out, entries, time.perf_counter() - t0), flush=True)
    return 0
