"""The files scanners and STIR really write: real layouts (mMR span 11 / span 1, mCT TOF with view
mashing, Vision 600, GE Signa), Siemens prompts + randoms in one file, inline comments, compressed
data, main headers with Windows paths, headers of other kinds, templates; and the headers hpc
writes, checked against the rules STIR reads them with (InterfileHeader, InterfileHeaderSiemens)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from hpc.errors import InputError, OutputError
from hpc.io import headers as H
from hpc.io.headers import read_header
from hpc.io.interfile import format_header, parse_header
from hpc.io.sinogram import SinogramReader, SinogramWriter, output_bytes, write_sinogram
from hpc.io.spec import SinogramSpec
from hpc.physics import geometry as G
from hpc.physics import projdata as P

SMALL = G.Scanner("small", "hpc small", rings=8, detectors_per_ring=24, block_trans=4, block_axial=4, bins=14,
                  inner_radius_mm=95.0, doi_mm=5.0, bin_size_mm=13.1, ring_spacing_mm=4.0, virtual_trans=1,
                  tof_bins=5, tof_bin_ps=100.0, tof_fwhm_ps=300.0)


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setitem(G.SCANNERS, "small", SMALL)
    return SMALL


def header_only(tmp_path, layout: P.Layout, fmt: str, dtype="<u2") -> os.PathLike:
    """A real-size file without writing its GBs: the header hpc writes plus a sparse data file."""
    name = f"{layout.scanner.name}_{fmt}"
    ext = ".s.hdr" if fmt == "siemens" else ".hs"
    spec = SinogramSpec(tmp_path / f"{name}.s", np.dtype(dtype), 0, layout.tof_bins, layout.segments,
                        layout.axial_counts, layout.views, layout.bins, "sinogram" if fmt == "siemens" else "view",
                        fmt, ring_diffs=tuple(zip(layout.min_rd, layout.max_rd, strict=True)))
    items = H.siemens_items(spec, layout) if fmt == "siemens" else H.stir_items(spec, layout)
    (tmp_path / f"{name}{ext}").write_text(format_header(items + [("!END OF INTERFILE", "")]))
    with open(spec.data_path, "wb") as fh:
        fh.truncate(spec.nbytes)
    return tmp_path / f"{name}{ext}"


REAL = [("mmr", {}), ("mmr", {"span": 1}), ("mct", {}), ("vision600", {}), ("signa", {})]


@pytest.mark.parametrize("fmt", ["siemens", "stir"])
@pytest.mark.parametrize(("name", "kw"), REAL, ids=[f"{n}-{k.get('span', 'vendor')}" for n, k in REAL])
def test_real_layouts_read_back(tmp_path, name, kw, fmt):
    """Every preset's layout, written as hpc writes it, reads back as the same layout (Siemens
    headers carry span + maximum ring difference, STIR headers ring differences per segment)."""
    lay = P.cti_layout(G.SCANNERS[name], **kw)
    spec = read_header(header_only(tmp_path, lay, fmt))
    got = spec.layout()
    assert (got.segments, got.min_rd, got.max_rd, got.axial_counts) == \
        (lay.segments, lay.min_rd, lay.max_rd, lay.axial_counts)
    assert (got.views, got.view_mashing, got.bins, got.tof_bins) == (lay.views, lay.view_mashing, lay.bins,
                                                                     lay.tof_bins)
    assert spec.scanner == G.SCANNERS[name].stir_name


def test_real_sizes():
    mmr, mct = P.default_layout(G.SCANNERS["mmr"]), P.default_layout(G.SCANNERS["mct"])
    assert (mmr.planes, len(mmr.segments), P.cti_layout(G.SCANNERS["mmr"], span=1).planes) == (837, 11, 4084)
    assert (mct.bins, mct.views, mct.planes, mct.tof_bins) == (400, 168, 621, 13)


LAYOUTS = [dict(span=3, max_ring_diff=4, view_mashing=2, tof_mashing=0), dict(span=1, max_ring_diff=2),
           dict(span=3, max_ring_diff=7, tof_mashing=1), dict(span=5, max_ring_diff=5, view_mashing=2, tof_mashing=5)]


@pytest.mark.parametrize("fmt", ["siemens", "stir"])
@pytest.mark.parametrize("kw", LAYOUTS)
def test_data_round_trip_every_layout(tmp_path, small, kw, fmt):
    """Span 1 / compressed, view-mashed, TOF (mashed to 1 bin too): written by write_sinogram,
    read back bit for bit in canonical order, with the segment numbers STIR gives the planes."""
    lay = P.cti_layout(small, **kw)
    data = np.random.default_rng(1).integers(0, 60000, (lay.tof_bins, lay.planes, *lay.slice_shape)).astype("<u2")
    spec = read_header(write_sinogram(tmp_path / "x", data, fmt, layout=lay))
    assert spec.layout() == lay
    with SinogramReader(spec) as r:
        assert np.array_equal(r.read(0, spec.num_slices), data.reshape(-1, *lay.slice_shape))
    seg, axial = lay.plane_segment_axial()
    tof, seg2, axial2 = spec.meta()
    assert np.array_equal(seg2[:lay.planes], seg) and np.array_equal(axial2[:lay.planes], axial)


def test_siemens_refuses_layouts_it_cannot_state(tmp_path, small):
    lay = P.Layout(small, (0, 1), (0, 1), (0, 1), (8, 7))
    with pytest.raises(ValueError, match="span / maximum ring difference layouts"):
        write_sinogram(tmp_path / "x", np.zeros((15, 12, 14), "<u2"), "siemens", layout=lay)


def _siemens_two_sets(tmp_path, prompts, randoms, preamble=64, name="pr"):
    """A Siemens file as the mMR console writes it: prompts then randoms in one .s file."""
    t, p, v, x = prompts.shape
    with open(tmp_path / f"{name}.s", "wb") as fh:
        fh.write(b"\x07" * preamble)
        fh.write(prompts.astype("<i2").tobytes())
        fh.write(randoms.astype("<i2").tobytes())
    second = preamble + prompts.astype("<i2").nbytes
    text = f"""!INTERFILE:=
