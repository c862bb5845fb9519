"""Shard format v2 (v1 read): HDF5 shards of sinogram slices plus ``manifest.json`` (spec in docs/FORMAT.md).

Writing: :class:`ShardWriter` fills a hidden temporary file slab by slab, records a SHA-256 of every
dataset's values, re-reads and verifies it, then renames it into place. Reading:
:meth:`Dataset.open` parses the manifest; :func:`verify_shard` re-checks the checksums.

    ds = Dataset.open("data/demo")
    ds.studies[0].shards[0].path, ds.slice_shape, ds.scale
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import h5py
import hdf5plugin  # noqa: F401  (registers the blosc filter for reading and writing)
import numpy as np

from hpc.errors import InputError, OutputError
from hpc.io.atomic import AtomicFile, output_error
from hpc.io.chunks import ChunkCodec, HashLane, digest

FORMAT = "hpc-sinogram"
FORMAT_VERSION = 2  # 2: STIR segment numbers for Siemens sources too, ring differences, optional
READABLE_VERSIONS = (1, 2)  # `randoms`, float32 measured-fraction masks (docs/FORMAT.md)
# blosc*: hdf5plugin's Blosc filter (readers need `import hdf5plugin`): blosc = lz4 + byte shuffle,
# blosc-bitshuffle = lz4 + bit shuffle, blosc-zstd = zstd level 1 + bit shuffle. The default is
# chosen by measurement on Poisson counts (bench/codecs.py, docs/BENCHMARKS.md).
COMPRESSIONS = ("none", "lzf", "gzip", "blosc", "blosc-bitshuffle", "blosc-zstd")
DEFAULT_COMPRESSION = "blosc"
# Optional float32 (N, V, X) datasets with the noise-free truth and the physics of a study, when known
# (hpc simulate writes them; hpc convert --expected/--randoms/--mult): expected counts of the target,
# the randoms part of them, the multiplicative factors (efficiencies x attenuation).
TRUTH = ("expected", "randoms", "mult")
DATASETS = ("target", "input", "mask", "delayed", *TRUTH, "tof", "segment", "axial")


def compression_kwargs(name: str) -> dict:
    """h5py ``create_dataset`` keywords for a compression name."""
    if name == "none":
        return {}
    if name == "lzf":
        return {"compression": "lzf"}
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    if name == "blosc":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    if name == "blosc-bitshuffle":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.BITSHUFFLE))
    if name == "blosc-zstd":
        return dict(hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.BITSHUFFLE))
    raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {name!r}")


def dataset_kwargs(shape: tuple[int, ...], compression: str) -> dict:
    """h5py ``create_dataset`` keywords of a shard dataset of ``shape``: per-slice arrays
    ``(N, V, X)`` are chunked one slice per chunk, compressed, then checksummed by HDF5's fletcher32 (of the
    compressed bytes; verified by HDF5 on every read of the chunk); other arrays are contiguous."""
    if len(shape) != 3:
        return {}
    return {"chunks": (1, *shape[1:]), "fletcher32": True, **compression_kwargs(compression)}


def fletcher32(data: bytes) -> bytes:
    """HDF5's Fletcher-32 of ``data`` as its filter stores it after a chunk (4 bytes): for writers
    that bypass the filter pipeline (``write_direct_chunk``) and must append it themselves.
    16-bit big-endian words (an odd last byte is the high byte of a final word), both sums kept
    modulo 65535 with 0xFFFF in place of 0 for non-zero data, ``sum2 << 16 | sum1`` little-endian."""
    a = np.frombuffer(data, np.uint8)
    if a.size % 2:
        a = np.concatenate([a, np.zeros(1, np.uint8)])
    words = (a[0::2].astype(np.uint64) << np.uint64(8)) | a[1::2].astype(np.uint64)  # (n,)
    n = words.size
    s1 = int(words.sum())
    s2 = int((words * (np.uint64(n) - np.arange(n, dtype=np.uint64))).sum()) if n else 0  # word i counts n-i times
    fold = lambda x: 0 if x == 0 else (x - 1) % 65535 + 1  # noqa: E731  (HDF5 never folds a non-zero sum to 0)
    return int(fold(s2) << 16 | fold(s1)).to_bytes(4, "little")
class _Done:
    """A finished result with a future's ``result()`` (encoding without a pool)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _le(a: np.ndarray) -> np.ndarray:
    """C-contiguous little-endian copy-or-view: the bytes the checksums are defined on."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


class ShardWriter:
    """Write one shard (slices of one study) in slabs to a temporary file, then
    verify and rename. ``arrays`` maps dataset name -> (shape, dtype); ``attrs`` are root
    attributes. Leaving the ``with`` block without ``commit()`` removes the temporary file.

    How a shard is made (what another writer must reproduce, see FORMAT.md): per-slice datasets
    ``(N, V, X)`` get chunks ``(1, V, X)`` and the filter pipeline compression then fletcher32
    (``dataset_kwargs``: h5py adds the checksum last), so each stored chunk is the compressed bytes
    plus the Fletcher-32 of those bytes; ``(V, X)`` masks and ``(N,)`` metadata are contiguous (no
    filters); every dataset's ``sha256`` attribute is of its whole little-endian values.

    Slices of datasets whose filters hpc.io.chunks implements are encoded by ``pool``'s threads and
    written with ``write_direct_chunk`` (the bytes HDF5's own pipeline would store); each chunk's
    xxh3 digest is kept, and after closing, the file's raw chunks are read back and compared with
    them: the verification reads the compressed bytes once and decompresses nothing. Datasets
    without such a codec (lzf) go through h5py and are verified by their values' SHA-256."""

    def __init__(self, path: Path, arrays: dict[str, tuple[tuple[int, ...], np.dtype]],
                 compression: str, attrs: dict, pool: ThreadPoolExecutor | None = None):
        self.path = Path(path)
        self._hash = {name: hashlib.sha256() for name in arrays}
        self._max: dict[str, float] = {}
        self._file = None
        self._out = AtomicFile(self.path)
        try:
            # No chunk cache: each slice is one whole chunk, written once, so caching gains nothing,
            # and a write error (disk full) surfaces in write() instead of at some later close.
            self._file = h5py.File(self._out.path, "w", rdcc_nbytes=0)
            for name, (shape, dtype) in arrays.items():
                self._file.create_dataset(name, shape, np.dtype(dtype).newbyteorder("<"), track_times=False,
                                          **dataset_kwargs(shape, compression))
        except OSError as exc:
            self._fail(exc)
        self._codecs = {name: codec for name, d in self._file.items()
                        if d.ndim == 3 and (codec := ChunkCodec.for_dataset(d)) is not None}
        self._digests: dict[str, list] = {name: [None] * self._file[name].shape[0] for name in self._codecs}
        self._ids = {name: d.id for name, d in self._file.items()}  # h5py's group lookup is slow per chunk
        self._dsets = {name: self._file[name] for name in arrays}  # ... and per slab (0.6 s per GB converted)
        self._dtypes = {name: d.dtype for name, d in self._dsets.items()}
        # (N,) metadata gathered here and written once by finish(): a tiny h5py write per slab cost
        # more than the slab's chunks
        self._small = {name: np.zeros(d.shape, d.dtype) for name, d in self._dsets.items() if d.ndim == 1}
        # the slice datasets' SHA-256s run in their own threads (hashlib releases the GIL)
        self._hash = {name: HashLane(h) if self._file[name].ndim == 3 else h for name, h in self._hash.items()}
        self._pending: list = []  # (dataset, slice, future) encoded, not yet written
        self._maxes: list = []  # (dataset, future of a slab's maximum)
        self._pool = pool  # the caller's threads (None: encode in this thread)
        self._attrs = dict(attrs)  # written by commit(): the same bytes whenever their values are known
        self._sums: dict[str, str] | None = None  # set by finish()

    @property
    def tmp(self) -> Path:
        """The temporary file's real name (hidden, random, in the shard's directory)."""
        return self._out.tmp

    def write(self, start: int, **slabs: np.ndarray) -> None:
        """``write(k, target=(n, V, X), tof=(n,), ...)``: slices ``[k, k+n)`` of the named datasets.
        Slabs must arrive in order (the checksums are computed as they stream). A dataset without
        a slice axis (a ``(V, X)`` mask) is written whole with ``start=0``."""
        try:
            self._drain()  # the previous slab's chunks: encoded meanwhile by the pool
            for name, slab in slabs.items():
                slab = np.ascontiguousarray(slab, dtype=self._dtypes[name])  # hash what is stored
                if name in self._codecs:
                    codec = self._codecs[name]
                    for i, one in enumerate(slab):
                        job = (self._pool.submit(codec.encode, one) if self._pool else _Done(codec.encode(one)))
                        self._pending.append((name, start + i, job))
                elif name in self._small:
                    self._small[name][start:start + len(slab)] = slab
                elif slab.ndim == 2:  # a (V, X) mask shared by all slices
                    self._dsets[name][...] = slab
                else:
                    self._dsets[name][start:start + len(slab)] = slab
                self._hash[name].update(slab)
                if name in ("target", "input") and slab.size:  # (in a pool thread when there is one)
                    self._maxes.append((name, self._pool.submit(slab.max) if self._pool else _Done(slab.max())))
        except OSError as exc:
            self._fail(exc)

    def _drain(self) -> None:
        """Write the encoded chunks in order (h5py calls stay in this thread)."""
        for name, job in self._maxes:
            self._max[name] = max(self._max.get(name, -np.inf), float(job.result()))
        self._maxes = []
        for name, k, job in self._pending:
            mask, chunk = job.result()
            self._ids[name].write_direct_chunk((k, 0, 0), chunk, filter_mask=mask)
            self._digests[name][k] = (mask, len(chunk), digest(chunk))
        self._pending = []

    def _verify_chunks(self) -> tuple[bool, str]:
        """The closed file's stored chunks against the digests of what was written; other datasets
        by their values' SHA-256 (verify_shard)."""
        try:
            with h5py.File(self._out.path, "r") as f:
                for name, want in self._digests.items():
                    dset = f[name]
                    for k, (mask, size, dig) in enumerate(want):
                        got_mask, chunk = dset.id.read_direct_chunk((k, 0, 0))
                        if (got_mask, len(chunk), digest(chunk)) != (mask, size, dig):
                            return False, f"dataset {name!r}: chunk {k} differs from what was written"
        except (OSError, KeyError, TypeError) as exc:
            return False, f"unreadable: {exc}"
        return verify_shard(self._out.path, skip=set(self._digests))

    def finish(self) -> None:
        """Every slice is written: the datasets' checksum and maximum attributes, then the file is
        closed (its HDF5 memory goes). A converter that learns the root attributes later (the
        source's checksum) keeps many finished shards without holding them open."""
        if self._sums is not None:
            return
        try:
            self._drain()
            for name, values in self._small.items():
                self._dsets[name][...] = values
            self._sums = {name: h.hexdigest() for name, h in self._hash.items()}
            for name, value in self._sums.items():
                self._file[name].attrs["sha256"] = value
                if name in self._max:
                    self._file[name].attrs["max"] = self._max[name]
            self._file.close()
        except OSError as exc:
            self._fail(exc)

    def commit(self, attrs: dict | None = None) -> dict:
        """Finish, add the root attributes (``attrs``: those known only now), verify, rename.
        Returns {"sha256": {name: hex}, "max": {name: value}, "bytes": n}."""
        self.finish()
        try:
            with h5py.File(self._out.path, "r+") as f:  # the same steps whenever the values are known
                for key, value in {**self._attrs, **(attrs or {})}.items():
                    f.attrs[key] = value
        except OSError as exc:
            self._fail(exc)
        ok, why = self._verify_chunks()
        if not ok:
            self.abort()
            raise OutputError(f"{self.path}: verification after writing failed: {why}")
        self._out.commit()
        return {"sha256": self._sums, "max": dict(self._max), "bytes": self.path.stat().st_size}

    def _fail(self, exc: OSError) -> None:
        self.abort()
        raise output_error(self.path, exc, "shard not written") or \
            OutputError(f"{self.path}: cannot write shard: {str(exc).splitlines()[0]}") from None

    def abort(self) -> None:
        for h in getattr(self, "_hash", {}).values():
            if isinstance(h, HashLane):
                h.close()
        for _, _, job in getattr(self, "_pending", []):
            if hasattr(job, "cancel"):
                job.cancel()
        self._pending = []
        if self._file is not None and self._file.id.valid:
            # Empty the file first: on a full disk HDF5's closing flush would fail again and
            # print tracebacks; with the space freed it closes cleanly, then the file goes.
            with contextlib.suppress(OSError):
                os.ftruncate(self._out.fd, 0)
            with contextlib.suppress(Exception):
                self._file.close()
        self._out.abort()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


def corrupt_reason(exc: OSError, dset) -> str:
    """Why a chunk failed to read. HDF5 reports every filter failure alike ("filter returned
    failure during read"); fletcher32 is the first filter on the read path, so in a dataset that has
    it a failing filter is a checksum mismatch."""
    text = str(exc)
    if "filter" in text.lower() or "fletcher32" in text.lower():
        if dset.fletcher32:
            return "checksum mismatch (fletcher32): its bytes on disk changed"
        return "cannot be decoded (corrupt compressed chunk)"
    return f"unreadable ({text.splitlines()[0][:120] if text else type(exc).__name__})"


def read_slab(dset, lo: int, hi: int, path: str | os.PathLike, first_slice: int = 0) -> np.ndarray:
    """``dset[lo:hi]`` of a shard dataset; a chunk that fails its fletcher32 checksum or does not
    decode is an InputError naming the shard, the dataset and the slice (and the slice within its
    study, ``first_slice + k``). Finding the slice rereads one chunk at a time, only after a failure."""
    try:
        return dset[lo:hi]
    except OSError as exc:
        reason, bad = corrupt_reason(exc, dset), lo
        for k in range(lo, hi):
            try:
                dset[k]
            except OSError:
                bad = k
                break
        raise InputError(f"{path}: dataset {dset.name.lstrip('/')!r} slice {bad} (study slice {first_slice + bad}) "
                         f"{reason}; restore the shard or convert again") from None


def open_shard(path: str | os.PathLike):
    """An h5py File open for reading; a file that is not HDF5 (or is damaged) is an InputError."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise InputError(f"{path}: shard not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot open shard: {str(exc).splitlines()[0][:160]}") from None


def verify_shard(path: str | os.PathLike, slab: int = 64, skip: set[str] = frozenset()) -> tuple[bool, str]:
    """Re-read every dataset (but ``skip``) and compare with its stored ``sha256``. Returns (ok, problem)."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                return False, f"not an {FORMAT} shard"
            for name, dset in f.items():
                if name in skip:
                    continue
                want = dset.attrs.get("sha256")
                if want is None:
                    return False, f"dataset {name!r} has no sha256"
                h = hashlib.sha256()
                if dset.ndim == 3:  # bounded memory for big shards
                    for k in range(0, len(dset), slab):
                        h.update(_le(read_slab(dset, k, min(k + slab, len(dset)), path)))
                else:
                    h.update(_le(dset[()]))
                if h.hexdigest() != want:
                    return False, f"dataset {name!r}: checksum mismatch"  # of its values (sha256)
    except InputError as exc:
        return False, str(exc).removeprefix(f"{path}: ")
    except (OSError, KeyError) as exc:
        return False, f"unreadable: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}"
    return True, ""


@dataclass(frozen=True)
class ShardInfo:
    path: Path  # absolute
    first_slice: int  # index of the shard's first slice within its study
    num_slices: int
    sha256: dict  # dataset name -> hex digest of its little-endian values


@dataclass(frozen=True)
class StudyInfo:
    id: str
    source: str
    sha256: str  # of the source data file
    num_slices: int
    slice_shape: tuple[int, int]
    dtype: str
    shards: tuple[ShardInfo, ...]
    has_input: bool
    has_mask: bool
    scanner: str  # the header's `originating system`, "" if unknown
    max: float  # largest target value of the study
    tof_bins: int
    segments: tuple[int, ...]  # STIR segment numbers in storage order
    axial_counts: tuple[int, ...]
    truth: tuple[str, ...] = ()  # which of TRUTH the study stores
    ring_diffs: tuple[tuple[int, int], ...] | None = None  # (min, max) per segment when the source stated them
    has_delayed: bool = False  # `delayed`: a Siemens file's second data set (randoms = delayed coincidences)

    def layout(self, scanner: str = ""):
        """The study's :class:`hpc.projdata.Layout` on ``scanner`` (default: its own); ValueError if
        the scanner is unknown or cannot have this layout."""
        from hpc.projdata import layout_for
        return layout_for(scanner or self.scanner, self.segments, self.axial_counts, *self.slice_shape,
                          self.tof_bins, self.ring_diffs)

    @property
    def shard_paths(self) -> list[Path]:
        return [s.path for s in self.shards]

    @property
    def slice_counts(self) -> list[int]:
        return [s.num_slices for s in self.shards]

    def locate(self, index: int) -> tuple[ShardInfo, int]:
        """Shard holding the study's slice ``index`` and the position within it."""
        for shard in self.shards:
            if shard.first_slice <= index < shard.first_slice + shard.num_slices:
                return shard, index - shard.first_slice
        raise IndexError(f"study {self.id}: slice {index} outside [0, {self.num_slices})")


@dataclass(frozen=True)
class Dataset:
    root: Path
    studies: tuple[StudyInfo, ...]
    slice_shape: tuple[int, int]
    dtype: str
    scanner: str  # common `originating system` of the studies ("" if unknown or mixed)
    scale: float  # dataset-wide max target value (for normalization)
    manifest: dict

    @property
    def num_slices(self) -> int:
        return sum(s.num_slices for s in self.studies)

    def study(self, study_id: str) -> StudyInfo:
        for s in self.studies:
            if s.id == study_id:
                return s
        raise InputError(f"{self.root}: no study {study_id!r} (have {', '.join(s.id for s in self.studies)})")

    @classmethod
    def open(cls, root: str | os.PathLike) -> Dataset:
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise InputError(f"{root}: not a converted dataset (no manifest.json; run `hpc convert`)")
        try:
            m = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: invalid JSON: {exc}") from None
        if m.get("format") != FORMAT or m.get("format_version") not in READABLE_VERSIONS:
            raise InputError(f"{path}: expected format {FORMAT} v{' or v'.join(map(str, READABLE_VERSIONS))}, "
                             f"got {m.get('format')} v{m.get('format_version')}")
        try:
            studies = tuple(_study(root, s) for s in m["studies"])
            return cls(root, studies, tuple(m["slice_shape"]), m["dtype"], m.get("scanner", ""),
                       float(m["scale"]), m)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: malformed manifest ({exc!r})") from None


STUDY_ID = re.compile(r"[A-Za-z0-9._-]+")  # what convert writes (no "/"): ids become output file names


def shard_path(root: Path, rel: str) -> Path:
    """``root / rel`` for a manifest's shard path, which must stay inside the dataset directory:
    relative, no ``..`` (a manifest must not make hpc open ``/etc/passwd`` or another dataset)."""
    p = PurePosixPath(rel) if isinstance(rel, str) else None
    if p is None or not p.parts or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise InputError(f"{root / 'manifest.json'}: shard path {rel!r} is outside the dataset directory")
    return root / p


def _study(root: Path, s: dict) -> StudyInfo:
    if not isinstance(s["id"], str) or not STUDY_ID.fullmatch(s["id"]) or s["id"] in (".", ".."):
        raise InputError(f"{root / 'manifest.json'}: study id {s['id']!r} is not a plain name "
                         "(letters, digits, . _ -)")
    shards = tuple(ShardInfo(shard_path(root, sh["path"]), sh["first_slice"], sh["num_slices"], sh["sha256"])
                   for sh in s["shards"])
    segments = tuple(s["segments"])
    if s.get("kind") == "siemens" and "ring_diffs" not in s:  # v1: a Siemens file's storage indices
        from hpc.projdata import segment_storage_order
        segments = segment_storage_order(len(segments))
    rd = s.get("ring_diffs")
    return StudyInfo(s["id"], s["source"], s["sha256"], s["num_slices"], tuple(s["slice_shape"]),
                     s["dtype"], shards, s["has_input"], s["has_mask"], s.get("scanner", ""),
                     float(s["max"]), s["tof_bins"], segments, tuple(s["axial_counts"]),
                     tuple(r for r in TRUTH if s.get(f"has_{r}")), tuple(tuple(r) for r in rd) if rd else None,
                     bool(s.get("has_delayed", False)))


class ShardArray:
    """One array ('target', 'input', 'mask' or one of TRUTH) of a converted study, read like a SinogramReader:
    ``read(start, stop) -> (n, V, X)`` in the study's canonical slice order, across its shards.
    Files open on first use (so an instance can be made before a fork) and close with ``close()``."""

    def __init__(self, info: StudyInfo, name: str):
        self.info, self.name, self.files = info, name, {}

    def read(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for sh in self.info.shards:
            lo, hi = max(start, sh.first_slice), min(stop, sh.first_slice + sh.num_slices)
            if lo < hi:
                if sh.path not in self.files:
                    self.files[sh.path] = open_shard(sh.path)
                f = self.files[sh.path]
                d = f[self.name]  # (N, V, X), or (V, X) for a mask shared by every slice
                parts.append(np.broadcast_to(d[()], (hi - lo, *d.shape)) if d.ndim == 2
                             else read_slab(d, lo - sh.first_slice, hi - sh.first_slice, sh.path, sh.first_slice))
        return np.concatenate(parts)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files = {}

    def __enter__(self) -> ShardArray:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RepairedH5Writer:
    """``repaired`` (N, V, X) in the source dtype plus tof/segment/axial, renamed into place on
    commit (through the atomic writer: nothing at ``path`` until every slice is written)."""

    def __init__(self, spec, path: Path, comment: str):  # spec: hpc.io.sinogram.SinogramSpec
        self.path = Path(path)
        self.f = None
        self._out = AtomicFile(self.path)
        try:
            self.f = h5py.File(self._out.path, "w", rdcc_nbytes=0)
            self.f.attrs.update({"format": "hpc-repaired", "axes": "slice,view,bin",
                                 "source": str(spec.source), "comment": comment})
            self.ds = self.f.create_dataset("repaired", (spec.num_slices, *spec.slice_shape),
                                            dtype=spec.dtype.newbyteorder("<"), chunks=(1, *spec.slice_shape),
                                            fletcher32=True)
            for name, values in zip(("tof", "segment", "axial"), spec.meta(), strict=True):
                self.f.create_dataset(name, data=values)
        except OSError as exc:
            self._fail(exc)

    def write(self, start: int, slices: np.ndarray) -> None:
        try:
            self.ds[start:start + len(slices)] = slices
        except OSError as exc:
            self._fail(exc)

    def commit(self) -> Path:
        try:
            self.f.close()
        except OSError as exc:
            self._fail(exc)
        return self._out.commit()

    def _fail(self, exc: OSError) -> None:
        self.abort()
        raise output_error(self.path, exc) or \
            OutputError(f"{self.path}: cannot write: {str(exc).splitlines()[0]}") from None

    def abort(self) -> None:
        if self.f is not None and self.f.id.valid:
            with contextlib.suppress(OSError):
                os.ftruncate(self._out.fd, 0)  # a full disk: let HDF5's closing flush succeed
            with contextlib.suppress(Exception):
                self.f.close()
        self._out.abort()

    def __enter__(self) -> RepairedH5Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()
