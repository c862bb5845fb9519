"""Shard format v2 (v1 read): HDF5 shards of sinogram slices plus ``manifest.json`` (spec in docs/FORMAT.md).

Reading: :meth:`Dataset.open` parses the manifest; :func:`open_shard` and :func:`read_slab` name the
shard, dataset and slice of a chunk that fails its checksum; :func:`verify_shard` re-checks the
SHA-256s; :class:`ShardArray` reads a study across its shards. Writing is :mod:`hpc.io.h5write`.

    ds = Dataset.open("data/demo")
    ds.studies[0].shards[0].path, ds.slice_shape, ds.scale
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import h5py
import hdf5plugin  # noqa: F401  (registers the blosc filter for reading and writing)
import numpy as np

from hpc.errors import InputError
from hpc.physics.projdata import layout_for, segment_storage_order

FORMAT = "hpc-sinogram"
FORMAT_VERSION = 2  # 2: STIR segment numbers for Siemens sources too, ring differences, optional
READABLE_VERSIONS = (1, 2)  # `randoms`, float32 measured-fraction masks (docs/FORMAT.md)
# Optional float32 (N, V, X) datasets with the noise-free truth and the physics of a study, when known
# (hpc simulate writes them; hpc convert --expected/--randoms/--mult): expected counts of the target,
# the randoms part of them, the multiplicative factors (efficiencies x attenuation).
TRUTH = ("expected", "randoms", "mult")
DATASETS = ("target", "input", "mask", "delayed", *TRUTH, "tof", "segment", "axial")


def _le(a: np.ndarray) -> np.ndarray:
    """C-contiguous little-endian copy-or-view: the bytes the checksums are defined on."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


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
        """The study's :class:`hpc.physics.projdata.Layout` on ``scanner`` (default: its own); ValueError if
        the scanner is unknown or cannot have this layout."""
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
