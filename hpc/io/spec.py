"""What a sinogram file holds: :class:`SinogramSpec` (layout, dtype, byte order, offsets, the data
sets of a file) and the checks that its data file holds exactly that. Headers become specs in
hpc.io.headers (``read_header``); hpc.io.sinogram reads and writes the data they describe.

    spec = raw_spec("x.raw", (1, 837, 252, 344), "uint16")   # or hpc.io.headers.read_header("x.s.hdr")
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from hpc.errors import InputError
from hpc.io.regular import file_kind
from hpc.physics.projdata import SliceCounts, layout_for, segment_storage_order


def stir_segment_sequence(n: int) -> tuple[int, ...]:
    """STIR's default storage order of ``n`` segments: 0, -1, +1, -2, +2, ... (hpc.physics.projdata)."""
    return segment_storage_order(n)


@dataclass(frozen=True)
class SinogramSpec(SliceCounts):
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
    ring_diffs: tuple[tuple[int, int], ...] | None = None  # (min, max) ring difference per segment, if stated
    scanner: str = ""  # the header's `originating system`
    datasets: tuple[tuple[str, int], ...] = ()  # other data sets of the data file: (name, byte offset)

    @property
    def nbytes(self) -> int:
        return self.num_slices * self.views * self.bins * self.dtype.itemsize

    @property
    def source(self) -> Path:
        """The file a user named: the header, or the raw data file."""
        return self.header_path or self.data_path

    def layout(self, scanner: str = ""):
        """The :class:`hpc.physics.projdata.Layout` of the slices on ``scanner`` (default: the header's
        `originating system`); ValueError for an unknown scanner or a layout it cannot have."""
        return layout_for(scanner or self.scanner, self.segments, self.axial_counts, self.views, self.bins,
                          self.tof_bins, self.ring_diffs)

    def dataset(self, name: str) -> SinogramSpec:
        """The spec of another data set of the same file (e.g. ``randoms``): same layout, its offset."""
        offsets = dict(self.datasets)
        if name not in offsets:
            raise KeyError(f"{self.source}: no data set {name!r} (has {', '.join(offsets) or 'none'})")
        return replace(self, offset=offsets[name], datasets=())

    def meta(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tof, segment, axial) of every slice in canonical order, each ``(num_slices,)`` int32."""
        seg = np.concatenate([np.full(a, s, np.int32) for s, a in zip(self.segments, self.axial_counts, strict=True)])
        axial = np.concatenate([np.arange(a, dtype=np.int32) for a in self.axial_counts])
        tof = np.repeat(np.arange(self.tof_bins, dtype=np.int32), self.planes)
        return tof, np.tile(seg, self.tof_bins), np.tile(axial, self.tof_bins)


def _check_data_file(spec: SinogramSpec) -> SinogramSpec:
    """The data file must exist and hold exactly what the header describes."""
    dims = f"{spec.tof_bins}x{spec.planes}x{spec.views}x{spec.bins}"
    # each factor positive: -2 TOF bins x -3 planes must not pass as 6 slices
    if min(spec.tof_bins, spec.views, spec.bins, *spec.axial_counts, 1) < 1 or not spec.axial_counts \
            or min([spec.offset, *(o for _, o in spec.datasets)]) < 0:
        raise InputError(f"{spec.source}: empty or invalid layout ({dims}, axial counts "
                         f"{list(spec.axial_counts)}, offsets {[spec.offset, *(o for _, o in spec.datasets)]})")
    try:
        st = spec.data_path.stat()
    except FileNotFoundError:
        raise InputError(f"{spec.source}: data file not found: {spec.data_path}") from None
    except OSError as exc:
        raise InputError(f"{spec.source}: cannot read data file {spec.data_path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):  # /dev/zero or a FIFO would be read forever or block
        where = f"{spec.source}: data file {spec.data_path}" if spec.header_path else f"{spec.data_path}: data file"
        raise InputError(f"{where} is {file_kind(st.st_mode)}, not a regular file")
    _check_disjoint(spec)
    size = st.st_size
    need = max([spec.offset] + [o for _, o in spec.datasets]) + spec.nbytes  # the last data set ends the file
    what = f"{dims} {spec.dtype.name} from offset {spec.offset} = {need} bytes"
    if size < need:
        raise InputError(f"{spec.data_path}: data file is truncated: expected {what}, file has {size}")
    if size != need:
        raise InputError(f"{spec.data_path}: header/data size mismatch: expected {what}, file has {size}")
    return spec


def _check_disjoint(spec: SinogramSpec) -> None:
    """The data sets of one file (prompts, randoms: each ``nbytes`` from its offset) must not share
    a byte: two offsets of 0 would make the randoms a copy of the prompts, silently."""
    sets = sorted([(spec.offset, "the data")] + [(o, f"data set {name!r}") for name, o in spec.datasets])
    for (a, name_a), (b, name_b) in zip(sets, sets[1:], strict=False):
        if b < a + spec.nbytes:
            raise InputError(f"{spec.source}: {name_b} at byte {b} overlaps {name_a} at byte {a} "
                             f"({spec.nbytes} bytes each); check the data offsets")


def parse_raw_shape(text: str, dtype: str | None, where: str, example: str) -> tuple[int, ...]:
    """``--shape`` of a raw file as integers (one line naming ``where`` if not), and its ``--dtype`` given."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{where}: --shape must be comma-separated integers like {example}, got {text!r}") from None
    if not dtype:
        raise InputError(f"{where}: a raw file needs --dtype (e.g. uint16)")
    return shape


def raw_spec(data_path: str | os.PathLike, shape: tuple[int, ...], dtype: str | np.dtype,
             endian: str = "little", offset: int = 0, flag: str = "--dtype") -> SinogramSpec:
    """A headerless file of ``shape`` = (T, S, V, X) (or (S, V, X)) samples, sinogram-major;
    ``flag`` names the option the dtype came from in error lines."""
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or min(shape) <= 0:
        raise InputError(f"{data_path}: --shape must be T,S,V,X (or S,V,X) positive integers, got {shape}")
    if endian not in ("little", "big"):
        raise InputError(f"{data_path}: --endian must be little or big, got {endian!r}")
    try:  # numpy raises TypeError, ValueError ('(-1,)u2'), SyntaxError... for what is not a dtype
        dt = np.dtype(dtype).newbyteorder("<" if endian == "little" else ">")
    except Exception:
        raise InputError(f"{data_path}: unknown {flag} {dtype!r}") from None
    if dt.kind not in "iuf" or dt.shape or dt.names:  # '(2,)u2' is a sub-array, not a sample type
        raise InputError(f"{data_path}: {flag} must be an integer or float type, got {dtype!r}")
    t, s, v, x = shape
    spec = SinogramSpec(Path(data_path), dt, offset, t, (0,), (s,), v, x, "sinogram", "raw")
    return _check_data_file(spec)


check_data_file = _check_data_file
