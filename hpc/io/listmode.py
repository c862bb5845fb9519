"""Siemens PETLINK 32-bit list mode (mMR; mCT/TOF as far as STIR documents it): the format.

The words, re-derived from STIR's ``CListRecordECAT8_32bit`` / ``CListModeDataECAT8_32bit`` and
``stir_ecat_common`` (no code copied; docs/FORMAT.md, "List mode", says what was checked):

- A little-endian stream of 32-bit words. Bit 31 = 0: an event; bit 30 = 1 prompt, 0 delayed;
  bits 0-29 a *bin address* into the sinogram the header describes (span, views, projections,
  TOF bins), in Siemens storage order: ``address = ((tof * planes + plane) * views + view) * bins
  + bin`` with planes in segment order 0, -1, +1, -2, ... (``projdata.segment_storage_order``)
  and TOF bins in the order 0, +1, -1, ... The mMR writes span-1 addresses (4084 x 252 x 344).
- Bit 31 = 1: a tag. Bits 30-29 = 00: a time mark, bits 0-28 = elapsed milliseconds; anything
  else (singles, gating, control words) is skipped here.

This module reads headers (:func:`read_header`), maps addresses to a target layout
(:func:`bin_map`), finds time marks (:class:`WordFile`) and histograms a word range
(:func:`histogram_words`, numpy); hpc.io.lmhistogram cuts frames, runs workers and merges, and
hpc.io.lmtorch is the same kernel on torch tensors (CPU or CUDA).
"""
from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc.errors import InputError
from hpc.io.interfile import Header, parse_header
from hpc.physics import geometry as G
from hpc.physics import projdata as P

TAG_BIT = np.uint32(1 << 31)
PROMPT_BIT = np.uint32(1 << 30)
ADDRESS_MASK = np.uint32((1 << 30) - 1)
TIME_MASK = np.uint32((1 << 29) - 1)
KIND_SHIFT = 29  # bits 30-29 of a tag: 00 = time mark
CHUNK_WORDS = 1 << 22  # 16 MB of words per read: temporaries stay ~100 MB per worker
PREFETCH = 4  # chunks the page cache is asked to read ahead of the one being histogrammed


@dataclass(frozen=True)
class ListModeHeader:
    """A PETLINK list-mode header: the data file and the layout its bin addresses index."""
    path: Path
    data_path: Path
    offset: int  # bytes before the first word
    words: int  # 32-bit words in the data file after the offset
    layout: P.Layout  # (T, P, V, X) of the addresses, Siemens storage order
    fields: dict[str, str] = dataclasses.field(compare=False, default_factory=dict)

    @property
    def addresses(self) -> int:
        lay = self.layout
        return lay.tof_bins * lay.planes * lay.views * lay.bins


def read_header(path: str | os.PathLike, scanner: G.Scanner | None = None,
                check_word_count: bool = True) -> ListModeHeader:
    """Parse a Siemens list-mode header (``.l.hdr``) and check its data file. ``scanner``
    overrides `originating system` (test scanners); ``check_word_count=False`` accepts a data file
    cut from a longer acquisition (``%total listmode word counts`` then disagrees)."""
    h = parse_header(path)
    if "petlink" not in h.text("sms-mi header name space").lower():
        raise InputError(f"{h.path}: not a PETLINK list-mode header (%SMS-MI header name space := "
                         f"{h.text('sms-mi header name space')!r})")
    bits = h.integer("lm event and tag words format (bits)", 32)
    if bits != 32:
        raise InputError(f"{h.path}: {bits}-bit list mode words; only the 32-bit PETLINK format is supported")
    sc = scanner or _scanner(h)
    layout = _file_layout(h, sc)
    data = h.resolve(h.require("name of data file"))
    offset = h.integer("data offset in bytes", 0)
    size = _data_size(h.path, data)
    if size < offset or (size - offset) % 4:
        raise InputError(f"{data}: {size - offset} bytes after offset {offset} is not a whole number of "
                         "32-bit words: the file is truncated")
    words = (size - offset) // 4
    declared = h.integer("total listmode word counts", 0)
    if check_word_count and declared and declared != words:
        raise InputError(f"{data}: the header ({h.path.name}) says {declared} words, the file holds {words}: "
                         "truncated, or the wrong header")
    return ListModeHeader(h.path, data, offset, words, layout, dict(h.fields))


