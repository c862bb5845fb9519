"""Siemens component-based normalisation files (``.n.hdr`` + ``.n``): reading and (for tests and
``hpc simulate --listmode``) writing. The components and their expansion to per-bin efficiencies
are hpc.physics.norm.

``.n.hdr`` keys (re-derived from STIR's ``InterfileNormHeaderSiemens``): ``%number of normalization
components``, per component k ``%normalization component [k]`` (its name), ``%matrix size [k]``
(fastest axis first) and ``data offset in bytes [k]``; ``number format := float``, 4 bytes,
``image data byte order``; ``%axial compression`` / ``%maximum ring difference`` (the layout of the
axial effects; STIR's default span 11). The data file must end exactly with the last component.

    comp = read_norm("scan.n.hdr")                        # hpc.physics.norm.NormComponents
    eff = hpc.physics.norm.bin_efficiencies(comp, layout)
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from hpc.errors import InputError
from hpc.io.atomic import atomic_open, atomic_write_text
from hpc.io.interfile import format_header, parse_header
from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.physics.norm import MAIN, NormComponents

MAX_COMPONENTS = 32  # real files hold 8 (mMR) or fewer
MAX_BYTES = 256 << 20  # real files are ~0.3 MB (mMR) to a few MB


def read_norm(path: str | os.PathLike, scanner: G.Scanner | None = None) -> NormComponents:
    """Read ``.n.hdr`` and its ``.n``; InputError naming the file and what does not fit."""
    h = parse_header(path)
    if "normali" not in (h.text("pet data type") + h.text("sms-mi header name space")).lower():
        raise InputError(f"{h.path}: not a Siemens normalisation header (no 'PET data type := normalization')")
    try:
        sc = scanner or G.get_scanner(h.text("originating system").strip())
        lay = P.cti_layout(sc, h.integer("axial compression", 11), h.integer("maximum ring difference", sc.rings - 1))
    except ValueError as exc:
        raise InputError(f"{h.path}: {exc}") from None
    n = h.integer("number of normalization components")
    if not 1 <= n <= MAX_COMPONENTS:
        raise InputError(f"{h.path}: %number of normalization components is {n}; expected 1 to {MAX_COMPONENTS}")
    names = [h.text(f"normalization component [{k}]").lower() for k in range(1, n + 1)]
    sizes = [tuple(h.integers(f"matrix size [{k}]")) for k in range(1, n + 1)]
    offsets = [h.integer(f"data offset in bytes [{k}]") for k in range(1, n + 1)]
    order = (h.text("image data byte order") or h.text("imagedata byte order") or "LITTLEENDIAN").lower()
    if order not in ("littleendian", "bigendian"):
        raise InputError(f"{h.path}: image data byte order must be LITTLEENDIAN or BIGENDIAN, got {order!r}")
    data = h.resolve(h.require("name of data file").strip())
    raw = _read_blocks(h.path, data, sizes, offsets, np.dtype("<f4" if order == "littleendian" else ">f4"))
    blocks = dict(zip(names, raw, strict=True))
    missing = [m for m in MAIN if m not in blocks]
    if missing:
        raise InputError(f"{h.path}: no {', '.join(missing)} component (has {', '.join(names)})")
    comp = NormComponents(sc, *(blocks[m] for m in MAIN), lay,
                          {k: v for k, v in blocks.items() if k not in MAIN}, h.path)
    for name, want in comp.shapes().items():
        got = sizes[names.index(name)]
        if got != want:
            raise InputError(f"{h.path}: {name} has %matrix size {list(got)}, {sc.name} needs {list(want)}")
    return _reshaped(comp)


def _read_blocks(header: Path, data: Path, sizes: list, offsets: list, dtype: np.dtype) -> list[np.ndarray]:
    """Each component's values (flat, native byte order); the file must end with the last one."""
    try:
        st = data.stat()
    except OSError:
        raise InputError(f"{header}: normalisation data file not found: {data}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{header}: normalisation data file {data} is not a regular file")
    if min(offsets, default=0) < 0 or any(min(s, default=0) < 1 for s in sizes):
        raise InputError(f"{header}: data offsets {offsets} and matrix sizes {sizes} must be positive")
    size = st.st_size
    ends = [o + int(np.prod(s)) * 4 for o, s in zip(offsets, sizes, strict=True)]
    if max(ends, default=0) > MAX_BYTES:
        raise InputError(f"{header}: the components end at byte {max(ends)}: too large for a normalisation "
                         f"(limit {MAX_BYTES}); the wrong header?")
    if size != max(ends, default=0):
        what = "truncated" if size < max(ends) else "longer than the header says"
        raise InputError(f"{data}: {what}: the components end at byte {max(ends)}, the file has {size}")
    with open(data, "rb") as fh:
        raw = fh.read()
    return [np.frombuffer(raw, dtype, int(np.prod(s)), o).astype(np.float64)
            for s, o in zip(sizes, offsets, strict=True)]


def _reshaped(c: NormComponents) -> NormComponents:
    sc = c.scanner
    return NormComponents(sc, c.geometric.reshape(2 * sc.rings - 1, sc.bins),
                          c.interference.reshape(sc.bins, sc.block_trans),
                          c.crystal.reshape(sc.rings, sc.detectors_per_ring), c.axial, c.norm_layout, c.extra, c.path)


def write_norm(stem: str | os.PathLike, comp: NormComponents) -> Path:
    """Write ``<stem>.n`` + ``<stem>.n.hdr`` with the keys a Siemens console writes (tests)."""
    stem = Path(stem)
    blocks = [(name, np.asarray(arr, "<f4"), comp.shapes()[name]) for name, arr in
              zip(MAIN, (comp.geometric, comp.interference, comp.crystal, comp.axial), strict=True)]
    blocks += [(name, np.asarray(arr, "<f4"), (np.asarray(arr).size,)) for name, arr in comp.extra.items()]
    data = stem.with_name(stem.name + ".n")
    offsets = np.cumsum([0] + [arr.nbytes for _, arr, _ in blocks[:-1]]).tolist()
    with atomic_open(data) as fh:
        for _, arr, _ in blocks:
            fh.write(arr.tobytes())
    sc, lay = comp.scanner, comp.norm_layout
    items = [("!INTERFILE", ""), ("!originating system", sc.stir_name),
             ("%SMS-MI header name space", "normalization header"), ("!name of data file", data.name),
             ("image data byte order", "LITTLEENDIAN"), ("!PET data type", "normalization"),
             ("number format", "float"), ("number of bytes per pixel", 4),
             ("%number of normalization components", len(blocks))]
    items += [(f"%normalization component [{k + 1}]", name) for k, (name, _, _) in enumerate(blocks)]
    items += [(f"data offset in bytes [{k + 1}]", o) for k, o in enumerate(offsets)]
    items += [(f"%matrix size [{k + 1}]", list(s)) for k, (_, _, s) in enumerate(blocks)]
    items += [("%axial compression", lay.span), ("%maximum ring difference", max(lay.max_rd)),
              ("number of rings", sc.rings)]
    header = stem.with_name(stem.name + ".n.hdr")
    atomic_write_text(header, format_header(items))
    return header
