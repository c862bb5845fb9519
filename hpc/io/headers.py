"""Sinogram layouts from Interfile headers (STIR ``.hs``, Siemens ``.s.hdr`` / ``.mhdr``), and the
headers hpc writes, which STIR reads back (its InterfileHeader / InterfileHeaderSiemens rules).

Reading (:func:`read_header`):
- STIR: ``matrix axis label [k]`` gives the storage order (view-major ``segment, view, axial
  coordinate, tangential coordinate`` or sinogram-major), ``timing positions`` a fifth TOF axis;
  segment numbers and ring differences come from ``minimum/maximum ring difference per segment``.
- Siemens: planes in ``%segment table`` order 0, -1, +1, ... (:func:`hpc.physics.projdata.segment_storage_order`),
  ring differences from ``%axial compression`` and ``%maximum ring difference``; TOF blocks in the
  order 0, +1, -1, ...; ``number of scan data types := 2`` with ``scan data type description [k]``
  and ``data offset in bytes [k]`` (prompts + randoms in one file): the prompts are the data, the
  others are listed in ``SinogramSpec.datasets``. A main header (``.mhdr``) names its sub-header in
  ``%data set [1] := {type, header, data}`` (Windows paths and ``{0,,file}`` accepted).
- Refused, naming why: compressed data (``%compression := on``: decompress with the vendor's tools
  first), headers of images, normalisation, list mode, SPECT or transmission data, and templates
  (a header whose data file is itself or empty).

Writing (:func:`stir_items`, :func:`siemens_items`): the layout keys of a :class:`hpc.physics.projdata.Layout`
with STIR's name of the scanner as ``originating system`` and the scanner parameters STIR checks.
"""
from __future__ import annotations

import os

from hpc.errors import InputError
from hpc.io.interfile import Header, data_kind, number_format, numpy_dtype, parse_header, parse_list
from hpc.io.spec import SinogramSpec, check_data_file
from hpc.physics import geometry as G
from hpc.physics import projdata as P

STIR_ORDERS = {("segment", "view", "axial coordinate", "tangential coordinate"): "view",
               ("segment", "axial coordinate", "view", "tangential coordinate"): "sinogram"}


def read_header(path: str | os.PathLike) -> SinogramSpec:
    """Parse a STIR or Siemens Interfile header (auto-detected) and check its data file."""
    h = _follow_main_header(parse_header(path))
    kind = data_kind(h)
    if kind is not None:
        raise InputError(f"{h.path}: this header describes {kind}, not an emission sinogram "
                         "(hpc converts and repairs emission sinograms only)")
    if h.text("compression").lower() == "on":
        raise InputError(f"{h.path}: the data is compressed (%compression := on); decompress it with the vendor's "
                         "tools first (Siemens e7tools: intfcompr -e FILE.mhdr --oe NEW.mhdr)")
    labels = [v.lower().strip() for k, v in h.fields.items() if k.startswith("matrix axis label")]
    spec = _stir_spec(h) if "segment" in labels else _siemens_spec(h)
    if spec.data_path.resolve() == h.path.resolve():
        raise InputError(f"{h.path}: names itself as its data file: a template (a layout without data); "
                         "give the header of an acquisition")
    if spec.data_path.is_file() and spec.data_path.stat().st_size == 0:
        raise InputError(f"{h.path}: its data file {spec.data_path.name} is empty: a template (a layout without "
                         "data); give the header of an acquisition")
    return check_data_file(spec)


def _follow_main_header(h: Header) -> Header:
    """A Siemens main header (.mhdr): the first data set's sub-header, with the main keys added."""
    if h.get("matrix size [1]") is not None or h.get("data set [1]") is None:
        return h
    items = parse_list(h.require("data set [1]"), keep_empty=True)  # {type, header, data}
    names = [n for n in items[1:3] if n]
    if not names:
        raise InputError(f"{h.path}: data set [1] should be {{type,header,data}}, got {h.get('data set [1]')!r}")
    header = next((n for n in names if n.lower().endswith((".hdr", ".hs"))), names[-1] + ".hdr")
    sub = parse_header(h.resolve(header))
    return Header(sub.path, {**h.fields, **sub.fields}, sub.lines)


MAX_DATA_SETS = 8  # Siemens files hold 1 (prompts) or 2 (prompts + randoms) data sets


