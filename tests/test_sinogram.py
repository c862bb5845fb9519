"""Sinogram sources: raw, STIR (both axis orders, multi-segment), Siemens (TOF, .mhdr).

The files are written here with numpy and hand-written headers, independently of
hpc.io.sinogram's writer, so a reader bug cannot hide behind a matching writer bug.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from hpc.errors import InputError
from hpc.io.headers import read_header
from hpc.io.sinogram import SinogramReader, SinogramWriter, write_sinogram
from hpc.io.spec import raw_spec

from helpers import write_siemens_tof, write_stir

V, X = 6, 5


def _segments(rng, counts, dtype="<u2"):
    """One (A_s, V, X) array per segment, canonical order."""
    return [rng.integers(0, 60000, (a, V, X)).astype(dtype) for a in counts]


def _read_all(spec):
    with SinogramReader(spec) as r:
        return r.read(0, spec.num_slices)


@pytest.mark.parametrize("order", ["view", "sinogram"])
def test_stir_multi_segment_both_axis_orders(tmp_path, order):
    rng = np.random.default_rng(1)
    segs = _segments(rng, [4, 3, 3], ">u2")
    spec = read_header(write_stir(tmp_path, segs, order))
    assert spec.kind == "stir" and spec.order == order and spec.axial_counts == (4, 3, 3)
    assert spec.segments == (0, -1, 1)  # from the ring differences
    expected = np.concatenate(segs)  # (10, V, X)
    assert np.array_equal(_read_all(spec), expected)
    with SinogramReader(spec) as r:  # a slab that crosses a segment boundary
        assert np.array_equal(r.read(3, 8), expected[3:8])
    tof, seg, axial = spec.meta()
    assert seg.tolist() == [0] * 4 + [-1] * 3 + [1] * 3 and axial.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert not tof.any()


def test_stir_without_ring_differences_uses_storage_sequence(tmp_path):
    segs = _segments(np.random.default_rng(2), [3, 2, 2, 1, 1])
    spec = read_header(write_stir(tmp_path, segs, "view", ring_diffs=False))
    assert spec.segments == (0, -1, 1, -2, 2)


def test_siemens_tof_and_segment_table(tmp_path):
    data = np.random.default_rng(3).integers(-5, 3000, (3, 9, V, X)).astype("<i2")
    spec = read_header(write_siemens_tof(tmp_path, data, [5, 2, 2]))
    got = (spec.kind, spec.tof_bins, spec.axial_counts, spec.fields["originating system"])
    assert got == ("siemens", 3, (5, 2, 2), "1104")
    assert np.array_equal(_read_all(spec), data.reshape(-1, V, X))
    tof, seg, axial = spec.meta()
    assert tof.tolist() == [0] * 9 + [1] * 9 + [2] * 9
    assert seg[:9].tolist() == [0] * 5 + [-1] * 2 + [1] * 2 and axial[5:9].tolist() == [0, 1, 0, 1]  # STIR numbers


def test_siemens_mhdr_follows_its_data_set(tmp_path):
    data = np.random.default_rng(4).random((1, 4, V, X)).astype("<f4")
    write_siemens_tof(tmp_path, data, [4], name="em", fmt="short float")
    (tmp_path / "em.mhdr").write_text("!INTERFILE:=\n!originating system:=2008\n%number of data sets:=1\n"
                                      "%data set [1]:={30,em.s.hdr,em.s}\n")
    spec = read_header(tmp_path / "em.mhdr")
    assert spec.dtype == np.dtype("<f4") and spec.header_path.name == "em.s.hdr"
    assert np.array_equal(_read_all(spec), data[0])


def test_raw_offset_and_big_endian(tmp_path):
    data = np.arange(2 * 3 * V * X, dtype=">u2").reshape(2, 3, V, X)
    (tmp_path / "x.raw").write_bytes(b"PREAMBLE" + data.tobytes())
    spec = raw_spec(tmp_path / "x.raw", (2, 3, V, X), "uint16", "big", offset=8)
    out = _read_all(spec)
    assert out.dtype == np.dtype("=u2") and np.array_equal(out, data.reshape(-1, V, X))


@pytest.mark.parametrize("fmt", ["siemens", "stir"])
@pytest.mark.parametrize("dtype", ["<u2", ">f4", "u1"])
def test_write_sinogram_round_trip(tmp_path, fmt, dtype):
    data = np.random.default_rng(5).integers(0, 200, (2, 7, V, X)).astype(dtype)
    header = write_sinogram(tmp_path / "study", data, fmt=fmt, axial_counts=[3, 2, 2],
                            fields={"originating system": "demo"})
    assert header.name == ("study.s.hdr" if fmt == "siemens" else "study.hs")
    spec = read_header(header)
    assert spec.dtype == np.dtype(dtype) and spec.fields["originating system"] == "demo"
    assert spec.tof_bins == 2 and spec.axial_counts == (3, 2, 2)
    assert np.array_equal(_read_all(spec), data.reshape(-1, V, X))


def test_sinogram_writer_keeps_layout_header_and_adds_comment(tmp_path):
    segs = _segments(np.random.default_rng(6), [4, 3, 3], ">u2")
    src = write_stir(tmp_path, segs, "view")
    spec = read_header(src)
    data = _read_all(spec)
    with SinogramWriter(spec, tmp_path / "out" / "rep.hs", "written by test") as w:
        w.write(5, data[5:])  # any order of calls
        w.write(0, data[:5])
        header = w.commit()
    assert (tmp_path / "out" / "rep.s").read_bytes() == (tmp_path / "s.s").read_bytes()
    text = header.read_text().splitlines()
    assert text[1] == "; written by test" and "Name of data file := rep.s" in text
    assert [t for t in text if "data file" not in t and t != text[1]] == \
        [t for t in src.read_text().splitlines() if "data file" not in t]


def test_sinogram_writer_rounds_and_clips_floats_into_integer_files(tmp_path):
    spec = read_header(write_sinogram(tmp_path / "a", np.zeros((1, 2, V, X), "<u2")))
    pred = np.full((2, V, X), 2.6, np.float32)
    pred[1] = -3.0  # a model can predict negative counts; uint16 must not wrap to 65533
    pred[1, 0, 0] = 1e6
    with SinogramWriter(spec, tmp_path / "b.s.hdr", "x") as w:
        w.write(0, pred)
        header = w.commit()
    got = _read_all(read_header(header))
    assert (got[0] == 3).all() and (got[1].ravel()[1:] == 0).all() and got[1, 0, 0] == 65535


def test_sinogram_writer_refuses_incomplete_and_leaves_nothing(tmp_path):
    data = np.ones((4, V, X), "<u2")
    spec = read_header(write_sinogram(tmp_path / "a", data))
    with pytest.raises(ValueError, match="never written"):
        with SinogramWriter(spec, tmp_path / "out" / "b.s.hdr", "x") as w:
            w.write(0, data[:2])
            w.commit()
    assert list((tmp_path / "out").iterdir()) == []


def test_reader_never_modifies_the_source(tmp_path):
    data = np.random.default_rng(7).integers(0, 9, (1, 5, V, X)).astype("<u2")
    header = write_sinogram(tmp_path / "a", data)
    before = hashlib.sha256((tmp_path / "a.s").read_bytes()).hexdigest()
    spec = read_header(header)
    out = _read_all(spec)
    out[:] = 0  # a copy, not a view of the file
    assert hashlib.sha256((tmp_path / "a.s").read_bytes()).hexdigest() == before


def test_truncated_and_oversized_data(tmp_path):
    header = write_sinogram(tmp_path / "a", np.ones((4, V, X), "<u2"))
    data = (tmp_path / "a.s").read_bytes()
    (tmp_path / "a.s").write_bytes(data[:-10])
    with pytest.raises(InputError, match=r"a\.s: data file is truncated: expected .* file has"):
        read_header(header)
    (tmp_path / "a.s").write_bytes(data + b"\0" * 60)
    with pytest.raises(InputError, match=r"a\.s: header/data size mismatch"):
        read_header(header)


def test_missing_data_file_and_missing_key(tmp_path):
    header = write_sinogram(tmp_path / "a", np.ones((4, V, X), "<u2"))
    (tmp_path / "a.s").unlink()
    with pytest.raises(InputError, match=r"a\.s\.hdr: data file not found: .*a\.s"):
        read_header(header)
    text = "\n".join(ln for ln in header.read_text().splitlines() if not ln.startswith("matrix size [2]"))
    header.write_text(text)
    with pytest.raises(InputError, match=r"a\.s\.hdr: missing required key 'matrix size \[2\]'"):
        read_header(header)


def test_inconsistent_segment_table(tmp_path):
    data = np.zeros((1, 9, V, X), "<i2")
    write_siemens_tof(tmp_path, data, [5, 2, 1])
    with pytest.raises(InputError, match="segment table sums to 8 sinograms, matrix size \\[3\\] is 9"):
        read_header(tmp_path / "tof.s.hdr")


def test_raw_argument_errors(tmp_path):
    (tmp_path / "x.raw").write_bytes(b"\0" * 120)
    with pytest.raises(InputError, match="unknown --dtype"):
        raw_spec(tmp_path / "x.raw", (1, 2, V, X), "uint17")
    with pytest.raises(InputError, match="--shape must be"):
        raw_spec(tmp_path / "x.raw", (2, V), "uint16")
    assert raw_spec(tmp_path / "x.raw", (2, V, X), "uint16").num_slices == 2
