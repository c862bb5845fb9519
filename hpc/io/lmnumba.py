"""The list-mode kernel compiled by numba (``--lm-device numba``, the default where numba imports):
the decode and address map of :func:`hpc.io.listmode.histogram_words` in one pass per block of
words, then the increments, in threads over byte ranges.

Where the time goes (docs/BENCHMARKS.md, "List mode"): one random increment per event into a
histogram of ~580 MB (mMR span 11, prompts + delayeds) misses every cache, so the loop is split
per block of ``BLOCK`` words: first each word's histogram index into a buffer that stays in L1
(branch-free: tag words go to a sink slot, addresses outside the file's layout to another), then a
loop of increments only, short enough that the CPU keeps many misses in flight (~2x over the fused
loop). Indices are unsigned (numba adds a negative-index check to signed ones: ~2.5x on the
decode). ``address // stride`` is one table look-up and one compare (``qlut``: the plane of the
first address of each power-of-two block no longer than a plane). Tags (~0.3 % of the words) are
checked by the numpy code (:func:`hpc.io.listmode.tag_marks`), so time marks are handled
identically; an address outside the layout is reported by the numpy kernel's one-line error.

Threads, not processes: the kernel releases the GIL (``nogil``). Each thread has its own
accumulator (memory: one histogram per worker), added at the end: exact whatever the cut.

    k = NumbaKernel(hdr, bin_map(hdr.layout, target), None, workers=2, chunk=1 << 22)
    acc, fans, parts = k.run(0, hdr.words)       # as hpc.io.lmhistogram.Workers.run
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from hpc.io.listmode import TAG_BIT, BinMap, ListModeHeader, WordFile, histogram_words, tag_marks

BLOCK = 2048  # words decoded before their increments: 16 KB of indices, in L1


def _add_block(w, qlut, qshift, bound, shift, plane_lut, rem_lut, rem_identity, stride, addresses, size,
               acc, keys, fan_rings, fan_crystals, n_det, fans):  # pragma: no cover (compiled)
    """Add the words ``w`` (uint32) to ``acc`` ((2 * size + 2,): prompts, delayeds, tag sink, bad
    sink) and, when ``fans`` is not empty, the delayeds' two crystals to ``fans``."""
    u = np.uint64
    tag_sink, bad_sink = acc.size - 2, acc.size - 1
    last = addresses - 1
    do_fans = fans.size > 0
    for s in range(0, w.size, keys.size):
        e = min(s + keys.size, w.size)
        for i in range(s, e):
            x = np.int64(w[i])
            a = x & 0x3FFFFFFF
            ac = min(a, last)  # look-ups stay inside the tables; a >= addresses goes to bad_sink
            q = np.int64(qlut[u(ac >> qshift)])
            q += ac >= bound[u(q)]  # the block holds the start of the next plane
            if rem_identity:
                k = shift[u(q)] + ac
            else:
                k = plane_lut[u(q)] + rem_lut[u(ac - q * stride)]
            delayed = x < 0x40000000
            k += size * delayed
            k = bad_sink if a > last else k
            keys[i - s] = tag_sink if x >= 0x80000000 else k
            if do_fans and delayed:  # delayed and not a tag (x < 2^30)
                r = ac - q * stride
                fans[u(fan_rings[u(q), 0] * n_det + fan_crystals[u(r), 0])] += 1
                fans[u(fan_rings[u(q), 1] * n_det + fan_crystals[u(r), 1])] += 1
        for j in range(e - s):  # the random increments, nothing else: many misses in flight
            acc[u(keys[j])] += 1


try:  # cached beside this file, or in the user's cache; neither writable (a read-only image): compiled per process
    _add_block = numba.njit(nogil=True, cache=True)(_add_block)
except RuntimeError:
    _add_block = numba.njit(nogil=True)(_add_block)