def _offsets(h: Header, n: int) -> list[int]:
    if h.get("data offset in bytes [1]") is not None:
        return [h.integer(f"data offset in bytes [{k}]", 0) for k in range(1, n + 1)]
    if h.get("data offset in bytes") is not None:
        return [h.integer("data offset in bytes")]
    return [2048 * h.integer("data starting block", 0)]  # Interfile 3.3 blocks of 2048 bytes


def _stir_spec(h: Header) -> SinogramSpec:
    ndim = h.integer("number of dimensions", 4)
    labels = {k: " ".join(h.require(f"matrix axis label [{k}]").lower().split()) for k in range(1, ndim + 1)}
    axes = tuple(labels[k] for k in sorted(labels, reverse=True))  # slowest first
    tof = 1
    if ndim == 5 and axes[0] == "timing positions":
        tof, axes = h.integer("matrix size [5]"), axes[1:]
    if axes not in STIR_ORDERS:
        raise InputError(f"{h.path}: unsupported matrix axis labels {', '.join(axes)} (expected segment, "
                         "view|axial coordinate, axial coordinate|view, tangential coordinate)")
    order = STIR_ORDERS[axes]
    k_axial, k_view = (2, 3) if order == "view" else (3, 2)
    n_seg = h.integer("matrix size [4]")
    axial = h.integers(f"matrix size [{k_axial}]")
    if len(axial) != n_seg:
        raise InputError(f"{h.path}: matrix size [{k_axial}] lists {len(axial)} axial counts for {n_seg} segments")
    segments, ring_diffs = _stir_segments(h, n_seg)
    return SinogramSpec(
        data_path=h.resolve(h.require("name of data file")), dtype=numpy_dtype(h, "bigendian"),
        offset=_offsets(h, 1)[0], tof_bins=tof, segments=segments, axial_counts=tuple(axial),
        views=h.integer(f"matrix size [{k_view}]"), bins=h.integer("matrix size [1]"), order=order, kind="stir",
        header_path=h.path, fields=dict(h.fields), ring_diffs=ring_diffs, scanner=h.text("originating system"))


def _stir_segments(h: Header, n: int) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...] | None]:
    """Segment numbers in storage order and their ring differences. STIR numbers the segment
    holding ring difference 0 as 0 and the others outward by their ring differences; without ring
    differences, STIR's default storage sequence 0, -1, +1, ..."""
    if h.get("minimum ring difference per segment") is None:
        return P.segment_storage_order(n), None
    lo = h.integers("minimum ring difference per segment")
    hi = h.integers("maximum ring difference per segment")
    if len(lo) != n or len(hi) != n:
        raise InputError(f"{h.path}: ring differences list {len(lo)}/{len(hi)} segments, matrix size says {n}")
    zero = [k for k in range(n) if lo[k] <= 0 <= hi[k]]
    if len(zero) != 1:
        raise InputError(f"{h.path}: exactly one segment must contain ring difference 0")
    rank = sorted(range(n), key=lambda k: lo[k])
    number = {k: rank.index(k) - rank.index(zero[0]) for k in range(n)}
    return tuple(number[k] for k in range(n)), tuple(zip(lo, hi, strict=True))


def _siemens_ring_diffs(h: Header, n_seg: int) -> tuple[tuple[int, int], ...] | None:
    """Ring differences of the Siemens segments (storage order) from %axial compression and
    %maximum ring difference, with the rings from `number of rings` or the scanner preset."""
    if h.get("axial compression") is None or h.get("maximum ring difference") is None:
        return None
    rings = h.integer("number of rings", 0)
    if not rings:
        try:
            rings = G.get_scanner(h.text("originating system")).rings
        except ValueError:
            return None
    try:
        lo, hi = P.cti_ring_differences(rings, h.integer("axial compression"), h.integer("maximum ring difference"))
    except ValueError as exc:
        raise InputError(f"{h.path}: {exc}") from None
    segs = P.segment_storage_order(n_seg)
    if max(abs(s) for s in segs) >= len(lo):
        raise InputError(f"{h.path}: {n_seg} segments, but span {h.integer('axial compression')} and maximum ring "
                         f"difference {h.integer('maximum ring difference')} make {2 * len(lo) - 1}")
    return tuple((lo[s], hi[s]) if s >= 0 else (-hi[-s], -lo[-s]) for s in segs)