%comment:=SMS-MI sinogram common attributes
!originating system:=2008
%SMS-MI header name space:=sinogram subheader
!name of data file:={name}.s
!GENERAL IMAGE DATA:=
!type of data:=PET
imagedata byte order:=LITTLEENDIAN
!PET data type:=emission
number format:=signed integer
!number of bytes per pixel:=2
number of dimensions:=3
matrix axis label[1]:=sinogram projections
matrix size[1]:={x}
matrix axis label[2]:=sinogram views
matrix size[2]:={v}
matrix axis label[3]:=number of sinograms
matrix size[3]:={p} ; all segments
number of rings:=64
%axial compression:=11
%maximum ring difference:=60
%number of segments:=1
%segment table:={{{p}}}
%total number of sinograms:={p}
number of scan data types:=2
scan data type description[1]:=prompts
scan data type description[2]:=randoms
data offset in bytes[1]:={preamble}
data offset in bytes[2]:={second}
%total prompts:=123456
!END OF INTERFILE:=
"""
    (tmp_path / f"{name}.s.hdr").write_text(text)
    return tmp_path / f"{name}.s.hdr"


def test_prompts_and_randoms_in_one_siemens_file(tmp_path):
    """Two scan data types: the prompts are the data, the randoms a second data set; a repaired
    copy keeps every key of the source header and the randoms bytes."""
    rng = np.random.default_rng(2)
    shape = (1, 127, 252, 344)
    prompts, randoms = rng.integers(0, 30, shape), rng.integers(0, 3, shape)
    hdr = _siemens_two_sets(tmp_path, prompts, randoms)
    spec = read_header(hdr)
    assert (spec.offset, spec.datasets) == (64, (("randoms", 64 + prompts.size * 2),))
    assert spec.layout().segments == (0,) and spec.layout().span == 11 and spec.scanner == "2008"
    with SinogramReader(spec) as r, SinogramReader(spec.dataset("randoms")) as rr:
        assert np.array_equal(r.read(0, 127), prompts[0]) and np.array_equal(rr.read(120, 127), randoms[0, 120:])
    with SinogramWriter(spec, tmp_path / "out.s.hdr", "repaired by a test") as w:
        w.write(0, np.full((127, 252, 344), 9, np.int16))
        out = w.commit()
    src, dst = (open(p, "rb").read() for p in (spec.data_path, tmp_path / "out.s"))
    assert len(src) == len(dst) and src[:64] == dst[:64] and src[64 + prompts.size * 2:] == dst[64 + prompts.size * 2:]
    a, b = parse_header(hdr).fields, parse_header(out).fields
    assert {k: v for k, v in a.items() if k != "name of data file"} == \
        {k: v for k, v in b.items() if k != "name of data file"}
    truncated = tmp_path / "pr.s"
    os.truncate(truncated, len(src) - 2)
    with pytest.raises(InputError, match="truncated"):
        read_header(hdr)


def test_prompts_and_randoms_output_reserved_whole_on_a_full_disk(tmp_path, tmpfs):
    """The writer reserves the whole output (prompts AND randoms) before copying anything: on a disk
    with room for the prompts but not the randoms it fails as one line naming the data file and
    leaves nothing. (Reserving only the prompts, the randoms copy got a short write from the full
    disk, which pwrite reports as a count, not an error: the truncated data file was committed and
    the error came only from the header, naming it.)"""
    rng = np.random.default_rng(3)
    prompts, randoms = rng.integers(0, 30, (1, 127, 8, 10)), rng.integers(0, 3, (1, 127, 8, 10))
    spec = read_header(_siemens_two_sets(tmp_path, prompts, randoms))
    size = os.path.getsize(spec.data_path)  # 64 + 2 x 20320 bytes
    assert output_bytes(spec) == size > spec.offset + spec.nbytes
    disk = tmpfs("28k")  # 7 pages: the preamble + prompts (5 pages) fit, the whole file (10) does not
    before = open(spec.data_path, "rb").read()
    _repair_onto_full_disk(spec, disk, failing=disk / "out.s")
    assert open(spec.data_path, "rb").read() == before


def _repair_onto_full_disk(spec, disk, failing) -> None:
    """Write a repaired copy of ``spec`` onto ``disk``: one line naming ``failing``, nothing left."""
    with pytest.raises(OutputError) as err:
        with SinogramWriter(spec, disk / "out.s.hdr", "repaired by a test") as w:
            w.write(0, np.full((spec.num_slices, spec.views, spec.bins), 9, np.int16))
            w.commit()
    msg = str(err.value)
    assert msg.startswith(f"{failing}: no space left on device") and "\n" not in msg, msg
    assert list(disk.iterdir()) == []


def test_full_disk_at_the_header_leaves_neither_file(tmp_path, tmpfs):
    """The header is written before the data is renamed into place: a disk that holds the data
    file exactly (2 pages) but not the header fails as one line naming the header and leaves
    nothing (the data used to be committed first, then the header failed)."""
    rng = np.random.default_rng(4)
    prompts, randoms = rng.integers(0, 30, (1, 127, 4, 4)), rng.integers(0, 3, (1, 127, 4, 4))
    spec = read_header(_siemens_two_sets(tmp_path, prompts, randoms))
    assert output_bytes(spec) == os.path.getsize(spec.data_path) == 8192  # 64 + 2 x 127 x 16 x 2
    disk = tmpfs("8k")
    _repair_onto_full_disk(spec, disk, failing=disk / "out.s.hdr")


def test_inline_comments_read_as_stir_reads_them(tmp_path):
    data = np.arange(2 * 3 * 4, dtype="<u2").reshape(2, 3, 4)
    data.tofile(tmp_path / "c.s")
    (tmp_path / "c.s.hdr").write_text(
        "!INTERFILE:=\n!name of data file:=c.s\nnumber format:=unsigned integer\n!number of bytes per pixel:=2 ; u16\n"
        "number of dimensions:=3\nmatrix size [1] := 4 ; 8\n!matrix size [2]:=3;6\n!matrix_size [3] := 2 ; 252\n"
        "%segment table:={2} ; all\ndata offset in bytes[1]:=0\n!END OF INTERFILE:=\n")
    spec = read_header(tmp_path / "c.s.hdr")
    assert (spec.bins, spec.views, spec.planes) == (4, 3, 2)


def test_compressed_data_is_refused(tmp_path):
    hdr = _siemens_two_sets(tmp_path, np.zeros((1, 1, 2, 3)), np.zeros((1, 1, 2, 3)), 0)
    hdr.write_text(hdr.read_text().replace("%total prompts", "%compression:=on\n%total prompts"))
    with pytest.raises(InputError, match=r"compressed \(%compression := on\); decompress it with the vendor's tools"):
        read_header(hdr)


def test_main_header_with_windows_paths_and_empty_header_slot(tmp_path):
    data = np.random.default_rng(0).integers(0, 9, (1, 127, 252, 344))
    (tmp_path / "LM-00").mkdir()
    _siemens_two_sets(tmp_path / "LM-00", data, data, 0, name="x")
    main = tmp_path / "study" / "x.mhdr"
    main.parent.mkdir()
    main.write_text("!INTERFILE:=\n!originating system:=2008\n%total number of data sets:=1\n"
                    "%data set [1]:={30,..\\LM-00\\x.s.hdr,..\\LM-00\\x.s}\n!END OF INTERFILE:=\n")
    assert read_header(main).header_path == tmp_path / "study" / ".." / "LM-00" / "x.s.hdr"
    main.write_text(main.read_text().replace("{30,..\\LM-00\\x.s.hdr,", "{0,,"))
    spec = read_header(main)  # only the data file: its header is x.s.hdr beside it
    assert spec.planes == 127 and spec.datasets


@pytest.mark.parametrize(("name", "text", "kind"), [
    ("mu.hv", "!PET data type := Image\nmatrix axis label [1] := x\nmatrix axis label [2] := y\n", "an image"),
    ("umap.h33", "!type of data := PET\nmatrix axis label [1] := x\nmatrix axis label [2] := y\n", "an image"),
    ("norm.n.hdr", "%SMS-MI header name space:=normalization header\n!PET data type:=Normalization\n",
     "normalisation data"),
    ("lm.l.hdr", "data format := CoincidenceList\n", "list mode data"),
    ("spect.hs", "!type of data := Tomographic\n!SPECT STUDY (General) :=\n", "SPECT data"),
    ("tx.s.hdr", "!PET data type := Transmission\n", "transmission data"),
])
def test_other_kinds_are_refused_by_name(tmp_path, name, text, kind):
    (tmp_path / name).write_text("!INTERFILE :=\nname of data file := d.i\n" + text + "!END OF INTERFILE :=\n")
    with pytest.raises(InputError, match=f"describes {kind}, not an emission sinogram"):
        read_header(tmp_path / name)


def test_templates_are_named(tmp_path):
    lay = P.default_layout(G.SCANNERS["mmr"])
    hdr = header_only(tmp_path, lay, "stir")
    os.truncate(tmp_path / "mmr_stir.s", 0)  # STIR ships template_span11.hs with an empty .s
    with pytest.raises(InputError, match="data file mmr_stir.s is empty: a template"):
        read_header(hdr)
    hdr.write_text(hdr.read_text().replace("name of data file := mmr_stir.s", "name of data file := mmr_stir.hs"))
    with pytest.raises(InputError, match="names itself as its data file: a template"):
        read_header(hdr)


def stir_would_read(path) -> list[str]:
    """What STIR's header readers would object to, re-derived from their rules: a recognised
    `originating system`, `applied corrections` (else STIR assumes arc-corrected data), ring
    differences that make STIR's layout (or, Siemens: span, maximum ring difference and number of
    rings giving the segment table in the order 0, -1, +1, ...), scanner parameters equal to STIR's."""
    h = parse_header(path)
    problems = []
    try:
        sc = G.get_scanner(h.text("originating system"))
    except ValueError:
        return ["originating system not one STIR knows"]
    if h.get("applied corrections") is None:
        problems.append("no applied corrections: STIR would assume arc-corrected data")
    if h.get("segment table") is not None:  # Siemens
        if h.integer("number of rings", sc.rings) != sc.rings:
            problems.append("number of rings")
        lo, _ = P.cti_ring_differences(sc.rings, h.integer("axial compression"), h.integer("maximum ring difference"))
        want = [2 * sc.rings - 1 - (2 * lo[abs(s)] if s else 0) if h.integer("axial compression") > 1
                else sc.rings - abs(s) for s in P.segment_storage_order(len(h.integers("segment table")))]
        if h.integers("segment table") != want or h.integer("number of segments") != len(want):
            problems.append(f"segment table {h.integers('segment table')} != {want}")
        if h.text("pet data type").lower() != "emission":
            problems.append("PET data type")
    else:
        for key, value in (("number of rings", sc.rings), ("number of detectors per ring", sc.detectors_per_ring),
                           ("maximum number of non-arc-corrected bins", sc.bins)):
            if h.integer(key, -1) != value:
                problems.append(key)
        for key, value in (("inner ring diameter (cm)", sc.inner_radius_mm / 5),
                           ("average depth of interaction (cm)", sc.doi_mm / 10),
                           ("distance between rings (cm)", sc.ring_spacing_mm / 10),
                           ("default bin size (cm)", sc.bin_size_mm / 10)):
            if abs(h.number(key, -1.0) - value) > 0.001:
                problems.append(key)
    return problems


@pytest.mark.parametrize("fmt", ["siemens", "stir"])
@pytest.mark.parametrize("name", ["mmr", "mct", "vision600"])
def test_headers_hpc_writes_are_stir_input(tmp_path, name, fmt):
    hdr = header_only(tmp_path, P.default_layout(G.SCANNERS[name]), fmt)
    assert stir_would_read(hdr) == []
    text = hdr.read_text()
    assert f"originating system := {G.SCANNERS[name].stir_name}" in text
    if name == "mmr" and fmt == "stir":  # STIR's own template for the mMR says the same
        for line in ("Inner ring diameter (cm) := 65.6", "Average depth of interaction (cm) := 0.7",
                     "Distance between rings (cm) := 0.40625", "Default bin size (cm) := 0.208626",
                     "minimum ring difference per segment := {-5,-16,6,-27,17,-38,28,-49,39,-60,50}"):
            assert line in text
