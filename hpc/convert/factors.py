"""The files `hpc convert` stages from list mode and the scanner's calibration before converting
them like any sinogram (hpc.convert.listmode decides what and when):

- a frame's histogram: a Siemens sinogram (``.s`` + ``.s.hdr``) with two data sets, the prompts
  (the study's ``target``) and the delayeds (``scan data type description [2] := randoms``, which
  the converter stores as ``delayed``), in the target layout, uint16 (or uint32);
- ``mult``: float32, per bin the mean over its real LORs of efficiency x attenuation factor
  (hpc.physics.norm: the efficiencies sum the bin's LORs, so they are divided by the number of
  LORs joining two real crystals; hpc.physics.attenuation: the factors are already means); 0
  through virtual crystals. This is the convention of ``hpc simulate``'s ``_mult`` files;
- ``randoms``: float32 expected randoms per bin (counts, summed over the bin's LORs) from the ML
  singles of the frame's delayed fan sums (hpc.physics.randoms), spread evenly over TOF bins.

Every file is written atomically, data first; memory holds one frame's accumulators or one
(planes, V, X) float32 array at a time, never anything proportional to the list-mode file.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from hpc.errors import InputError
from hpc.io.atomic import atomic_open, atomic_write_text
from hpc.io.headers import siemens_items
from hpc.io.interfile import format_header
from hpc.io.lmhistogram import Histogram
from hpc.io.spec import SinogramSpec
from hpc.physics import geometry as G
from hpc.physics import projdata as P

PLANES_PER_BATCH = 64  # planes of factors computed at a time (mMR: 64 x 87k x 8 B temporaries)
SLAB_PLANES = 64  # planes cast and written at a time


def staged_spec(header: Path, layout: P.Layout, dtype: np.dtype, delayed: bool, fields: dict) -> SinogramSpec:
    """The spec of a staged Siemens file (what hpc.io.headers.read_header gives back for it)."""
    v, x = layout.slice_shape
    nbytes = layout.num_slices * v * x * np.dtype(dtype).itemsize
    return SinogramSpec(header.with_name(header.name[:-len(".hdr")]), np.dtype(dtype).newbyteorder("<"), 0,
                        layout.tof_bins, layout.segments, layout.axial_counts, v, x, "sinogram", "siemens", header,
                        dict(fields), tuple(zip(layout.min_rd, layout.max_rd, strict=True)),
                        layout.scanner.stir_name, (("randoms", nbytes),) if delayed else ())


def _header_text(spec: SinogramSpec, layout: P.Layout, comment: str) -> str:
    """Siemens keys STIR and hpc read (hpc.io.headers.siemens_items), with a second data set for the
    delayeds when ``spec`` has one, and the extra ``spec.fields`` (isotope, duration, ...)."""
    one_set = ("number of scan data types", "scan data type description [1]", "data offset in bytes [1]")
    items = [it for it in siemens_items(spec, layout) if it[0] not in one_set]
    sets = [("prompts", spec.offset), *spec.datasets]
    items += [("number of scan data types", len(sets))]
    for k, (name, offset) in enumerate(sets, 1):
        items += [(f"scan data type description [{k}]", name), (f"data offset in bytes [{k}]", offset)]
    items += [(k, v) for k, v in spec.fields.items()] + [("!END OF INTERFILE", "")]
    text = format_header(items)
    first, rest = text.split("\n", 1)
    return f"{first}\n; {comment}\n{rest}"


def write_histogram(spec: SinogramSpec, layout: P.Layout, h: Histogram, comment: str) -> Path:
    """The frame's prompts then delayeds ((T, P, V, X) uint32 each) as ``spec`` says (uint16 or
    uint32); a count above the dtype's maximum is an error naming the bin, never wrapped."""
    top = np.iinfo(spec.dtype).max
    for name, arr in (("prompts", h.prompts), ("delayeds", h.delayeds)):
        peak = int(arr.max(initial=0))
        if peak > top:
            raise InputError(f"{spec.source}: a bin of the {name} holds {peak} counts, above the {spec.dtype.name} "
                             f"maximum {top}: use --histogram-dtype uint32 (or shorter --frames)")
    with atomic_open(spec.data_path) as fh:
        for arr in (h.prompts, h.delayeds):
            flat = arr.reshape(-1, *layout.slice_shape)  # (T * P, V, X), canonical = storage order
            for lo in range(0, flat.shape[0], SLAB_PLANES):
                fh.write(flat[lo:lo + SLAB_PLANES].astype(spec.dtype).tobytes())
    atomic_write_text(spec.header_path, _header_text(spec, layout, comment))
    return spec.header_path


def write_floats(spec: SinogramSpec, layout: P.Layout, planes: np.ndarray, comment: str) -> Path:
    """``planes`` (P, V, X) float32 for every TOF bin of ``layout`` (the caller divides what TOF
    bins share) into ``spec``'s file."""
    with atomic_open(spec.data_path) as fh:
        for _ in range(layout.tof_bins):
            for lo in range(0, layout.planes, SLAB_PLANES):
                fh.write(np.ascontiguousarray(planes[lo:lo + SLAB_PLANES], "<f4").tobytes())
    atomic_write_text(spec.header_path, _header_text(spec, layout, comment))
    return spec.header_path


def real_lors(layout: P.Layout) -> np.ndarray:
    """(P, V, X) LORs of each bin joining two real crystals in real rings (ring pairs x mashed views;
    at least 1, so that a bin through virtual crystals only divides by 1)."""
    sc = layout.scanner
    plane, ra, rb = layout.ring_pairs
    pairs = np.bincount(plane, weights=~(G.virtual_ring(sc, ra) | G.virtual_ring(sc, rb)), minlength=layout.planes)
    views = G.transaxial_valid(sc).reshape(layout.views, layout.view_mashing, sc.bins).sum(1)  # (V, X)
    return np.maximum(pairs[:, None, None] * views[None], 1).astype(np.float32)


def mult_planes(layout: P.Layout, efficiencies: Callable | None, attenuation: Callable | None) -> np.ndarray:
    """(P, V, X) float32 mult of every plane: ``efficiencies(planes)`` (summed over each bin's LORs,
    hpc.physics.norm.bin_efficiencies) / real LORs x ``attenuation(planes)`` (means); a missing
    factor is 1 on real LORs. 0 through virtual crystals (the norm's zeros, or the layout's validity)."""
    out = np.empty((layout.planes, *layout.slice_shape), np.float32)
    count = real_lors(layout)
    for lo in range(0, layout.planes, PLANES_PER_BATCH):
        planes = np.arange(lo, min(lo + PLANES_PER_BATCH, layout.planes))
        m = (efficiencies(planes) / count[planes] if efficiencies else layout.valid(planes).astype(np.float32))
        if attenuation:
            m = m * attenuation(planes)
        out[planes] = m
    return out


def randoms_planes(layout: P.Layout, singles: np.ndarray, expected: Callable) -> np.ndarray:
    """(P, V, X) float32 expected randoms per TOF bin: ``expected(singles, layout, planes)``
    (hpc.physics.randoms.randoms, summed over each bin's LORs) / TOF bins."""
    out = np.empty((layout.planes, *layout.slice_shape), np.float32)
    for lo in range(0, layout.planes, PLANES_PER_BATCH):
        planes = np.arange(lo, min(lo + PLANES_PER_BATCH, layout.planes))
        out[planes] = expected(singles, layout, planes) / layout.tof_bins
    return out