def _siemens_spec(h: Header) -> SinogramSpec:
    planes = h.integer("matrix size [3]")
    table = h.integers("segment table") if h.get("segment table") is not None else [planes]
    if sum(table) != planes:
        raise InputError(f"{h.path}: segment table sums to {sum(table)} sinograms, matrix size [3] is {planes}")
    tof_default = h.integer("matrix size [4]") if h.integer("number of dimensions", 3) == 4 else 1
    n_sets = h.integer("number of scan data types", 1)
    if not 1 <= n_sets <= MAX_DATA_SETS:  # a list per data set is built below: bound it first
        raise InputError(f"{h.path}: number of scan data types is {n_sets}; expected 1 to {MAX_DATA_SETS} "
                         "(prompts, randoms)")
    names = [h.text(f"scan data type description [{k}]").lower() or ("prompts" if k == 1 else f"data set {k}")
             for k in range(1, n_sets + 1)]
    offsets = _offsets(h, n_sets)
    if len(offsets) != n_sets:
        raise InputError(f"{h.path}: {n_sets} scan data types but {len(offsets)} data offsets")
    main = names.index("prompts") if "prompts" in names else 0
    return SinogramSpec(
        data_path=h.resolve(h.require("name of data file")), dtype=numpy_dtype(h, "littleendian"),
        offset=offsets[main], tof_bins=h.integer("number of tof time bins", tof_default),
        segments=P.segment_storage_order(len(table)), axial_counts=tuple(table),
        views=h.integer("matrix size [2]"), bins=h.integer("matrix size [1]"), order="sinogram",
        kind="siemens", header_path=h.path, fields=dict(h.fields), ring_diffs=_siemens_ring_diffs(h, len(table)),
        scanner=h.text("originating system"),
        datasets=tuple((names[k], offsets[k]) for k in range(n_sets) if k != main))


# ---------------------------------------------------------------- writing
def _scanner_items(sc: G.Scanner) -> list[tuple[str, object]]:
    """STIR's `Scanner parameters` block: the values STIR checks against its own scanner table."""
    items: list[tuple[str, object]] = [
        ("Scanner parameters", ""), ("Scanner type", sc.stir_name), ("Number of rings", sc.rings),
        ("Number of detectors per ring", sc.detectors_per_ring),
        ("Inner ring diameter (cm)", round(sc.inner_radius_mm * 2 / 10, 6)),
        ("Average depth of interaction (cm)", round(sc.doi_mm / 10, 6)),
        ("Distance between rings (cm)", round(sc.ring_spacing_mm / 10, 6)),
        ("Default bin size (cm)", round(sc.bin_size_mm / 10, 7)),
        ("View offset (degrees)", round(sc.tilt_rad * 180 / 3.141592653589793, 6)),
        ("Maximum number of non-arc-corrected bins", sc.bins),
        ("Default number of arc-corrected bins", sc.arc_bins or sc.bins)]
    if sc.tof_bins > 1:
        items += [("Maximum number of (unmashed) TOF time bins", sc.tof_bins),
                  ("Size of unmashed TOF time bins (ps)", round(sc.tof_bin_ps, 6)),
                  ("TOF timing resolution (ps)", sc.tof_fwhm_ps)]
    items += [("Number of crystals per block in axial direction", sc.block_axial),
              ("Number of crystals per block in transaxial direction", sc.block_trans),
              ("end scanner parameters", "")]
    return items


