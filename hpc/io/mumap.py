"""Mu-map files: STIR ``.hv`` and Siemens ``.v.hdr`` Interfile images (+ their ``.v`` data) ->
:class:`hpc.physics.attenuation.MuMap`; writing them (tests, ``hpc simulate --listmode``).

Keys (re-derived from STIR's InterfileHeader / InterfileHeaderSiemens and its
convertSiemensInterfileToSTIR.sh; no code copied): ``matrix size [1..3]`` = x, y, z; voxel sizes from
``scaling factor (mm/pixel) [k]`` (STIR) or ``scale factor (mm/pixel) [k]`` (Siemens); byte order
from ``imagedata byte order`` (STIR) or ``image data byte order`` (Siemens), big endian when absent
(as STIR); ``data offset in bytes``; ``first pixel offset (mm) [1]``/``[2]`` (x, y of the first
pixel's centre, any value; default STIR's -(n // 2) voxels). Values in 1/cm (STIR's and the Siemens
console's unit: water 0.096). Refused, one line each: not 3-D, sizes or voxels not positive, a data
file that is not exactly the image, non-finite values or values above ``MAX_MU_PER_CM`` (other units,
e.g. a CT in Hounsfield units or DICOM's x 10000), an axial offset (``[3]``) other than 0.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from hpc.errors import InputError
from hpc.io.atomic import atomic_open, atomic_write_text
from hpc.io.interfile import Header, data_kind, format_header, numpy_dtype, parse_header
from hpc.physics.attenuation import MuMap

MAX_MU_PER_CM = 1.0  # bone is ~0.17/cm at 511 keV; larger values mean other units
MAX_VOXELS = 1 << 28  # 1 GB of float32: far above any real map (mMR: 344 x 344 x 127)


def read_mumap(path: str | os.PathLike) -> MuMap:
    """Read a STIR ``.hv`` or Siemens ``.v.hdr`` mu-map; InputError naming what does not fit."""
    h = parse_header(path)
    kind = data_kind(h)
    if kind != "an image":
        raise InputError(f"{h.path}: not a mu-map: the header describes {kind or 'an emission sinogram'}, not an image")
    if h.integer("number of dimensions", 3) != 3:
        raise InputError(f"{h.path}: a mu-map needs 3 dimensions, header says {h.integer('number of dimensions')}")
    nx, ny, nz = (h.integer(f"matrix size [{k}]") for k in (1, 2, 3))
    vox = [h.number(f"scaling factor (mm/pixel) [{k}]", 0.0) or h.number(f"scale factor (mm/pixel) [{k}]", 0.0)
           for k in (3, 2, 1)]
    if min(nx, ny, nz) < 1 or min(vox) <= 0 or nx * ny * nz > MAX_VOXELS:
        raise InputError(f"{h.path}: matrix size {nx}x{ny}x{nz} and voxel size {vox[::-1]} mm must be positive "
                         f"(at most {MAX_VOXELS} voxels)")
    dtype = numpy_dtype(h, h.text("image data byte order") or "bigendian")
    origin = _origin(h)
    data = h.resolve(h.require("name of data file"))
    offset = h.integer("data offset in bytes", 0) or h.integer("data offset in bytes [1]", 0)
    _check_size(h, data, offset, offset + nx * ny * nz * dtype.itemsize, f"{nx}x{ny}x{nz} {dtype.name}")
    values = np.fromfile(data, dtype, nx * ny * nz, offset=offset).reshape(nz, ny, nx).astype(np.float32)
    if not np.isfinite(values).all() or values.max() > MAX_MU_PER_CM:
        raise InputError(f"{data}: mu values must be finite and in 1/cm (below {MAX_MU_PER_CM}); "
                         f"found max {np.nanmax(values):.4g}")
    return MuMap(values, (vox[0], vox[1], vox[2]), h.path, origin)


def _origin(h: Header) -> tuple[float, float] | None:
    """(y0, x0) of the first pixel's centre in mm, None for STIR's default; an axial offset is refused."""
    z = h.get("first pixel offset (mm) [3]")
    if z is not None and h.number("first pixel offset (mm) [3]") != 0:
        raise InputError(f"{h.path}: first pixel offset (mm) [3] = {z}: an axial offset is not supported (the "
                         "map's middle slice is placed at the scanner's centre, as STIR's projectors do)")
    if h.get("first pixel offset (mm) [1]") is None and h.get("first pixel offset (mm) [2]") is None:
        return None
    nx, ny = h.integer("matrix size [1]"), h.integer("matrix size [2]")
    dx = h.number("scaling factor (mm/pixel) [1]", 0.0) or h.number("scale factor (mm/pixel) [1]")
    dy = h.number("scaling factor (mm/pixel) [2]", 0.0) or h.number("scale factor (mm/pixel) [2]")
    return (h.number("first pixel offset (mm) [2]", -(ny // 2) * dy),
            h.number("first pixel offset (mm) [1]", -(nx // 2) * dx))


def _check_size(h: Header, data: Path, offset: int, need: int, what: str) -> None:
    try:
        st = data.stat()
    except OSError:
        raise InputError(f"{h.path}: mu-map data file not found: {data}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{h.path}: mu-map data file {data} is not a regular file")
    if st.st_size != need:
        raise InputError(f"{data}: {st.st_size} bytes, the header describes {need} ({what} from offset {offset}): "
                         "truncated or the wrong header")


def write_mumap(stem: str | os.PathLike, mu: MuMap, fmt: str = "stir") -> Path:
    """Write ``<stem>.v`` + ``<stem>.hv`` (STIR) or ``<stem>.v.hdr`` (Siemens keys); float32 LE.
    A map with ``origin_mm`` gets ``first pixel offset (mm)`` keys. Returns the header path."""
    stem = Path(stem)
    data = stem.with_name(stem.name + ".v")
    with atomic_open(data) as fh:
        fh.write(np.asarray(mu.values, "<f4").tobytes())
    nz, ny, nx = mu.values.shape
    dz, dy, dx = mu.voxel_mm
    siemens = fmt == "siemens"
    scale, order = ("scale factor", "image data byte order") if siemens else ("scaling factor", "imagedata byte order")
    items = [("!INTERFILE", ""), ("name of data file", data.name), ("!type of data", "PET"),
             (order, "LITTLEENDIAN"), ("!PET data type", "Image"), ("!number format", "float"),
             ("!number of bytes per pixel", 4), ("number of dimensions", 3)]
    for k, (n, d, label) in enumerate(((nx, dx, "x"), (ny, dy, "y"), (nz, dz, "z")), 1):
        items += [(f"matrix axis label [{k}]", label), (f"!matrix size [{k}]", n), (f"{scale} (mm/pixel) [{k}]", d)]
    if mu.origin_mm is not None:
        items += [("first pixel offset (mm) [1]", mu.origin_mm[1]), ("first pixel offset (mm) [2]", mu.origin_mm[0]),
                  ("first pixel offset (mm) [3]", 0)]
    if siemens:
        items = [items[0], ("%SMS-MI header name space", "image subheader"), *items[1:],
                 ("quantification units", "1/cm")]
    header = stem.with_name(stem.name + (".v.hdr" if siemens else ".hv"))
    atomic_write_text(header, format_header(items + [("!END OF INTERFILE", "")]))
    return header
