"""Sinogram files: raw binary, STIR projection data (`.hs` + `.s`), Siemens (`.s.hdr`/`.mhdr` + `.s`).

Every source is described by a :class:`SinogramSpec` and read slice by slice in the canonical
order of the shard format: TOF bin, then segment (in storage order), then axial position; each
slice is ``(views, bins)``. A file is a sequence of blocks, one per (TOF bin, segment), each either
sinogram-major ``(axial, view, bin)`` (Siemens, raw, STIR ``segment, axial, view, tangential``) or
view-major ``(view, axial, bin)`` (STIR ``segment, view, axial, tangential``, STIR's default).

    spec = read_header("study.s.hdr")    # hpc.io.headers; or hpc.io.spec.raw_spec("x.raw", (1, 837, 252, 344), "u2")
    with SinogramReader(spec) as reader:
        slab = reader.read(0, 8)                   # (8, V, X), native byte order
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from hpc.errors import InputError, OutputError
from hpc.io.atomic import AtomicFile, atomic_open, atomic_write_text, output_error
from hpc.io.headers import check_siemens_layout, siemens_items, stir_items
from hpc.io.interfile import format_header, normalize_key, parse_header, rewrite_header
from hpc.io.spec import SinogramSpec, stir_segment_sequence


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

    @property
    def contiguous(self) -> bool:
        """Canonical slice order is the file's byte order (Siemens, raw, STIR sinogram-major): a
        pass over the slices in order is a pass over the file (``read(..., digest=h)``)."""
        return self.spec.order == "sinogram"

    def read(self, start: int, stop: int, digest=None) -> np.ndarray:
        """Slices [start, stop). ``digest`` (an hpc.io.chunks.HashLane; contiguous files, slabs in
        order from 0): also fed the file's bytes of these slices by this same read, so a file's
        checksum costs no second read (``digest_rest`` adds the bytes after the data)."""
        _check_range(self.spec, start, stop)
        out = np.empty((stop - start, *self.spec.slice_shape), self.spec.dtype.newbyteorder("="))
        if self.contiguous and self.spec.dtype.isnative:  # one pread: no page faults, no byte swaps
            per = out[0].nbytes if len(out) else 0
            view = memoryview(out).cast("B")
            got = os.preadv(self._file.fileno(), [view], self.spec.offset + start * per)
            if got != len(view):
                raise InputError(f"{self.spec.data_path}: file ends inside slice {start + got // max(per, 1)}")
            if digest is not None:
                if start == 0:
                    digest.update_now(memoryview(self._mm)[:self.spec.offset])  # bytes before the data
                digest.update(out)  # the file's bytes: hashed later, off this thread
            return out
        for first, block in self._blocks:
            lo, hi = max(start, first), min(stop, first + len(block))
            if lo < hi:
                out[lo - start:hi - start] = block[lo - first:hi - first]  # byte-swaps if needed
        if digest is not None:
            if start == 0:
                digest.update_now(memoryview(self._mm)[:self.spec.offset])  # bytes before the data
            if self.spec.dtype.isnative:  # `out` holds the file's bytes: hashed later, off this thread
                digest.update(out)
            else:
                per = int(np.prod(self.spec.slice_shape)) * self.spec.dtype.itemsize
                digest.update_now(memoryview(self._mm)[self.spec.offset + start * per:self.spec.offset + stop * per])
        self._mm.madvise(mmap.MADV_DONTNEED)
        return out

    def digest_rest(self, digest) -> None:
        """After the last slice: the file's bytes after the data."""
        digest.update_now(memoryview(self._mm)[self.spec.offset + self.spec.nbytes:])

    def meta(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.spec.meta()

    def close(self) -> None:
        if self._mm.closed:
            return
        self._blocks = []  # drop the views before unmapping (they export the buffer)
        try:
            self._mm.close()
        except BufferError:  # a view still alive (an interrupted read's frame): unmapped when it goes
            pass
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


def write_sinogram(path: str | os.PathLike, data: np.ndarray, fmt: str = "siemens",
                   segments: list[int] | None = None, axial_counts: list[int] | None = None,
                   fields: dict[str, object] | None = None, layout=None) -> Path:
    """Write ``data`` (T, S, V, X) or (S, V, X) in canonical order (= the file's storage order: a
    Siemens file's TOF bins are timing positions 0, +1, -1, ...) as an Interfile sinogram.

    Siemens: ``<stem>.s`` + ``<stem>.s.hdr`` (sinogram-major); STIR: ``<stem>.s`` + ``<stem>.hs``
    (view-major, STIR's default). With ``layout`` (:class:`hpc.physics.projdata.Layout`) the header holds
    what STIR needs to read the file back: STIR's scanner name as `originating system`, ring
    differences (STIR) or span and maximum ring difference (Siemens), the scanner parameters.
    Without it, ``segments`` / ``axial_counts`` (STIR: span 1, ring difference = segment number).
    The dtype and byte order of ``data`` are kept; ``fields`` are extra header keys. Data first,
    then the header, each atomically. Returns the header path.
    """

    if fmt not in ("siemens", "stir"):
        raise ValueError(f"write_sinogram: fmt must be 'siemens' or 'stir', got {fmt!r}")
    data = np.asarray(data)
    if data.ndim == 3:
        data = data[None]
    if data.ndim != 4:
        raise ValueError(f"write_sinogram: data must be (T, S, V, X) or (S, V, X), got {data.shape}")
    t, s, v, x = data.shape
    ring_diffs = None
    if layout is not None:
        if (t, s, v, x) != (layout.tof_bins, layout.planes, *layout.slice_shape):
            raise ValueError(f"write_sinogram: data {data.shape} is not the layout's "
                             f"{(layout.tof_bins, layout.planes, *layout.slice_shape)}")
        if fmt == "siemens":
            check_siemens_layout(layout)
        segments, axial_counts = list(layout.segments), list(layout.axial_counts)
        ring_diffs = tuple(zip(layout.min_rd, layout.max_rd, strict=True))
    axial = tuple(axial_counts or (s,))
    if sum(axial) != s:
        raise ValueError(f"write_sinogram: axial_counts {axial} sum to {sum(axial)}, data has {s} sinograms")
    segs = tuple(segments) if segments is not None else stir_segment_sequence(len(axial))
    if len(segs) != len(axial):
        raise ValueError(f"write_sinogram: {len(segs)} segments but {len(axial)} axial counts")
    stem = _stem(Path(path))
    header = stem.with_name(stem.name + (".s.hdr" if fmt == "siemens" else ".hs"))
    order = "sinogram" if fmt == "siemens" else "view"
    spec = SinogramSpec(data_name(header), data.dtype, 0, t, segs, axial, v, x, order, fmt, header,
                        ring_diffs=ring_diffs)
    items = siemens_items(spec, layout) if fmt == "siemens" else stir_items(spec, layout)
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


def output_bytes(spec: SinogramSpec) -> int:
    """Size of the data file ``SinogramWriter(spec, ...)`` writes: the whole source data file (its
    preamble and other data sets, e.g. the randoms of prompts + randoms, are copied), at least the
    end of the data set ``spec`` describes."""
    return max(spec.offset + spec.nbytes, spec.data_path.stat().st_size)


def _copy_around(spec: SinogramSpec, fd: int, size: int, chunk: int = 8 << 20) -> None:
    """Copy every byte of the source data file outside the data set ``spec`` describes (a vendor
    preamble, the randoms of a prompts + randoms file) to the same place in ``fd``: the source's
    header then describes the output unchanged."""
    with open(spec.data_path, "rb") as src:
        for lo, hi in ((0, spec.offset), (spec.offset + spec.nbytes, size)):
            for pos in range(lo, hi, chunk):
                src.seek(pos)
                os.pwrite(fd, src.read(min(chunk, hi - pos)), pos)


def writer_paths(spec: SinogramSpec, out_header: str | os.PathLike) -> list[Path]:
    """The files ``SinogramWriter(spec, out_header)`` writes: the header and its data file (one raw
    file for a raw source)."""
    out = Path(out_header)
    return [out] if spec.kind == "raw" else [out, data_name(out)]


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
            # reserve the whole file now (prompts and randoms): a full disk is an error here, before
            # anything is copied, not a SIGBUS in write()
            size = output_bytes(spec)
            os.posix_fallocate(self._out.fd, 0, size)
            _copy_around(spec, self._out.fd, size)  # a vendor preamble, the randoms of prompts + randoms
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
        """Write the header beside the data, then rename both into place (data first). A full disk
        at the header leaves neither. Returns the header (or data) path."""
        missing = np.flatnonzero(~self._written)
        if missing.size:
            raise ValueError(f"{self.data_path}: {missing.size} slices never written (first: {missing[0]})")
        self._close()
        if self.header is None:
            return self._out.commit()
        src = parse_header(self.spec.header_path)
        text = rewrite_header(src, {"name of data file": self.data_path.name}, self.comment)
        with AtomicFile(self.header) as head:
            head.write_all(text.encode())
            self._out.commit()
            return head.commit()

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


class MaskReader:
    """A gap mask file for the slices of ``target``: ``read(start, stop) -> (n, V, X)`` float32
    measured fractions (integer masks: 1 where non-zero; float masks must lie in [0, 1]). The mask
    has a slice per data slice, one per plane shared by every TOF bin, or a single slice for all."""

    def __init__(self, mask: SinogramSpec, target: SinogramSpec):
        counts = (target.num_slices, target.planes, 1)
        if mask.slice_shape != target.slice_shape or mask.num_slices not in counts:
            raise InputError(f"{mask.source}: mask is {mask.num_slices}x{mask.views}x{mask.bins}, input "
                             f"{target.source} is {target.num_slices}x{target.views}x{target.bins} (a mask has a "
                             f"slice per data slice, one per plane ({target.planes}) or one for all)")
        self.spec, self.period = mask, mask.num_slices
        self.reader = SinogramReader(mask)
        # a slice per data slice: a pass over the data is one pass over the mask file (its checksum
        # can be fed by the same reads, ``read(..., digest=h)``)
        self.streams = mask.num_slices == target.num_slices > 1

    @property
    def contiguous(self) -> bool:
        return self.reader.contiguous

    def _values(self, raw: np.ndarray, first: int) -> np.ndarray:
        if self.spec.dtype.kind != "f":
            return (raw != 0).astype(np.float32)
        bad = np.flatnonzero(~((raw >= 0) & (raw <= 1)).reshape(len(raw), -1).all(1))  # NaN fails both
        if bad.size:
            k = int(bad[0])
            what = "contains NaN or inf" if not np.isfinite(raw[k]).all() else "has values outside [0, 1]"
            raise InputError(f"{self.spec.source}: mask slice {first + k} {what} "
                             "(a mask is the measured fraction of each bin)")
        return raw.astype(np.float32)

    def read(self, start: int, stop: int, digest=None) -> np.ndarray:
        """Fractions of slices [start, stop): slice i uses mask slice i mod (mask slices).
        ``digest``: as SinogramReader.read, when the mask ``streams``."""
        if digest is not None:
            if not self.streams:
                raise ValueError(f"{self.spec.source}: a mask repeated over slices cannot be hashed by its reads")
            return self._values(self.reader.read(start, stop, digest), start)
        idx = np.arange(start, stop) % self.period
        out = np.empty((stop - start, *self.spec.slice_shape), np.float32)
        cuts = np.flatnonzero(np.diff(idx) != 1) + 1  # where the index wraps to the next TOF bin
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, idx.size], strict=True):
            if lo < hi:
                a, b = int(idx[lo]), int(idx[hi - 1]) + 1
                out[lo:hi] = self._values(self.reader.read(a, b), a)
        return out

    def digest_rest(self, digest) -> None:
        self.reader.digest_rest(digest)

    def close(self) -> None:
        self.reader.close()
