"""Interfile headers: STIR projection data (`.hs`) and Siemens sinograms (`.s.hdr`, `.mhdr`).

An Interfile header is text, one ``key := value`` per line; ``;`` starts a comment line. Keys are
matched case- and whitespace-insensitively, with the ``!`` (required) and ``%`` (vendor) prefixes
dropped and underscores read as blanks (as STIR does), so ``!matrix size[1]``, ``%Matrix Size [1]``
and ``matrix_size [1]`` are the same key. Lists are written ``{ 12,13,14 }``. A number is read as
STIR reads it, up to what cannot be part of it: ``!matrix size [3] := 126 ; 252`` is 126 (an inline
comment). This module knows the syntax, the number formats and what kind of data a header
describes; the meaning of the keys (layout, segments, TOF) is in :mod:`hpc.io.headers`.
"""
from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc.errors import InputError
from hpc.io.atomic import atomic_write_text

_INDEX_RE = re.compile(r"\s*\[\s*(\d+)\s*\]")

# (number format, bytes per pixel) -> numpy kind+size. Siemens writes "short float" for float32.
_FORMATS: dict[tuple[str, int], str] = {
    **{("signed integer", n): f"i{n}" for n in (1, 2, 4, 8)},
    **{("unsigned integer", n): f"u{n}" for n in (1, 2, 4, 8)},
    ("float", 4): "f4", ("float", 8): "f8",
    ("short float", 4): "f4", ("long float", 8): "f8",
}
_DEFAULT_BYTES = {"float": 4, "short float": 4, "long float": 8}


def normalize_key(key: str) -> str:
    """``' !Matrix  Size[1] '`` -> ``'matrix size [1]'`` (``_`` is a blank, as in STIR)."""
    key = key.strip().lstrip("!%").strip().lower().replace("_", " ")
    key = _INDEX_RE.sub(r" [\1]", key)
    return " ".join(key.split())


def strip_comment(value: str) -> str:
    """The value before an inline ``;`` comment (for numbers and names: STIR stops reading a number
    at the first character that cannot belong to it)."""
    return value.split(";", 1)[0].strip()


def parse_list(value: str, keep_empty: bool = False) -> list[str]:
    """``'{ 12,13, 14 }'`` -> ``['12', '13', '14']``; a bare value is a list of one. With
    ``keep_empty`` items keep their positions: ``'{0,,x.s}'`` -> ``['0', '', 'x.s']``."""
    value = value.strip()
    if value.startswith("{") and "}" in value:
        value = value[1:value.index("}")]
    items = [item.strip() for item in value.split(",")]
    return items if keep_empty else [item for item in items if item]


@dataclass
class Header:
    """A parsed header: normalized keys -> raw string values (first occurrence wins)."""

    path: Path
    fields: dict[str, str]
    lines: list[str]  # the original text lines, kept for rewriting (SinogramWriter)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.fields.get(normalize_key(key), default)

    def require(self, key: str) -> str:
        value = self.get(key)
        if value is None or value == "":
            raise InputError(f"{self.path}: missing required key {key!r}")
        return value

    def _value(self, key: str, default: object) -> str:
        """The value before any inline comment ('' when absent or empty); without a default a key whose
        value is empty, or only a comment (``!number of bytes per pixel := ; 2``), is missing."""
        value = strip_comment(self.get(key) or "")
        if value == "" and default is None:
            raise InputError(f"{self.path}: missing required key {key!r}")
        return value

    def integer(self, key: str, default: int | None = None) -> int:
        value = self._value(key, default)
        return self._int(key, value) if value else int(default)  # type: ignore[arg-type]

    def integers(self, key: str) -> list[int]:
        return [self._int(key, v) for v in parse_list(strip_comment(self.require(key)))]

    def _int(self, key: str, value: str) -> int:
        """An integer value ("12", "12.0", "1.2e1"), bounded: inf, nan, 1e400 and 12.5 are refused
        here, before they become sizes (OverflowError, multi-GB allocations)."""
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or not number.is_integer() or abs(number) > MAX_INT:
            raise InputError(f"{self.path}: key {key!r} should be an integer up to {MAX_INT}, got {value!r}")
        return int(number)

    def number(self, key: str, default: float | None = None) -> float:
        value = self._value(key, default)
        if not value:
            return float(default)  # type: ignore[arg-type]
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):  # inf/nan sizes or spacings would poison every later computation
            raise InputError(f"{self.path}: key {key!r} should be a finite number, got {value!r}")
        return number

    def text(self, key: str) -> str:
        """A value without an inline comment ("" when absent)."""
        return strip_comment(self.get(key) or "")

    def resolve(self, name: str) -> Path:
        """A file named in the header; relative names are relative to the header's directory, and
        Windows separators (``..\\LM-00\\x.s.hdr``, as Siemens consoles write them) are read as ``/``."""
        name = name.strip().strip('"').replace("\\", "/")
        p = Path(name)
        return p if p.is_absolute() else self.path.parent / p