def stir_items(spec: SinogramSpec, layout: P.Layout | None) -> list[tuple[str, object]]:
    """Header keys of a STIR projection-data file (view-major), as STIR's own writer orders them."""
    fmt, size, order = number_format(spec.dtype)
    tof = [("number of dimensions", 5), ("matrix axis label [5]", "timing positions"),
           ("!matrix size [5]", spec.tof_bins)] if spec.tof_bins > 1 else [("number of dimensions", 4)]
    rd = ([r[0] for r in spec.ring_diffs], [r[1] for r in spec.ring_diffs]) if spec.ring_diffs else \
        (list(spec.segments), list(spec.segments))  # span 1: ring differences = segment numbers
    items: list[tuple[str, object]] = [
        ("!INTERFILE", ""), ("!imaging modality", "PT"), ("name of data file", spec.data_path.name)]
    if layout is not None:
        items.append(("originating system", layout.scanner.stir_name))
    items += [
        ("!version of keys", "STIR4.0"), ("!GENERAL DATA", ""), ("!GENERAL IMAGE DATA", ""), ("!type of data", "PET"),
        ("imagedata byte order", order), ("!PET STUDY (General)", ""), ("!PET data type", "Emission"),
        ("applied corrections", "{None}"), ("!number format", fmt), ("!number of bytes per pixel", size), *tof,
        ("matrix axis label [4]", "segment"), ("!matrix size [4]", len(spec.segments)),
        ("matrix axis label [3]", "view"), ("!matrix size [3]", spec.views),
        ("matrix axis label [2]", "axial coordinate"), ("!matrix size [2]", list(spec.axial_counts)),
        ("matrix axis label [1]", "tangential coordinate"), ("!matrix size [1]", spec.bins),
        ("minimum ring difference per segment", rd[0]), ("maximum ring difference per segment", rd[1])]
    if spec.tof_bins > 1 and layout is not None:
        items.append(("%TOF mashing factor", layout.tof_mashing))
    if layout is not None:
        items += _scanner_items(layout.scanner)
    return items + [("data offset in bytes [1]", 0), ("number of time frames", 1)]


def siemens_items(spec: SinogramSpec, layout: P.Layout | None) -> list[tuple[str, object]]:
    """Header keys of a Siemens sinogram (sinogram-major, TOF blocks 0, +1, -1, ...) that STIR's
    InterfileHeaderSiemens reads: span and maximum ring difference for compressed layouts."""
    fmt, size, order = number_format(spec.dtype)
    items: list[tuple[str, object]] = [("!INTERFILE", "")]
    if layout is not None:
        items.append(("!originating system", layout.scanner.stir_name))
    items += [("!name of data file", spec.data_path.name), ("!GENERAL DATA", ""), ("!GENERAL IMAGE DATA", ""),
              ("!type of data", "PET"), ("imagedata byte order", order), ("!PET data type", "emission"),
              ("applied corrections", "{none}"), ("number format", fmt), ("!number of bytes per pixel", size)]
    dims = [("number of dimensions", 4 if spec.tof_bins > 1 else 3),
            ("matrix axis label [1]", "sinogram projections"), ("matrix size [1]", spec.bins),
            ("matrix axis label [2]", "sinogram views"), ("matrix size [2]", spec.views),
            ("matrix axis label [3]", "number of sinograms"), ("matrix size [3]", spec.planes)]
    if spec.tof_bins > 1:
        dims += [("matrix axis label [4]", "TOF bin"), ("matrix size [4]", spec.tof_bins)]
    items += dims + [("%number of TOF time bins", spec.tof_bins)]
    if layout is not None:
        if spec.tof_bins > 1:
            items.append(("%TOF mashing factor", layout.tof_mashing))
        items += [("number of rings", layout.scanner.rings), ("%axial compression", layout.span),
                  ("%maximum ring difference", max(max(layout.max_rd), -min(layout.min_rd)))]
    return items + [("%number of segments", len(spec.segments)), ("%segment table", list(spec.axial_counts)),
                    ("%total number of sinograms", spec.planes), ("number of scan data types", 1),
                    ("scan data type description [1]", "prompts"), ("data offset in bytes [1]", 0)]


def check_siemens_layout(layout: P.Layout) -> None:
    """A Siemens header states span and maximum ring difference: the layout must be STIR's for them."""
    mrd = max(max(layout.max_rd), -min(layout.min_rd))
    top = (len(layout.segments) - 1) // 2
    want = P.cti_layout(layout.scanner, layout.span, mrd, layout.view_mashing, max_segment=top)
    if (want.segments, want.min_rd, want.max_rd, want.axial_counts) != \
            (layout.segments, layout.min_rd, layout.max_rd, layout.axial_counts):
        raise ValueError("a Siemens header describes span / maximum ring difference layouts (segments 0, -1, +1, "
                         f"...) only; this one has segments {list(layout.segments)} with ring differences "
                         f"{list(layout.min_rd)}..{list(layout.max_rd)} (write it with fmt='stir')")


