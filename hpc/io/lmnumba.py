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

BATCH = 1 << 25  # events sorted into regions before their increments: 2 x 128 MB per worker
REGION = 1 << 20  # bytes of the histogram per region: about an L2 cache


def _decode(w, qlut, qshift, bound, shift, plane_lut, rem_lut, rem_identity, stride, addresses, size, bad_sink,
            keys, n, dl):  # pragma: no cover (compiled)
    """Append the histogram index of each event of ``w`` (uint32 words) to ``keys[n:]`` and, when
    ``dl`` is not empty, the delayeds' addresses to ``dl``. Returns (new n, delayeds written,
    position in ``w`` of the first address outside the layout or -1)."""
    u = np.uint64
    last, bad, nd = addresses - 1, -1, 0
    do_fans = dl.size > 0
    for i in range(w.size):
        x = np.int64(w[i])
        if x >= 0x80000000:  # a tag: tag_marks reads them
            continue
        a = x & 0x3FFFFFFF
        ac = min(a, last)  # look-ups stay inside the tables; a > last goes to bad_sink
        q = np.int64(qlut[u(ac >> qshift)])
        q += ac >= bound[u(q)]  # the block holds the start of the next plane
        if rem_identity:
            k = shift[u(q)] + ac
        else:
            k = plane_lut[u(q)] + rem_lut[u(ac - q * stride)]
        delayed = x < 0x40000000
        k += size * delayed
        if a > last:
            k = bad_sink
            bad = i if bad < 0 else bad
        # stores only: an increment here (region counts, fan sums) is a load the compiler cannot
        # move past these stores, and the loop runs ~3x slower
        keys[u(n)] = k
        n += 1
        if do_fans:
            dl[u(nd)] = ac
            nd += delayed
    return n, nd, bad


def _fans(dl, nd, qlut, qshift, bound, stride, fan_rings, fan_crystals, n_det, fans):  # pragma: no cover
    """fans[ring * n_det + crystal] += 1 at both ends of each address in ``dl[:nd]``."""
    u = np.uint64
    for i in range(nd):
        a = dl[i]
        q = np.int64(qlut[u(a >> qshift)])
        q += a >= bound[u(q)]
        r = a - q * stride
        fans[u(fan_rings[u(q), 0] * n_det + fan_crystals[u(r), 0])] += 1
        fans[u(fan_rings[u(q), 1] * n_det + fan_crystals[u(r), 1])] += 1


def _add(keys, n, counts, rshift, out, acc):  # pragma: no cover (compiled)
    """acc[keys[:n]] += 1, region by region: ``keys`` grouped by region (``key >> rshift``) into
    ``out`` (a counting sort pass; ``counts``: (regions + 1,) zeros), then the increments, each
    region's within a cache."""
    u = np.uint64
    for i in range(n):
        counts[u((keys[i] >> rshift) + 1)] += 1
    for r in range(counts.size - 1):
        counts[r + 1] += counts[r]  # counts[r]: where region r starts in out
    for i in range(n):
        k = keys[i]
        r = u(k >> rshift)
        out[u(counts[r])] = k
        counts[r] += 1
    for i in range(n):
        acc[u(out[i])] += 1
    counts[:] = 0


def _compile(fn):
    try:  # cached beside this file or in the user's cache; neither writable (a read-only image): per process
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:
        return numba.njit(nogil=True)(fn)


_decode, _fans, _add = _compile(_decode), _compile(_fans), _compile(_add)


class NumbaKernel:
    """Histograms word ranges of one list-mode file with the compiled kernel, ``workers`` threads."""

    def __init__(self, hdr: ListModeHeader, bmap: BinMap, tabs, workers: int, chunk: int,
                 check: Callable[[], None] | None = None, batch: int | None = None):
        self.hdr, self.bmap, self.tabs, self.chunk, self.check = hdr, bmap, tabs, chunk, check
        self.batch = max(int(batch or BATCH), 1)
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
        self.scratch: dict[int, tuple[np.ndarray, ...]] = {}  # worker -> its buffers (_buffers)

    def run(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None, list[dict]]:
        """(accumulator (2 * size,), fan sums (rings * N,) or None, per-part stats) of words [start, stop)."""
        cuts = np.linspace(start, stop, self.workers + 1).astype(np.int64).tolist()
        self.stop.clear()
        if self.workers == 1:
            results = [self._part(0, start, stop)]
        else:
            with ThreadPoolExecutor(self.workers) as ex:
                futures = [ex.submit(self._part, j, a, b) for j, (a, b) in enumerate(zip(cuts[:-1], cuts[1:],
                                                                                          strict=True))]
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

    def _buffers(self, worker: int, batch: int, key_t: type) -> tuple[np.ndarray, ...]:
        """(keys (B,), out (B,), words (C,), delayeds (C,) or (0,)): made once per worker and kept
        for the next frames (fresh pages cost ~0.1-1 s per GB to fault in)."""
        have = self.scratch.get(worker)
        if have is None or have[0].size < batch:
            words = min(self.chunk, batch)
            have = (np.empty(batch, key_t), np.empty(batch, key_t), np.empty(words, np.uint32),
                    np.empty(words if self.tabs is not None else 0, np.int64))
            self.scratch[worker] = have
        keys, out, buf, dl = have
        return keys[:batch], out[:batch], buf[:min(self.chunk, batch)], dl

    def _part(self, worker: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None, dict]:
        n_acc = 2 * self.bmap.size + 1  # + the sink of addresses outside the layout
        acc = np.zeros(n_acc, self.dtype)
        fans = np.zeros(self.n_fans, self.dtype)
        key_t = np.uint32 if n_acc < 2**32 else np.int64
        batch = max(min(self.batch, stop - start), 1)
        keys, out, buf, dl = self._buffers(worker, batch, key_t)  # (B,) events' indices, then grouped
        rshift = max(REGION // acc.itemsize, 1).bit_length() - 1
        counts = np.zeros((n_acc >> rshift) + 2, np.int64)
        qlut, qshift, bound = self.tables[:3]
        st = {"marks": 0, "other_tags": 0, "first_mark": -1, "first_mark_word": -1, "last_mark": -1}
        b, (rings, crystals, n_det) = self.bmap, self.fan_tabs
        n = 0
        with WordFile(self.hdr) as wf:
            for pos in range(start, stop, buf.size):
                if self.stop.is_set():
                    break
                if self.check is not None:
                    self.check()
                w = wf.read(pos, buf[:min(buf.size, stop - pos)])
                wf.prefetch(pos + w.size, min(buf.size, stop - pos - w.size))
                at = np.flatnonzero(w >= TAG_BIT)  # (K,) tags: a few per thousand words
                tag_marks(wf, at, w[at], pos, st)
                if n + w.size > batch:
                    _add(keys, n, counts, rshift, out, acc)
                    n = 0
                n, nd, bad = _decode(w, *self.tables, b.rem_identity, b.stride, b.addresses, b.size, n_acc - 1,
                                     keys, n, dl)
                if bad >= 0:  # an address outside the layout: the numpy kernel says where, in one line
                    histogram_words(wf, pos, pos + w.size, b, np.zeros(2 * b.size, self.dtype), chunk=w.size)
                    raise AssertionError("unreachable: the numpy kernel accepted words the compiled one refused")
                if nd:
                    _fans(dl, nd, qlut, qshift, bound, b.stride, rings, crystals, n_det, fans)
        _add(keys, n, counts, rshift, out, acc)
        return acc, (fans if self.tabs is not None else None), st

    def close(self) -> None:
        self.stop.set()
        self.scratch.clear()


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