MAX_HEADER_BYTES = 1 << 20  # real headers are a few KB; anything bigger is refused unread
MAX_INT = 2**48  # no dimension, offset (a Vision prompts + randoms file: > 2**31 bytes) or count is larger


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_bounded(path: Path, what: str, limit: int = MAX_HEADER_BYTES) -> bytes:
    """The bytes of a small regular file, read only after checking that it is one: a FIFO or a
    device (/dev/zero) would block or never end, and a multi-GB data file given by mistake must not
    be read into memory. Opened non-blocking, so even a FIFO swapped in after the check cannot hang."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(f"{path}: {what} file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: {file_kind(st.st_mode)}, not a {what} file")
        if st.st_size > limit:
            raise InputError(f"{path}: {st.st_size} bytes is too large for a {what} (limit {limit}): "
                             "is this the data file?")
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what}: {exc.strerror}") from None
    finally:
        os.close(fd)


def parse_header(path: str | os.PathLike) -> Header:
    path = Path(path)
    raw = read_bounded(path, "header")
    if b"\0" in raw:
        raise InputError(f"{path}: binary file, not an Interfile header (raw data needs --shape/--dtype)")
    lines = raw.decode("latin-1").splitlines()
    fields: dict[str, str] = {}
    for line in lines:
        if line.lstrip().startswith(";") or ":=" not in line:
            continue
        key, value = line.split(":=", 1)
        fields.setdefault(normalize_key(key), value.strip())
    if "interfile" not in fields:
        raise InputError(f"{path}: not an Interfile header (no 'INTERFILE :=' line)")
    return Header(path, fields, lines)


def numpy_dtype(header: Header, default_byte_order: str) -> np.dtype:
    """The data type from ``number format``, ``number of bytes per pixel`` and the byte order."""
    fmt = " ".join(header.require("number format").lower().split())
    size = header.integer("number of bytes per pixel", _DEFAULT_BYTES.get(fmt, 0) or None)
    code = _FORMATS.get((fmt, size))
    if code is None:
        known = sorted({f for f, _ in _FORMATS})
        raise InputError(f"{header.path}: unsupported number format {fmt!r} with {size} bytes per "
                         f"pixel (known: {', '.join(known)})")
    order = (header.get("imagedata byte order") or default_byte_order).strip().lower()
    if order not in ("littleendian", "bigendian"):
        raise InputError(f"{header.path}: imagedata byte order must be LITTLEENDIAN or BIGENDIAN, "
                         f"got {order!r}")
    return np.dtype(("<" if order == "littleendian" else ">") + code)


def number_format(dtype: np.dtype) -> tuple[str, int, str]:
    """numpy dtype -> (``number format``, bytes per pixel, ``imagedata byte order``)."""
    dtype = np.dtype(dtype)
    kinds = {"i": "signed integer", "u": "unsigned integer", "f": "float"}
    if dtype.kind not in kinds or (dtype.kind, dtype.itemsize) == ("f", 2):
        raise ValueError(f"dtype {dtype} cannot be written as Interfile (integers, float32, float64)")
    little = dtype.byteorder == "<" or (dtype.byteorder in "=|" and np.little_endian)
    return kinds[dtype.kind], dtype.itemsize, "LITTLEENDIAN" if little else "BIGENDIAN"


def format_value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "{" + ",".join(str(v) for v in value) + "}"
    return str(value)


def format_header(items: Iterable[tuple[str, object]]) -> str:
    return "".join(f"{key} := {format_value(value)}".rstrip() + "\n" for key, value in items)


def write_header(path: str | os.PathLike, items: Iterable[tuple[str, object]]) -> Path:
    return atomic_write_text(path, format_header(items))


def rewrite_header(header: Header, replace: dict[str, str], comment: str) -> str:
    """The header's text with some values replaced (by normalized key) and a comment line added
    after the first line, everything else byte-for-byte as in the source."""
    wanted = {normalize_key(k): v for k, v in replace.items()}
    out = []
    for line in header.lines:
        if ":=" in line and not line.lstrip().startswith(";"):
            key = line.split(":=", 1)[0]
            if normalize_key(key) in wanted:
                line = f"{key.rstrip()} := {wanted[normalize_key(key)]}"
        out.append(line)
    out.insert(1, f"; {comment}")
    return "\n".join(out) + "\n"


def data_kind(h: Header) -> str | None:
    """What a header describes when it is not emission projection data (None: an emission
    sinogram, or a header that does not say): "an image", "normalisation data", "list mode data",
    "SPECT data", "transmission data", ... From the keys STIR and Siemens write (`!PET data type`,
    `!type of data`, `data format`, `%SMS-MI header name space`, axis labels) and the file name."""
    name = h.path.name.lower()
    pet = h.text("pet data type").lower().replace(" ", "")
    of_data = h.text("type of data").lower()
    space = h.text("sms-mi header name space").lower()
    fmt = h.text("data format").lower().replace(" ", "")
    labels = {h.text(f"matrix axis label [{k}]").lower() for k in (1, 2, 3)}
    if of_data in ("tomographic", "spect") or h.text("imaging modality").lower() == "nm" \
            or h.get("spect study (general)") is not None:
        return "SPECT data"
    if pet == "image" or {"x", "y"} <= labels or name.endswith((".hv", ".v.hdr", ".i.hdr")):
        return "an image"
    if pet.startswith(("normali", "norm")) or "normalization" in space or name.endswith(".n.hdr"):
        return "normalisation data"
    if fmt.startswith("coincidencelist") or "listmode" in fmt or name.endswith(".l.hdr") \
            or "raw data" in space:
        return "list mode data"
    if pet in ("transmission", "blank", "attenuationcorrection"):
        return {"attenuationcorrection": "attenuation correction factors"}.get(pet, f"{pet} data")
    return None