def _scanner(h: Header) -> G.Scanner:
    try:
        return G.get_scanner(h.require("originating system"))
    except ValueError as exc:
        raise InputError(f"{h.path}: {exc}") from None


def _file_layout(h: Header, sc: G.Scanner) -> P.Layout:
    """The sinogram the addresses index, from %axial compression, %maximum ring difference,
    %number of views / projections / TOF time bins; %segment table, when given, must agree."""
    span = h.integer("axial compression", 1)
    mrd = h.integer("maximum ring difference", sc.rings - 1)
    views, bins = h.integer("number of views", sc.views), h.integer("number of projections", sc.bins)
    tof = h.integer("number of tof time bins", 1)
    if bins != sc.bins:  # addresses count the scanner's maximum non-arc-corrected bins (STIR)
        raise InputError(f"{h.path}: %number of projections {bins}, but {sc.name} list mode uses {sc.bins}")
    try:
        if views <= 0 or sc.views % views:
            raise ValueError(f"{views} views do not mash the scanner's {sc.views}")
        if tof > 1 and (sc.tof_bins < 2 or sc.tof_bins % tof):
            raise ValueError(f"{tof} TOF bins do not mash the scanner's {sc.tof_bins}")
        lay = P.cti_layout(sc, span, mrd, view_mashing=sc.views // views, bins=bins,
                           tof_mashing=sc.tof_bins // tof if tof > 1 else 0)
    except ValueError as exc:
        raise InputError(f"{h.path}: {exc}") from None
    if h.get("segment table") is not None and tuple(h.integers("segment table")) != lay.axial_counts:
        table = h.integers("segment table")
        raise InputError(f"{h.path}: %segment table ({len(table)} segments: {table[:3]}...) does not match "
                         f"%axial compression {span} / %maximum ring difference {mrd} "
                         f"({len(lay.axial_counts)} segments: {list(lay.axial_counts[:3])}...)")
    return lay


def _data_size(header: Path, data: Path) -> int:
    try:
        st = data.stat()
    except OSError:
        raise InputError(f"{header}: list-mode data file not found: {data}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{header}: list-mode data file {data} is not a regular file")
    return st.st_size


# ---------------------------------------------------------------- address -> histogram index
@dataclass(frozen=True)
class BinMap:
    """Where each file address lands in the target histogram: ``plane_lut[address // stride] +
    rem_lut[address % stride]``; dropped planes (ring differences the target does not store) land
    in one extra 'trash' plane. Histogram slot ``size`` onwards holds the delayeds."""
    stride: int  # addresses per (TOF bin, plane) of the file: V_file * X
    addresses: int  # T_file * P_file * V_file * X
    plane_lut: np.ndarray  # (T_file * P_file,) int64: offset of the target plane (or the trash plane)
    rem_lut: np.ndarray  # (V_file * X,) int64: offset of the target (view, bin) within a plane
    target: tuple[int, int, int, int]  # (T, P, V, X) of the target
    identity: bool  # the target is the file's layout: index = address

    @property
    def rem_identity(self) -> bool:  # views and bins map one to one
        return self.rem_lut.size == self.target[2] * self.target[3]

    @property
    def plane_shift(self) -> np.ndarray:  # plane_lut[q] - q * stride: key = plane_shift[q] + address
        return self.plane_lut - np.arange(self.plane_lut.size) * self.stride

    @property
    def bins(self) -> int:
        return int(np.prod(self.target))

    @property
    def size(self) -> int:  # target bins + the trash plane
        return self.bins + self.target[2] * self.target[3]


def bin_map(src: P.Layout, dst: P.Layout) -> BinMap:
    """The map from a file's layout ``src`` to ``dst`` (span, view mashing, segments kept; TOF kept
    or summed). Every file plane must fall in one target plane (true from span 1 to any span, and
    from a layout to itself); ValueError otherwise."""
    if src.scanner != dst.scanner or src.bins != dst.bins:
        raise ValueError(f"target layout ({dst.scanner.name}, {dst.bins} bins) differs from the file's "
                         f"({src.scanner.name}, {src.bins} bins)")
    if dst.view_mashing % src.view_mashing:
        raise ValueError(f"view mashing {dst.view_mashing} is not a multiple of the file's {src.view_mashing}")
    if dst.tof_bins not in (1, src.tof_bins):
        raise ValueError(f"{dst.tof_bins} TOF bins: keep the file's {src.tof_bins} or sum them (1)")
    target = (dst.tof_bins, dst.planes, dst.views, dst.bins)
    plane_size = dst.views * dst.bins
    planes = _plane_map(src, dst)  # (P_file,) target plane or -1
    tof = np.arange(src.tof_bins)[:, None] if dst.tof_bins > 1 else np.zeros((src.tof_bins, 1), np.int64)
    lut = np.where(planes >= 0, (tof * dst.planes + planes) * plane_size, int(np.prod(target)))  # (T_f, P_f)
    view = np.arange(src.views) // (dst.view_mashing // src.view_mashing)
    rem = (view[:, None] * dst.bins + np.arange(src.bins)).reshape(-1)  # (V_f * X,)
    same = (src.segments, src.min_rd, src.max_rd, src.axial_counts, src.view_mashing, src.tof_bins) == \
           (dst.segments, dst.min_rd, dst.max_rd, dst.axial_counts, dst.view_mashing, dst.tof_bins)
    return BinMap(src.views * src.bins, src.tof_bins * src.planes * src.views * src.bins,
                  lut.reshape(-1).astype(np.int64), rem.astype(np.int64), target, same)


def _plane_map(src: P.Layout, dst: P.Layout) -> np.ndarray:
    """(P_file,) target plane of each file plane, -1 where the target stores none of its ring pairs."""
    plane, ra, rb = src.ring_pairs
    d = rb - ra
    kept = np.zeros(d.shape, bool)
    for lo, hi in zip(dst.min_rd, dst.max_rd, strict=True):
        kept |= (d >= lo) & (d <= hi)
    out = np.full(plane.shape, -1, np.int64)
    if kept.any():
        seg, ax = dst.ring_pair_plane(ra[kept], rb[kept])
        out[kept] = dst.plane_of(seg, ax)
    first = np.full(src.planes, np.iinfo(np.int64).max)
    last = np.full(src.planes, np.iinfo(np.int64).min)
    np.minimum.at(first, plane, out)
    np.maximum.at(last, plane, out)
    split = np.flatnonzero(first != last)
    if split.size:
        s, a = src.plane_segment_axial()
        k = split[0]
        raise ValueError(f"file plane (segment {s[k]}, axial {a[k]}) holds ring pairs of several target planes: "
                         "cannot rebin it (histogram span-1 list mode, or keep the file's span)")
    return first


def fan_tables(src: P.Layout) -> tuple[np.ndarray, np.ndarray, int]:
    """(plane_rings (T*P, 2), lor_crystals (V*X, 2), N) for fan sums: the rings and crystals of each
    address's two ends (file layout: span 1, no view mashing); fan index ``ring * N + crystal``."""
    if any(src.compressed(k) for k in range(len(src.segments))) or src.view_mashing != 1:
        raise ValueError("fan sums need span-1, unmashed list mode addresses")
    _, ra, rb = src.ring_pairs  # one ring pair per plane
    v, b = np.meshgrid(np.arange(src.views), np.arange(src.bins), indexing="ij")
    ca, cb = G.sino_to_lor(src.scanner, v, b)  # src.bins == the scanner's bins (read_header)
    rings = np.tile(np.stack([ra, rb], 1), (src.tof_bins, 1))
    crystals = np.stack([ca.reshape(-1), cb.reshape(-1)], 1)
    return rings.astype(np.int64), crystals.astype(np.int64), src.scanner.detectors_per_ring


# ---------------------------------------------------------------- reading words and time marks
class WordFile:
    """Random access to the 32-bit words of a list-mode data file (positions in words)."""

    def __init__(self, hdr: ListModeHeader):
        self.path, self.offset, self.words = hdr.data_path, hdr.offset, hdr.words
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> WordFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, pos: int, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` (uint32, any length) with the words from ``pos`` on; native byte order."""
        view, done = memoryview(out).cast("B"), 0
        while done < view.nbytes:  # pread may return short counts
            got = os.preadv(self.fd, [view[done:]], self.offset + 4 * pos + done)
            if got == 0:
                raise InputError(f"{self.path}: ends at byte {self.offset + 4 * pos + done}, expected "
                                 f"{4 * self.words + self.offset} (file truncated while reading?)")
            done += got
        return out if np.little_endian else out.byteswap()

    def prefetch(self, pos: int, words: int) -> None:
        """Ask the kernel to start reading words [pos, pos + words) now (asynchronously), so that the
        next reads overlap the work on this one. Callers ask for PREFETCH chunks ahead: on a cold
        file 1.2 s instead of 1.4 s with none or one chunk ahead (0.5 GB, compiled kernel, 2 threads)."""
        words = min(words, self.words - pos)
        if hasattr(os, "posix_fadvise") and words > 0:
            os.posix_fadvise(self.fd, self.offset + 4 * pos, 4 * words, os.POSIX_FADV_WILLNEED)

    def next_mark(self, pos: int, window: int = 1 << 12) -> tuple[int, int | None]:
        """(position, value) of the first time mark at or after word ``pos``; (words, None) if none."""
        buf = np.empty(window, np.uint32)
        while pos < self.words:
            w = self.read(pos, buf[:min(window, self.words - pos)])
            hit = np.flatnonzero((w >= TAG_BIT) & ((w >> KIND_SHIFT) & 3 == 0))
            if hit.size:
                return pos + int(hit[0]), int(w[hit[0]] & TIME_MASK)
            pos += w.size
        return self.words, None

    def mark_at_or_after(self, t_ms: int) -> int:
        """Word position of the first time mark with value >= ``t_ms`` (``words`` if none). Bisection
        on f(w) = value of the first mark at or after w, which never decreases when marks don't."""
        lo, hi = 0, self.words
        while lo < hi:
            mid = (lo + hi) // 2
            pos, value = self.next_mark(mid)
            if value is None or value >= t_ms:
                hi = mid
            else:
                lo = pos + 1  # every w in (mid, pos] has f(w) = value < t_ms
        return self.next_mark(lo)[0]


def parse_frames(text: str) -> list[tuple[int, int]]:
    """``"0:60,60:300"`` (seconds from the first time mark) -> [(0, 60000), (60000, 300000)] ms;
    frames must be increasing and may not overlap."""
    frames = []
    for item in text.split(","):
        try:
            a, b = (round(float(x) * 1000) for x in item.split(":"))
        except ValueError:
            raise ValueError(f"time frame {item.strip()!r}: expected START:STOP in seconds, e.g. 0:60") from None
        if not 0 <= a < b or (frames and a < frames[-1][1]):
            raise ValueError(f"time frames {text!r}: need 0 <= start < stop, in order, not overlapping")
        frames.append((a, b))
    return frames


# ---------------------------------------------------------------- the kernel
def histogram_words(wf: WordFile, start: int, stop: int, bmap: BinMap, acc: np.ndarray,
                    fans: np.ndarray | None = None, fan_tabs: tuple | None = None,
                    chunk: int = CHUNK_WORDS, check: Callable[[], None] | None = None) -> dict[str, int]:
    """Add the events of words [start, stop) to ``acc`` ((2 * bmap.size,): prompts, then delayeds)
    and, with ``fans`` ((rings * N,)), the delayeds' fan sums. Returns counts and the first and last
    time mark (-1: none) with the position of the first, for the caller's continuity check.
    ``check`` is called before every chunk (hpc convert's Ctrl-C)."""
    buf = np.empty(min(chunk, max(stop - start, 1)), np.uint32)
    st = new_stats()
    for pos in range(start, stop, buf.size):
        if check is not None:
            check()
        w = wf.read(pos, buf[:min(buf.size, stop - pos)])
        wf.prefetch(pos + w.size, min(PREFETCH * buf.size, stop - pos - w.size))
        is_tag = w >= TAG_BIT
        _marks(wf, w, is_tag, pos, st)
        ev = w[~is_tag]  # (E,) events of this chunk
        delayed = ev < PROMPT_BIT  # bit 30 = 0
        addr = ev.astype(np.intp)  # the index type np.add.at needs, converted once
        np.bitwise_and(addr, int(ADDRESS_MASK), out=addr)
        if addr.size and int(addr.max()) >= bmap.addresses:
            k = int(np.flatnonzero(~is_tag)[np.argmax(addr >= bmap.addresses)])
            raise InputError(f"{wf.path}: word {pos + k} holds bin address {int(w[k] & ADDRESS_MASK)}, outside "
                             f"the header's {bmap.addresses} bins: the header does not describe this file")
        key = _keys(addr, bmap)
        key[delayed] += bmap.size  # ~15 % of the events: cheaper than arithmetic on all of them
        np.add.at(acc, key, acc.dtype.type(1))  # in place, O(events); np.bincount would be O(bins) per chunk
        if fans is not None:
            _fan_sums(addr[delayed], bmap.stride, fan_tabs, fans)
    return st


def new_stats() -> dict[str, int]:
    """A word range's counts before its first word (what every kernel returns per range)."""
    return {"marks": 0, "other_tags": 0, "first_mark": -1, "first_mark_word": -1, "last_mark": -1}


def refuse_addresses(wf: WordFile, pos: int, n: int, bmap: BinMap) -> None:
    """Words [pos, pos + n) hold an address outside the layout: another kernel found it, the numpy
    kernel raises the one-line error that names the word (never returns)."""
    histogram_words(wf, pos, pos + n, bmap, np.zeros(2 * bmap.size, np.uint32), chunk=n)
    raise AssertionError("unreachable: the numpy kernel accepted words another kernel refused")


def _keys(addr: np.ndarray, bmap: BinMap) -> np.ndarray:
    """(E,) int64 histogram index of each address (file layout -> target layout)."""
    if bmap.identity:
        return addr.copy()
    q = addr // bmap.stride  # (TOF bin, plane) of the file
    if bmap.rem_identity:  # same views and bins: key = plane offset - q * stride + address
        key = np.take(bmap.plane_shift, q)
        key += addr
        return key
    return np.take(bmap.plane_lut, q) + np.take(bmap.rem_lut, addr - q * bmap.stride)


def _marks(wf: WordFile, w: np.ndarray, is_tag: np.ndarray, pos: int, st: dict[str, int]) -> None:
    """Count the tags of a chunk, track its time marks, refuse marks that go backwards."""
    at = np.flatnonzero(is_tag)
    tag_marks(wf, at, w[at], pos, st)


def tag_marks(wf: WordFile, at: np.ndarray, tags: np.ndarray, pos: int, st: dict[str, int]) -> None:
    """The tags of a chunk (``at`` (K,) positions in it, ``tags`` (K,) uint32 words): count them,
    track the time marks, refuse marks that go backwards (``st`` carries across chunks)."""
    mark = (tags >> KIND_SHIFT) & 3 == 0
    st["other_tags"] += int(at.size - mark.sum())
    at, tags = at[mark], tags[mark]
    if not at.size:
        return
    t = (tags & TIME_MASK).astype(np.int64)
    back = np.flatnonzero(np.diff(t, prepend=max(st["last_mark"], t[0])) < 0)
    if back.size:
        k = back[0]
        raise InputError(f"{wf.path}: time mark at word {pos + int(at[k])} ({int(t[k])} ms) is earlier than the "
                         "one before it: time marks must not go backwards")
    if st["first_mark"] < 0:
        st["first_mark"], st["first_mark_word"] = int(t[0]), pos + int(at[0])
    st["marks"] += int(at.size)
    st["last_mark"] = int(t[-1])


def _fan_sums(addr: np.ndarray, stride: int, tabs: tuple[np.ndarray, np.ndarray, int], fans: np.ndarray) -> None:
    """Add 1 at both crystals of each address (fans: (rings * N,), index ring * N + crystal)."""
    rings, crystals, n = tabs
    q = addr // stride
    r, c = rings[q], crystals[addr - q * stride]  # (E, 2) each
    np.add.at(fans, r[:, 0] * n + c[:, 0], fans.dtype.type(1))
    np.add.at(fans, r[:, 1] * n + c[:, 1], fans.dtype.type(1))
