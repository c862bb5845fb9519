"""Convert raw / Interfile sinograms into chunked HDF5 shards (shard format v2, docs/FORMAT.md).

Inputs are Interfile headers (STIR `.hs`, Siemens `.s.hdr`/`.mhdr`) or, with --shape/--dtype, raw
files. Each input file is one study; --input/--mask add a paired acquisition and a gap mask to the
study at the same position, --expected/--randoms/--mult its noise-free expected counts, randoms and
multiplicative factors (float32; hpc simulate writes them). A Siemens list-mode header (.l.hdr)
is histogrammed into one study per --frames frame, its delayeds stored as `delayed` and the randoms
estimated from them; --norm/--mu-map add `mult` (hpc.convert.listmode). Shards appear atomically (temporary
name, verified, renamed); manifest.json is written last, so a dataset is complete once it exists.
--resume keeps the shards whose checksums verify and redoes the rest. Under `mpirun -np N` the ranks split the files.
This module is the command: arguments, the checks of every file, the output directory, the manifest,
MPI and Ctrl-C; the work per study, shard and slab is hpc.convert.study.

examples:
  hpc convert scans/*.s.hdr -o data/scans
  hpc convert big.s.hdr -o data/big --workers 8                         # 8 compressing threads
  hpc convert full1.hs full2.hs --input low1.hs low2.hs --mask gap1.s.hdr gap2.s.hdr -o data/paired
  hpc convert study.raw --shape 1,837,252,344 --dtype uint16 --endian big -o data/raw
  mpirun -np 4 hpc convert scans/*.s.hdr -o data/scans --resume
  hpc convert scan.l.hdr -o data/lm --frames 0:60,60:300 --norm scan.n.hdr --mu-map mu.hv   # list mode
  hpc convert scan.s.hdr -o data/s --norm scan.n.hdr --mu-map mu.hv     # + mult for a sinogram
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

from hpc import __version__
from hpc.convert import listmode as LM
from hpc.convert.pool import available_cores, run_pool
from hpc.convert.study import TMP_NAME, Options, Study, convert_study, sweep_temporaries
from hpc.distributed.launcher import mpi_world
from hpc.errors import HpcError, InputError, OutputError
from hpc.io.atomic import atomic_write_text, output_error
from hpc.io.dirlock import DirLock, remove_empty
from hpc.io.h5write import COMPRESSIONS, DEFAULT_COMPRESSION
from hpc.io.headers import read_header
from hpc.io.regular import read_bounded
from hpc.io.shards import FORMAT, FORMAT_VERSION, TRUTH
from hpc.io.spec import SinogramSpec, parse_raw_shape, raw_spec
from hpc.progress import Progress


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
    LM.add_arguments(p)  # list mode, --norm, --mu-map


def _open_source(path: str, args: argparse.Namespace) -> SinogramSpec:
    if not args.shape:
        return read_header(path)
    shape = parse_raw_shape(args.shape, args.dtype, str(path), "1,837,252,344")
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
        if LM.is_listmode(src, args):  # one study per time frame, staged before converting
            studies += LM.listmode_studies(src, k, args, taken)
            continue
        target = _open_source(src, args)
        specs = {role: _open_source(files[k], args) for role, files in extra.items() if files}
        for role, spec in specs.items():
            _check_pair(target, spec, role)
        truth = tuple((role, specs[role]) for role in TRUTH if role in specs)
        study = Study(_study_id(Path(src), taken), target, specs.get("input"), specs.get("mask"), truth)
        studies.append(LM.with_factors(study, k, args, taken))  # + `mult` from --norm/--mu-map
    first = studies[0].target
    for s in studies[1:]:
        same_dtype = s.target.dtype.newbyteorder("=") == first.dtype.newbyteorder("=")
        if s.target.slice_shape != first.slice_shape or not same_dtype:
            raise InputError(f"{s.target.source}: slices {s.target.slice_shape} {s.target.dtype.name} differ from "
                             f"{first.source} ({first.slice_shape} {first.dtype.name}); "
                             "convert them into separate datasets")
    return studies


MARKER = ".hpc-dataset"  # written first into every output directory: "this tool writes here"
LOCK = ".hpc-convert.lock"  # held while a convert writes the directory (hpc.io.dirlock)


def _regular(path: Path) -> bool:
    """A regular file by that name itself (not a link to one)."""
    return path.is_file() and not path.is_symlink()


def is_ours(out: Path) -> bool:
    """A directory hpc convert wrote: its marker, or (older datasets) an hpc manifest.json."""
    if _regular(out / MARKER):
        return True
    try:
        manifest = read_bounded(out / "manifest.json", "manifest", 256 << 20, follow=False)
        return json.loads(manifest).get("format") == FORMAT
    except (HpcError, ValueError, AttributeError):
        return False


def _contents(out: Path) -> list[Path]:
    """What the directory holds, but the lock (and the lock's passing temporary and stale names)."""
    return [p for p in out.iterdir() if LOCK not in p.name] if out.is_dir() else []


def is_hpc_shard(path: Path) -> bool:
    """An HDF5 file this tool wrote (root attribute format = hpc-sinogram): the only .h5 files
    --overwrite and a smaller re-conversion may delete."""
    from hpc.io.shards import open_shard  # late: h5py

    try:
        with open_shard(path) as f:  # a FIFO named x.h5 is not waited on
            return f.attrs.get("format") == FORMAT
    except (OSError, HpcError):
        return False


def prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty directory unless resuming/overwriting a dataset this tool wrote (a user's
    own files are never deleted); hide any old manifest first, so the directory is never a valid
    dataset while shards change."""
    try:
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: exists and is not a directory")
        shards = out / "shards"
        if shards.is_symlink() or (shards.exists() and not shards.is_dir()):  # --overwrite would delete there
            raise OutputError(f"{shards}: not a directory of its own (a symbolic link or a file); refusing to "
                              "write or delete shards there (nothing changed)")
        if _contents(out):
            if not (resume or overwrite):
                raise OutputError(f"{out}: output directory is not empty (use --resume to continue or "
                                  "--overwrite to replace)")
            if not is_ours(out):  # the user's own directory: never resume into it, never replace their files
                clash = [p.name for p in (out / "manifest.json", out / "shards") if p.exists()]
                if resume or clash:
                    raise OutputError(f"{out}: not a dataset written by hpc convert (no {MARKER} or hpc "
                                      f"manifest.json){' and it has ' + clash[0] if clash else ''}; refusing to "
                                      f"{'resume' if resume else 'overwrite'} into it (nothing changed)")
        shards.mkdir(parents=True, exist_ok=True)
        if not _regular(out / MARKER):
            atomic_write_text(out / MARKER, json.dumps({"created_by": f"hpc {__version__}", "format": FORMAT}) + "\n")
        (out / "manifest.json").unlink(missing_ok=True)
        for f in shards.iterdir():  # temporary shards of a killed run go; --overwrite also drops finished ones
            if TMP_NAME.match(f.name) or (overwrite and f.suffix == ".h5" and is_hpc_shard(f)):
                f.unlink()
    except OSError as exc:
        raise output_error(out, exc, "nothing converted") or \
            OutputError(f"{out}: cannot write the dataset: {exc.strerror or exc}") from None


class Claim:
    """The output directory, held for one convert: the lock (concurrent converts of one dataset,
    --overwrite included, would delete each other's shards), then ``prepare_output``. ``close(ok)``
    releases it; after a failure in a directory that held nothing of a dataset before, the
    skeleton goes too (marker, empty shards/, the directories the lock created), unless finished
    shards are there to --resume."""

    def __init__(self, out: Path, resume: bool, overwrite: bool):
        self.out, self.resume, self.overwrite = out, resume, overwrite
        self.lock = DirLock(out, LOCK, "hpc convert", "dataset directory")
        self.lock.conflict = "two would delete each other's shards"
        self.fresh = False

    def open(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"{self.out}: exists and is not a directory")
        self.lock.acquire()
        try:
            self.fresh = not _contents(self.out)
            prepare_output(self.out, self.resume, self.overwrite)
        except BaseException:
            self.close(ok=False)
            raise

    def close(self, ok: bool) -> None:
        if not self.lock.held:
            return
        if not ok and self.fresh:
            sweep_temporaries(self.out)
            shards = self.out / "shards"
            finished = shards.is_dir() and any(shards.iterdir())
            with contextlib.suppress(OSError):
                if not finished:
                    (self.out / MARKER).unlink(missing_ok=True)
                    shards.rmdir()
        self.lock.release()
        if not ok and self.fresh:
            remove_empty(self.lock.created)

    def __enter__(self) -> Claim:
        self.open()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.close(ok=kind is None)


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
    claim = Claim(out, args.resume, args.overwrite)
    error = _attempt(claim.open)[1] if rank == 0 else None
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
        claim.close(ok=error is None)
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
    with Claim(out, args.resume, args.overwrite), Interrupt() as stop, \
            _progress(studies, args.quiet, "convert") as bar:
        def report(n: int) -> None:  # after every slab
            stop.check()
            bar.update(n)

        staging = LM.Staging(out, args.resume, args.quiet)
        studies = staging.run(studies, stop.check)  # list-mode frames and --norm/--mu-map factors, as files
        if args.processes > 1:
            entries = run_pool(studies, out, opts, args.processes, bar, stop.check)
        else:
            entries = [convert_study(s, out, opts, report) for s in studies]
        stop.check()  # never a manifest after Ctrl-C
        write_manifest(out, staging.provenance(entries), _options(args))
        staging.finish()
    print(_summary(out, entries, time.perf_counter() - t0), flush=True)
    return 0
