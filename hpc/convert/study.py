"""One study -> its shards (``hpc convert``'s work per file, shard and slab).

A :class:`Study` (a target file plus its paired input, mask, truth and the delayed coincidences of
its own file) is read slab by slab (``SLAB_BYTES``: memory stays flat whatever the file size) and
written into shards by :class:`hpc.io.h5write.ShardWriter`, chunks encoded by this process's
threads (``Options.workers``). ``convert_study`` reads each source once, its SHA-256 fed by the
same reads; ``convert_shard`` writes (or, with --resume, reuses) one shard, the unit the
``--processes`` pool (hpc.convert.pool) hands out. The command line, the output directory, MPI and
the manifest are hpc.convert.convert.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc.errors import InputError
from hpc.io.chunks import HashLane
from hpc.io.h5write import ShardWriter
from hpc.io.shards import FORMAT, FORMAT_VERSION, TRUTH, verify_shard
from hpc.io.sinogram import MaskReader, SinogramReader
from hpc.io.spec import SinogramSpec

SLAB_BYTES = 8 << 20  # read/write a few slices at a time: memory stays flat whatever the file size
HEADER_ATTRS = ("originating system", "pet data type", "tof mashing factor", "isotope name",
                "image duration (sec)", "scanner type", "applied corrections")
Report = Callable[[int], None]  # called with the number of slices just converted

# `scan data type description` of a Siemens file's second data set: randoms measured as delayed coincidences
DELAYED_NAMES = ("randoms", "delayed", "delays")
TMP_NAME = re.compile(r"^\..+\.h5(\.[0-9a-f]{16})?\.tmp$")  # the atomic writer's temporary shards


def sweep_temporaries(out: Path) -> None:
    """Remove the hidden temporary shards left by workers that were stopped (interrupt, error)."""
    with contextlib.suppress(OSError):
        for f in (out / "shards").iterdir():
            if TMP_NAME.match(f.name):
                f.unlink(missing_ok=True)


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
