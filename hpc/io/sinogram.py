"""Sinogram files: raw binary, STIR projection data (`.hs` + `.s`), Siemens (`.s.hdr`/`.mhdr` + `.s`).

Every source is described by a :class:`SinogramSpec` and read slice by slice in the canonical
order of the shard format: TOF bin, then segment (in storage order), then axial position; each
slice is ``(views, bins)``. A file is a sequence of blocks, one per (TOF bin, segment), each either
sinogram-major ``(axial, view, bin)`` (Siemens, raw, STIR ``segment, axial, view, tangential``) or
view-major ``(view, axial, bin)`` (STIR ``segment, view, axial, tangential``, STIR's default).

    spec = read_header("study.s.hdr")              # or raw_spec("x.raw", (1, 837, 252, 344), "uint16")
    with SinogramReader(spec) as reader:
        slab = reader.read(0, 8)                   # (8, V, X), native byte order
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpc.errors import InputError, OutputError
from hpc.io.atomic import AtomicFile, atomic_open, atomic_write_text, output_error
from hpc.io.interfile import (Header, format_header, normalize_key, number_format, numpy_dtype,
                              parse_header, parse_list, rewrite_header)



def stir_segment_sequence(n: int) -> tuple[int, ...]:
    """STIR's default storage order of ``n`` segments: 0, -1, +1, -2, +2, ..."""
    return tuple((k + 1) // 2 * (-1 if k % 2 else 1) for k in range(n))


@dataclass(frozen=True)
class SinogramSpec:
    data_path: Path
    dtype: np.dtype  # with the file's byte order
    offset: int  # bytes before the first sample
    tof_bins: int
    segments: tuple[int, ...]  # segment numbers in storage order
    axial_counts: tuple[int, ...]  # axial positions of each segment
    views: int
    bins: int
    order: str = "sinogram"  # "sinogram": blocks are (axial, view, bin); "view": (view, axial, bin)
    kind: str = "raw"  # raw | stir | siemens
    header_path: Path | None = None
    fields: dict[str, str] = field(default_factory=dict, compare=False)  # parsed header keys

    @property
    def planes(self) -> int:
        return sum(self.axial_counts)

    @property
    def num_slices(self) -> int:
        return self.tof_bins * self.planes

    @property
    def slice_shape(self) -> tuple[int, int]:
        return self.views, self.bins

    @property
    def nbytes(self) -> int:
        return self.num_slices * self.views * self.bins * self.dtype.itemsize

    @property
    def source(self) -> Path:
        """The file a user named: the header, or the raw data file."""
        return self.header_path or self.data_path

    def meta(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tof, segment, axial) of every slice in canonical order, each ``(num_slices,)`` int32."""
        seg = np.concatenate([np.full(a, s, np.int32) for s, a in zip(self.segments, self.axial_counts, strict=True)])
        axial = np.concatenate([np.arange(a, dtype=np.int32) for a in self.axial_counts])
        tof = np.repeat(np.arange(self.tof_bins, dtype=np.int32), self.planes)
        return tof, np.tile(seg, self.tof_bins), np.tile(axial, self.tof_bins)


def _check_data_file(spec: SinogramSpec) -> SinogramSpec:
    """The data file must exist and hold exactly what the header describes."""
    dims = f"{spec.tof_bins}x{spec.planes}x{spec.views}x{spec.bins}"
    if spec.num_slices <= 0 or spec.views <= 0 or spec.bins <= 0 or spec.offset < 0:
        raise InputError(f"{spec.source}: empty or invalid layout ({dims}, offset {spec.offset})")
    if not spec.data_path.is_file():
        raise InputError(f"{spec.source}: data file not found: {spec.data_path}")
    size = spec.data_path.stat().st_size
    need = spec.offset + spec.nbytes
    what = f"{dims} {spec.dtype.name} from offset {spec.offset} = {need} bytes"
    if size < need:
        raise InputError(f"{spec.data_path}: data file is truncated: expected {what}, file has {size}")
    if size != need:
        raise InputError(f"{spec.data_path}: header/data size mismatch: expected {what}, file has {size}")
    return spec


def raw_spec(data_path: str | os.PathLike, shape: tuple[int, ...], dtype: str | np.dtype,
             endian: str = "little", offset: int = 0) -> SinogramSpec:
    """A headerless file of ``shape`` = (T, S, V, X) (or (S, V, X)) samples, sinogram-major."""
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or min(shape) <= 0:
        raise InputError(f"{data_path}: --shape must be T,S,V,X (or S,V,X) positive integers, got {shape}")
    if endian not in ("little", "big"):
        raise InputError(f"{data_path}: --endian must be little or big, got {endian!r}")
    try:
        dt = np.dtype(dtype).newbyteorder("<" if endian == "little" else ">")
    except TypeError:
        raise InputError(f"{data_path}: unknown --dtype {dtype!r}") from None
    if dt.kind not in "iuf":
        raise InputError(f"{data_path}: --dtype must be an integer or float type, got {dtype!r}")
    t, s, v, x = shape
    spec = SinogramSpec(Path(data_path), dt, offset, t, (0,), (s,), v, x, "sinogram", "raw")
    return _check_data_file(spec)


def _offset(h: Header) -> int:
    if h.get("data offset in bytes [1]") is not None:
        return h.integer("data offset in bytes [1]")
    if h.get("data offset in bytes") is not None:
        return h.integer("data offset in bytes")
    return 2048 * h.integer("data starting block", 0)  # Interfile 3.3 blocks of 2048 bytes


def _stir_segment_numbers(h: Header, n: int) -> tuple[int, ...]:
    """Segment numbers in storage order. With ring differences (as STIR writes them) the segment
    holding ring difference 0 is segment 0 and the others are numbered by their ring differences;
    without them, STIR's default storage sequence 0, -1, +1, -2, +2, ..."""
    if h.get("minimum ring difference per segment") is None:
        return stir_segment_sequence(n)
    lo = h.integers("minimum ring difference per segment")
    hi = h.integers("maximum ring difference per segment")
    if len(lo) != n or len(hi) != n:
        raise InputError(f"{h.path}: ring differences list {len(lo)}/{len(hi)} segments, "
                         f"matrix size says {n}")
    zero = [k for k in range(n) if lo[k] <= 0 <= hi[k]]
    if len(zero) != 1:
        raise InputError(f"{h.path}: exactly one segment must contain ring difference 0")
    rank = np.argsort(np.argsort(lo, kind="stable"), kind="stable")
    return tuple(int(r - rank[zero[0]]) for r in rank)


def _stir_spec(h: Header) -> SinogramSpec:
    ndim = h.integer("number of dimensions", 4)
    labels = {k: " ".join(h.require(f"matrix axis label [{k}]").lower().split()) for k in range(1, ndim + 1)}
    axes = tuple(labels[k] for k in sorted(labels, reverse=True))  # slowest first
    known = {("segment", "view", "axial coordinate", "tangential coordinate"): "view",
             ("segment", "axial coordinate", "view", "tangential coordinate"): "sinogram"}
    tof = 1
    if ndim == 5 and axes[0] == "timing positions":
        tof, axes = h.integer("matrix size [5]"), axes[1:]
    if axes not in known:
        raise InputError(f"{h.path}: unsupported matrix axis labels {', '.join(axes)} (expected segment, "
                         "view|axial coordinate, axial coordinate|view, tangential coordinate)")
    order = known[axes]
    k_axial, k_view = (2, 3) if order == "view" else (3, 2)
    n_seg = h.integer("matrix size [4]")
    axial = [int(v) for v in parse_list(h.require(f"matrix size [{k_axial}]"))]
    if len(axial) != n_seg:
        raise InputError(f"{h.path}: matrix size [{k_axial}] lists {len(axial)} axial counts for {n_seg} segments")
    return SinogramSpec(
        data_path=h.resolve(h.require("name of data file")), dtype=numpy_dtype(h, "bigendian"),
        offset=_offset(h), tof_bins=tof, segments=_stir_segment_numbers(h, n_seg),
        axial_counts=tuple(axial), views=h.integer(f"matrix size [{k_view}]"),
        bins=h.integer("matrix size [1]"), order=order, kind="stir", header_path=h.path,
        fields=dict(h.fields))


def _siemens_spec(h: Header) -> SinogramSpec:
    planes = h.integer("matrix size [3]")
    table = h.integers("segment table") if h.get("segment table") is not None else [planes]
    if sum(table) != planes:
        raise InputError(f"{h.path}: segment table sums to {sum(table)} sinograms, matrix size [3] is {planes}")
    tof_default = h.integer("matrix size [4]") if h.integer("number of dimensions", 3) == 4 else 1
    return SinogramSpec(
        data_path=h.resolve(h.require("name of data file")), dtype=numpy_dtype(h, "littleendian"),
        offset=_offset(h), tof_bins=h.integer("number of tof time bins", tof_default),
        segments=tuple(range(len(table))), axial_counts=tuple(table),
        views=h.integer("matrix size [2]"), bins=h.integer("matrix size [1]"), order="sinogram",
        kind="siemens", header_path=h.path, fields=dict(h.fields))


def read_header(path: str | os.PathLike) -> SinogramSpec:
    """Parse a STIR or Siemens Interfile header (auto-detected) and check its data file."""
    h = parse_header(path)
    if h.get("matrix size [1]") is None and h.get("data set [1]") is not None:
        # Siemens main header (.mhdr): the layout is in the first data set's sub-header.
        items = parse_list(h.require("data set [1]"))
        if len(items) < 2:
            raise InputError(f"{h.path}: data set [1] should be {{type,header,data}}, got {items}")
        sub = parse_header(h.resolve(items[1]))
        h = Header(sub.path, {**h.fields, **sub.fields}, sub.lines)
    labels = [v.lower().strip() for k, v in h.fields.items() if k.startswith("matrix axis label")]
    spec = _stir_spec(h) if "segment" in labels else _siemens_spec(h)
    return _check_data_file(spec)


def _blocks(spec: SinogramSpec, buf) -> list[tuple[int, np.ndarray]]:
    """(first canonical slice, ``(axial, V, X)`` view into ``buf``) for each (TOF bin, segment)."""
    out, pos, first = [], spec.offset, 0
    v, x = spec.slice_shape
    for _ in range(spec.tof_bins):
        for a in spec.axial_counts:
            arr = np.frombuffer(buf, spec.dtype, count=a * v * x, offset=pos)
            arr = arr.reshape(a, v, x) if spec.order == "sinogram" else arr.reshape(v, a, x).transpose(1, 0, 2)
            out.append((first, arr))
            pos += arr.nbytes
            first += a
    return out


def _check_range(spec: SinogramSpec, start: int, stop: int) -> None:
    if not 0 <= start <= stop <= spec.num_slices:
        raise IndexError(f"{spec.source}: slices [{start}, {stop}) outside [0, {spec.num_slices})")


class SinogramReader:
    """Read-only memory map of a sinogram file; ``read(start, stop)`` -> ``(n, V, X)`` copies.

    Pages are released after each read (MADV_DONTNEED): mapped file pages count in the process's
    resident size, so without it converting a 4 GB file would show a 4 GB peak RSS. The kernel's
    page cache keeps them, so re-reading is not slower.
    """

    def __init__(self, spec: SinogramSpec):
        self.spec = spec
        self._file = open(spec.data_path, "rb")
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._blocks = _blocks(spec, self._mm)

    def read(self, start: int, stop: int) -> np.ndarray:
        _check_range(self.spec, start, stop)
        out = np.empty((stop - start, *self.spec.slice_shape), self.spec.dtype.newbyteorder("="))
        for first, block in self._blocks:
            lo, hi = max(start, first), min(stop, first + len(block))
            if lo < hi:
                out[lo - start:hi - start] = block[lo - first:hi - first]  # byte-swaps if needed
        self._mm.madvise(mmap.MADV_DONTNEED)
        return out

    def meta(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.spec.meta()

    def close(self) -> None:
        if self._mm.closed:
            return
        self._blocks = []  # drop the views before unmapping (they export the buffer)
        self._mm.close()
        self._file.close()

    def __enter__(self) -> SinogramReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def data_name(header: Path) -> Path:
    """Data file that goes with a header: ``x.s.hdr``/``x.hs``/``x.mhdr`` -> ``x.s``."""
    name = header.name
    for suffix in (".s.hdr", ".mhdr", ".hs", ".hdr"):
        if name.endswith(suffix):
            return header.with_name(name[: -len(suffix)] + ".s")
    return header.with_name(name + ".s")


def _stem(path: Path) -> Path:
    name = path.name
    for suffix in (".s.hdr", ".mhdr", ".hs", ".hdr", ".s"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    return path


def _siemens_items(spec: SinogramSpec) -> list[tuple[str, object]]:
    fmt, size, order = number_format(spec.dtype)
    return [
        ("!INTERFILE", ""), ("!name of data file", spec.data_path.name),
        ("number format", fmt), ("!number of bytes per pixel", size), ("imagedata byte order", order),
        ("number of dimensions", 3),
        ("matrix axis label [1]", "sinogram projections"), ("matrix size [1]", spec.bins),
        ("matrix axis label [2]", "sinogram views"), ("matrix size [2]", spec.views),
        ("matrix axis label [3]", "number of sinograms"), ("matrix size [3]", spec.planes),
        ("%number of TOF time bins", spec.tof_bins), ("%number of segments", len(spec.segments)),
        ("%segment table", list(spec.axial_counts)), ("%total number of sinograms", spec.planes),
        ("data offset in bytes [1]", 0),
    ]


def _stir_items(spec: SinogramSpec) -> list[tuple[str, object]]:
    fmt, size, order = number_format(spec.dtype)
    tof = [("number of dimensions", 5), ("matrix axis label [5]", "timing positions"),
           ("!matrix size [5]", spec.tof_bins)] if spec.tof_bins > 1 else [("number of dimensions", 4)]
    return [
        ("!INTERFILE", ""), ("name of data file", spec.data_path.name), ("!GENERAL DATA", ""),
        ("!GENERAL IMAGE DATA", ""), ("!type of data", "PET"), ("imagedata byte order", order),
        ("!PET STUDY (General)", ""), ("!PET data type", "Emission"),
        ("!number format", fmt), ("!number of bytes per pixel", size), *tof,
        ("matrix axis label [4]", "segment"), ("!matrix size [4]", len(spec.segments)),
        ("matrix axis label [3]", "view"), ("!matrix size [3]", spec.views),
        ("matrix axis label [2]", "axial coordinate"), ("!matrix size [2]", list(spec.axial_counts)),
        ("matrix axis label [1]", "tangential coordinate"), ("!matrix size [1]", spec.bins),
        # ring differences = segment numbers: a reader recovers the numbers from them
        ("minimum ring difference per segment", list(spec.segments)),
        ("maximum ring difference per segment", list(spec.segments)),
        ("data offset in bytes [1]", 0), ("number of time frames", 1),
    ]


def write_sinogram(path: str | os.PathLike, data: np.ndarray, fmt: str = "siemens",
                   segments: list[int] | None = None, axial_counts: list[int] | None = None,
                   fields: dict[str, object] | None = None) -> Path:
    """Write ``data`` (T, S, V, X) or (S, V, X) in canonical order as an Interfile sinogram.

    Siemens: ``<stem>.s`` + ``<stem>.s.hdr`` (sinogram-major); STIR: ``<stem>.s`` + ``<stem>.hs``
    (view-major, STIR's default). The dtype and byte order of ``data`` are kept. ``fields`` are
    extra header keys (e.g. ``{"originating system": "demo"}``). Data first, then the header, each
    atomically. Returns the header path.
    """
    if fmt not in ("siemens", "stir"):
        raise ValueError(f"write_sinogram: fmt must be 'siemens' or 'stir', got {fmt!r}")
    data = np.asarray(data)
    if data.ndim == 3:
        data = data[None]
    if data.ndim != 4:
        raise ValueError(f"write_sinogram: data must be (T, S, V, X) or (S, V, X), got {data.shape}")
    t, s, v, x = data.shape
    axial = tuple(axial_counts or (s,))
    if sum(axial) != s:
        raise ValueError(f"write_sinogram: axial_counts {axial} sum to {sum(axial)}, data has {s} sinograms")
    segs = tuple(segments) if segments is not None else (
        stir_segment_sequence(len(axial)) if fmt == "stir" else tuple(range(len(axial))))
    if len(segs) != len(axial):
        raise ValueError(f"write_sinogram: {len(segs)} segments but {len(axial)} axial counts")
    stem = _stem(Path(path))
    header = stem.with_name(stem.name + (".s.hdr" if fmt == "siemens" else ".hs"))
    order = "sinogram" if fmt == "siemens" else "view"
    spec = SinogramSpec(data_name(header), data.dtype, 0, t, segs, axial, v, x, order, fmt, header)
    items = _siemens_items(spec) if fmt == "siemens" else _stir_items(spec)
    layout_keys = {normalize_key(k) for k, _ in items}
    clash = [k for k in (fields or {}) if normalize_key(k) in layout_keys]
    if clash:
        raise ValueError(f"write_sinogram: fields {clash} would override layout keys")
    with atomic_open(spec.data_path) as fh:
        first = 0
        for _ in range(t):  # one (TOF bin, segment) block at a time, in storage layout
            for a in axial:
                block = data[first // s, first % s:first % s + a]  # (a, V, X)
                fh.write(np.ascontiguousarray(block if order == "sinogram" else block.transpose(1, 0, 2)))
                first += a
    items += [(k, val) for k, val in (fields or {}).items()] + [("!END OF INTERFILE", "")]
    atomic_write_text(header, format_header(items))
    return header


class SinogramWriter:
    """Stream slices into a new file with the layout, dtype, byte order and header of ``spec``.

        with SinogramWriter(spec, "out/repaired.s.hdr", "repaired by hpc predict (ckpt ...)") as w:
            w.write(0, slices)          # (n, V, X) canonical order, any order of calls; floats
                                        # into an integer file are rounded and clipped
            w.commit()                  # data renamed into place, then the header

    The header is the source's text with the data file name replaced and a ``;`` comment line
    added. For a raw source ``out_header`` is the output data file itself (no header). Until
    ``commit()`` only a hidden temporary file exists; leaving the ``with`` block without commit
    removes it.
    """

    def __init__(self, spec: SinogramSpec, out_header: str | os.PathLike, comment: str):
        self.spec, self.comment = spec, comment
        self.header = Path(out_header) if spec.kind != "raw" else None
        self.data_path = data_name(self.header) if self.header else Path(out_header)
        self._out = AtomicFile(self.data_path)
        self._mm = None
        try:
            if spec.offset:  # keep whatever precedes the samples (e.g. a vendor preamble)
                with open(spec.data_path, "rb") as src:
                    os.write(self._out.fd, src.read(spec.offset))
            # reserve the space now: a full disk is an error here, not a SIGBUS in write()
            os.posix_fallocate(self._out.fd, 0, spec.offset + spec.nbytes)
            self._mm = mmap.mmap(self._out.fd, 0, access=mmap.ACCESS_WRITE)
        except OSError as exc:
            self._out.abort()
            raise output_error(self.data_path, exc) or \
                OutputError(f"{self.data_path}: cannot write: {exc.strerror or exc}") from None
        self._blocks = _blocks(spec, self._mm)
        self._written = np.zeros(spec.num_slices, bool)

    def write(self, start: int, slices: np.ndarray) -> None:
        slices = np.asarray(slices)
        if slices.ndim != 3 or slices.shape[1:] != self.spec.slice_shape:
            raise ValueError(f"{self.data_path}: slices must be (n, {self.spec.views}, {self.spec.bins}), "
                             f"got {slices.shape}")
        stop = start + len(slices)
        _check_range(self.spec, start, stop)
        if self.spec.dtype.kind in "iu" and slices.dtype.kind == "f":
            info = np.iinfo(self.spec.dtype)  # float predictions -> counts: round, never wrap around
            slices = np.clip(np.rint(slices), info.min, info.max)
        for first, block in self._blocks:
            lo, hi = max(start, first), min(stop, first + len(block))
            if lo < hi:
                block[lo - first:hi - first] = slices[lo - start:hi - start]  # casts to the file dtype
        self._written[start:stop] = True
        self._mm.flush()  # then the dirty pages can leave this process's resident set
        self._mm.madvise(mmap.MADV_DONTNEED)

    def commit(self) -> Path:
        """Rename the data into place, then write the header. Returns the header (or data) path."""
        missing = np.flatnonzero(~self._written)
        if missing.size:
            raise ValueError(f"{self.data_path}: {missing.size} slices never written (first: {missing[0]})")
        self._close()
        self._out.commit()
        if self.header is None:
            return self.data_path
        src = parse_header(self.spec.header_path)
        atomic_write_text(self.header, rewrite_header(src, {"name of data file": self.data_path.name},
                                                      self.comment))
        return self.header

    def _close(self) -> None:
        if self._mm is not None and not self._mm.closed:
            self._blocks = []
            self._mm.flush()
            self._mm.close()

    def __enter__(self) -> SinogramWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._close()
        self._out.abort()
