"""Interfile syntax: key normalization, lists, number formats, header rewriting."""
from __future__ import annotations

import numpy as np
import pytest

from hpc.errors import InputError
from hpc.io.interfile import (
    format_header,
    normalize_key,
    number_format,
    numpy_dtype,
    parse_header,
    parse_list,
    rewrite_header,
)


@pytest.mark.parametrize("raw", ["!matrix size[1]", "%Matrix Size [1]", "  matrix   size [ 1 ] ",
                                 "!%MATRIX SIZE[1]"])
def test_keys_are_case_space_and_prefix_insensitive(raw):
    assert normalize_key(raw) == "matrix size [1]"


def test_parse_list():
    assert parse_list("{ 12,13, 14 }") == ["12", "13", "14"]
    assert parse_list("{12}") == ["12"]
    assert parse_list("7") == ["7"]


def _header(tmp_path, body: str, name="h.hdr"):
    p = tmp_path / name
    p.write_text("!INTERFILE :=\n" + body)
    return parse_header(p)


def test_parse_header_values_comments_and_first_occurrence(tmp_path):
    h = _header(tmp_path, "; a comment := ignored\n%Number Of TOF Time Bins:=13\n"
                          "!name of data file := sub/x.s\nnumber of tof time bins := 99\n")
    assert h.integer("number of TOF time bins") == 13
    assert h.get("a comment") is None
    assert h.resolve(h.require("name of data file")) == tmp_path / "sub" / "x.s"


@pytest.mark.parametrize("fmt,bpp,order,expected", [
    ("signed integer", 2, "LITTLEENDIAN", "<i2"),
    ("unsigned integer", 2, "BIGENDIAN", ">u2"),
    ("unsigned integer", 1, "LITTLEENDIAN", "|u1"),
    ("short float", None, "LITTLEENDIAN", "<f4"),  # Siemens: 4-byte float, no bytes-per-pixel needed
    ("float", 4, "BIGENDIAN", ">f4"),
    ("long float", 8, "LITTLEENDIAN", "<f8"),
])
def test_number_formats(tmp_path, fmt, bpp, order, expected):
    body = f"number format := {fmt}\nimagedata byte order := {order}\n"
    body += f"!number of bytes per pixel := {bpp}\n" if bpp else ""
    assert numpy_dtype(_header(tmp_path, body), "littleendian") == np.dtype(expected)


def test_byte_order_default_is_the_callers(tmp_path):
    h = _header(tmp_path, "number format := signed integer\nnumber of bytes per pixel := 2\n")
    assert numpy_dtype(h, "bigendian") == np.dtype(">i2")
    assert numpy_dtype(h, "littleendian") == np.dtype("<i2")


def test_unknown_number_format_names_file_and_format(tmp_path):
    h = _header(tmp_path, "number format := bit\nnumber of bytes per pixel := 1\n")
    with pytest.raises(InputError, match=r"h\.hdr.*unsupported number format 'bit'"):
        numpy_dtype(h, "littleendian")


@pytest.mark.parametrize("line", ["", "number of bytes per pixel :=\n", "number of bytes per pixel := ; 2\n"])
def test_integer_format_without_bytes_per_pixel_is_a_missing_key(tmp_path, line):
    """Absent, empty, or only an inline comment (found by the fuzz test: was a TypeError traceback)."""
    h = _header(tmp_path, "number format := unsigned integer\n" + line)
    with pytest.raises(InputError, match="missing required key 'number of bytes per pixel'"):
        numpy_dtype(h, "littleendian")
    with pytest.raises(InputError, match="missing required key 'number of bytes per pixel'"):
        h.number("number of bytes per pixel")
    assert h.integer("number of bytes per pixel", 4) == 4 and h.number("number of bytes per pixel", 0.5) == 0.5


def test_not_an_interfile(tmp_path):
    (tmp_path / "x.hdr").write_text("hello := world\n")
    with pytest.raises(InputError, match="not an Interfile header"):
        parse_header(tmp_path / "x.hdr")
    (tmp_path / "x.raw").write_bytes(b"\0\1\2" * 10)
    with pytest.raises(InputError, match="binary file"):
        parse_header(tmp_path / "x.raw")


def test_number_format_inverse():
    for dt in ("<u2", ">i2", "<f4", ">f8", "u1"):
        fmt, size, order = number_format(np.dtype(dt))
        p_order = "BIGENDIAN" if dt.startswith(">") else "LITTLEENDIAN"
        assert size == np.dtype(dt).itemsize and order == p_order
        assert fmt == {"u": "unsigned integer", "i": "signed integer", "f": "float"}[np.dtype(dt).kind]
    with pytest.raises(ValueError):
        number_format(np.dtype("f2"))


def test_rewrite_header_replaces_value_and_adds_comment(tmp_path):
    text = format_header([("!INTERFILE", ""), ("!name of data file", "a.s"), ("%odd Key [2]", "{1,2}")])
    (tmp_path / "a.hdr").write_text(text)
    out = rewrite_header(parse_header(tmp_path / "a.hdr"), {"name of data file": "b.s"}, "written by test")
    lines = out.splitlines()
    assert lines == ["!INTERFILE :=", "; written by test", "!name of data file := b.s", "%odd Key [2] := {1,2}"]