class NumbaKernel:
    """Histograms word ranges of one list-mode file with the compiled kernel, ``workers`` threads."""

    def __init__(self, hdr: ListModeHeader, bmap: BinMap, tabs, workers: int, chunk: int,
                 check: Callable[[], None] | None = None):
        self.hdr, self.bmap, self.tabs, self.chunk, self.check = hdr, bmap, tabs, chunk, check
        self.workers = max(1, int(workers))
        self.dtype = np.uint32 if hdr.words < 2**32 else np.uint64  # a bin never exceeds the events
        self.n_fans = hdr.layout.scanner.rings * hdr.layout.scanner.detectors_per_ring if tabs else 0
        self.tables = _tables(bmap)
        if tabs is not None:
            rings, crystals, n = tabs
            self.fan_tabs = (np.ascontiguousarray(rings), np.ascontiguousarray(crystals), int(n))
        else:
            self.fan_tabs = (np.zeros((1, 2), np.int64), np.zeros((1, 2), np.int64), 0)
        self.stop = threading.Event()

    def run(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None, list[dict]]:
        """(accumulator (2 * size,), fan sums (rings * N,) or None, per-part stats) of words [start, stop)."""
        cuts = np.linspace(start, stop, self.workers + 1).astype(np.int64).tolist()
        self.stop.clear()
        if self.workers == 1:
            results = [self._part(start, stop)]
        else:
            with ThreadPoolExecutor(self.workers) as ex:
                futures = [ex.submit(self._part, a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
                try:
                    results = [f.result() for f in futures]
                except BaseException:
                    self.stop.set()  # the other threads stop at their next chunk
                    raise
        acc, fans, parts = results[0]
        for other, other_fans, _ in results[1:]:  # exact: integer accumulators added
            np.add(acc, other, out=acc)
            if fans is not None:
                np.add(fans, other_fans, out=fans)
        n = 2 * self.bmap.size
        return acc[:n], fans, [p for _, _, p in results]

    def _part(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None, dict]:
        acc = np.zeros(2 * self.bmap.size + 2, self.dtype)  # + the tag sink and the bad-address sink
        fans = np.zeros(self.n_fans, self.dtype)
        keys = np.empty(BLOCK, np.int64)
        buf = np.empty(min(self.chunk, max(stop - start, 1)), np.uint32)
        st = {"marks": 0, "other_tags": 0, "first_mark": -1, "first_mark_word": -1, "last_mark": -1}
        b, (rings, crystals, n_det) = self.bmap, self.fan_tabs
        with WordFile(self.hdr) as wf:
            for pos in range(start, stop, buf.size):
                if self.stop.is_set():
                    break
                if self.check is not None:
                    self.check()
                w = wf.read(pos, buf[:min(buf.size, stop - pos)])
                at = np.flatnonzero(w >= TAG_BIT)  # (K,) tags: a few per thousand words
                tag_marks(wf, at, w[at], pos, st)
                _add_block(w, *self.tables, b.rem_identity, b.stride, b.addresses, b.size, acc, keys,
                           rings, crystals, n_det, fans)
                if acc[-1]:  # an address outside the layout: the numpy kernel says where, in one line
                    histogram_words(wf, pos, pos + w.size, b, np.zeros(2 * b.size, self.dtype), chunk=w.size)
                    raise AssertionError("unreachable: the numpy kernel accepted words the compiled one refused")
        return acc, (fans if self.tabs is not None else None), st

    def close(self) -> None:
        self.stop.set()


def _tables(b: BinMap) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(qlut, qshift, bound, shift, plane_lut, rem_lut): the plane of an address ``a`` is
    ``q = qlut[a >> qshift]``, plus one where ``a >= bound[q]`` (2**qshift <= stride: a block of
    addresses starts in one plane and ends in it or the next)."""
    qshift = int(b.stride).bit_length() - 1
    planes = b.addresses // b.stride
    starts = np.arange(((b.addresses - 1) >> qshift) + 1, dtype=np.int64) << qshift
    qlut = (starts // b.stride).astype(np.int64)
    bound = (np.arange(planes, dtype=np.int64) + 1) * b.stride
    return qlut, qshift, bound, np.ascontiguousarray(b.plane_shift), b.plane_lut, b.rem_lut
