"""The list-mode kernel compiled by numba (``--lm-device numba``, the default where numba imports):
the decode and address map of :func:`hpc.io.listmode.histogram_words`, in threads sharing one
histogram.

Where the time goes (docs/BENCHMARKS.md, "List mode"): one increment per event at a random place
in a histogram of ~580 MB (mMR span 11, prompts + delayeds), a cache miss each. So the events are
not added as they are decoded: a round decodes BATCH events into their histogram indices (a loop of
stores only; unsigned indices, which numba does not check for negative values: 2.5x), groups them by
REGION of the histogram (a counting sort), then adds them region by region, each region's increments
inside one cache (2x over adding them in file order; ~4x over numpy end to end on one core).
``address // stride`` is one table look-up and one compare (``qlut``: the plane of the first address
of each power-of-two block no longer than a plane). Tags (~0.3 % of the words) are checked by the
numpy code (:func:`hpc.io.listmode.tag_marks`), so time marks are handled identically; an address
outside the layout is reported by the numpy kernel's one-line error.

Threads, not processes: the compiled functions release the GIL. Workers read, decode and group
their own byte ranges, then each adds every worker's events in its own share of the regions: one
histogram, no merge, exact.

    k = NumbaKernel(hdr, bin_map(hdr.layout, target), None, workers=2, chunk=1 << 22)
    acc, fans, parts = k.run(0, hdr.words)       # as hpc.io.lmhistogram.Workers.run
    k.close()
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np

from hpc.io.listmode import PREFETCH, TAG_BIT, BinMap, ListModeHeader, WordFile, new_stats, refuse_addresses, tag_marks

BATCH = 1 << 25  # events per round, all workers together: 2 x 128 MB of indices
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


def _group(keys, n, counts, rshift, out):  # pragma: no cover (compiled)
    """``keys[:n]`` grouped by region (``key >> rshift``) into ``out[:n]`` (a counting sort pass).
    ``counts`` ((regions,)): on return, where each region ends in ``out``."""
    u = np.uint64
    counts[:] = 0
    for i in range(n):
        counts[u(keys[i] >> rshift)] += 1
    at = 0
    for r in range(counts.size):  # counts[r] := where region r starts
        at, counts[r] = at + counts[r], at
    for i in range(n):
        k = keys[i]
        r = u(k >> rshift)
        out[u(counts[r])] = k
        counts[r] += 1


def _increment(out, lo, hi, acc):  # pragma: no cover (compiled)
    """acc[out[lo:hi]] += 1: the random increments alone, within a few regions (in cache)."""
    u = np.uint64
    for i in range(lo, hi):
        acc[u(out[i])] += 1


def _compile(fn):
    try:  # cached beside this file or in the user's cache; neither writable (a read-only image): per process
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:
        return numba.njit(nogil=True)(fn)


_decode, _fans, _group, _increment = (_compile(f) for f in (_decode, _fans, _group, _increment))


@dataclass
class _Range:
    """One worker's byte range of a frame: where it has read to, its statistics, fan sums and buffers."""
    pos: int
    stop: int
    keys: np.ndarray  # (B,) events' histogram indices, in file order
    out: np.ndarray  # (B,) the same, grouped by region
    words: np.ndarray  # (C,) a chunk as read
    delayed: np.ndarray  # (C,) the chunk's delayed addresses (fan sums), or (0,)
    counts: np.ndarray  # (regions,) where each region ends in ``out``
    fans: np.ndarray  # (rings * N,) or (0,)
    st: dict = field(default_factory=new_stats)
    n: int = 0  # events in keys / out

    def cut(self, lo: int, hi: int) -> tuple[int, int]:
        """The slice of ``out`` that holds regions [lo, hi) (lo < hi)."""
        return (int(self.counts[lo - 1]) if lo else 0), int(self.counts[hi - 1])


class NumbaKernel:
    """Histograms word ranges of one list-mode file with the compiled kernel, ``workers`` threads
    sharing one accumulator. A frame runs in rounds: each worker reads its own byte range until its
    share of BATCH events is decoded and grouped by region; then each worker increments its own
    share of the regions, from every worker's events. No two threads touch the same bin, so the
    counts are exact with no merge and no second histogram: memory = one histogram + 2 x 4 x BATCH
    bytes, whatever the number of workers."""

    def __init__(self, hdr: ListModeHeader, bmap: BinMap, tabs, workers: int, chunk: int,
                 check: Callable[[], None] | None = None):
        self.hdr, self.bmap, self.tabs, self.chunk, self.check = hdr, bmap, tabs, chunk, check
        self.workers = max(1, int(workers))
        self.batch = max(BATCH // self.workers, 1)  # events per worker and round
        self.dtype = np.uint32 if hdr.words < 2**32 else np.uint64  # a bin never exceeds the events
        self.n_acc = 2 * bmap.size + 1  # prompts, delayeds, the sink of addresses outside the layout
        self.key_t = np.uint32 if self.n_acc < 2**32 else np.int64
        self.rshift = max(REGION // np.dtype(self.dtype).itemsize, 1).bit_length() - 1
        self.regions = (self.n_acc >> self.rshift) + 1
        self.n_fans = hdr.layout.scanner.rings * hdr.layout.scanner.detectors_per_ring if tabs else 0
        self.tables = _tables(bmap)
        if tabs is not None:
            rings, crystals, n = tabs
            self.fan_tabs = (np.ascontiguousarray(rings), np.ascontiguousarray(crystals), int(n))
        else:
            self.fan_tabs = (np.zeros((1, 2), np.int64), np.zeros((1, 2), np.int64), 0)
        self.stop = threading.Event()
        self.scratch: dict[int, tuple[np.ndarray, ...]] = {}  # worker -> its buffers, kept across frames
        self.pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def run(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None, list[dict]]:
        """(accumulator (2 * size,), fan sums (rings * N,) or None, per-part stats) of words [start, stop)."""
        cuts = np.linspace(start, stop, self.workers + 1).astype(np.int64).tolist()
        ranges = [self._range(j, a, b) for j, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True))]
        acc = np.zeros(self.n_acc, self.dtype)
        shares = np.linspace(0, self.regions, self.workers + 1).astype(np.int64).tolist()
        self.stop.clear()
        while any(r.pos < r.stop for r in ranges):
            self._map(self._fill, ranges)
            self._map(lambda lo, hi: self._increment(ranges, lo, hi, acc), shares[:-1], shares[1:])
        fans = None
        if self.tabs is not None:
            fans = ranges[0].fans
            for r in ranges[1:]:
                np.add(fans, r.fans, out=fans)
        return acc[:-1], fans, [r.st for r in ranges]

    def _map(self, fn: Callable, *args: list) -> None:
        """fn over the workers' arguments, in the pool; an error stops the others at their next chunk."""
        if self.pool is None:
            for a in zip(*args, strict=True):
                fn(*a)
            return
        futures = [self.pool.submit(fn, *a) for a in zip(*args, strict=True)]
        try:
            for f in futures:
                f.result()
        except BaseException:
            self.stop.set()
            for f in futures:
                f.cancel()
            raise

    def _range(self, worker: int, start: int, stop: int) -> _Range:
        """Worker ``worker``'s range, with its buffers (made once and kept for the next frames:
        fresh pages cost ~0.1-1 s per GB to fault in)."""
        have = self.scratch.get(worker)
        if have is None:
            words = min(self.chunk, self.batch)
            have = (np.empty(self.batch, self.key_t), np.empty(self.batch, self.key_t), np.empty(words, np.uint32),
                    np.empty(words if self.tabs is not None else 0, np.int64), np.zeros(self.regions, np.int64))
            self.scratch[worker] = have
        return _Range(start, stop, *have, fans=np.zeros(self.n_fans, self.dtype))

    def _fill(self, r: _Range) -> None:
        """Read, decode and group the range's next share of events (up to the batch)."""
        b, (rings, crystals, n_det) = self.bmap, self.fan_tabs
        qlut, qshift, bound = self.tables[:3]
        r.n = 0
        with WordFile(self.hdr) as wf:
            while r.pos < r.stop and r.n + min(r.words.size, r.stop - r.pos) <= r.keys.size:
                if self.stop.is_set():
                    return
                if self.check is not None:
                    self.check()
                w = wf.read(r.pos, r.words[:min(r.words.size, r.stop - r.pos)])
                wf.prefetch(r.pos + w.size, min(PREFETCH * r.words.size, r.stop - r.pos - w.size))
                at = np.flatnonzero(w >= TAG_BIT)  # (K,) tags: a few per thousand words
                tag_marks(wf, at, w[at], r.pos, r.st)
                r.n, nd, bad = _decode(w, *self.tables, b.rem_identity, b.stride, b.addresses, b.size,
                                       self.n_acc - 1, r.keys, r.n, r.delayed)
                if bad >= 0:  # an address outside the layout: the numpy kernel says where, in one line
                    refuse_addresses(wf, r.pos, w.size, b)
                if nd:
                    _fans(r.delayed, nd, qlut, qshift, bound, b.stride, rings, crystals, n_det, r.fans)
                r.pos += w.size
        _group(r.keys, r.n, r.counts, self.rshift, r.out)

    def _increment(self, ranges: list[_Range], lo: int, hi: int, acc: np.ndarray) -> None:
        """Regions [lo, hi) of the histogram: every range's events there (no other thread's)."""
        for r in ranges:
            if hi > lo:
                _increment(r.out, *r.cut(lo, hi), acc)

    def close(self) -> None:
        self.stop.set()
        self.scratch.clear()
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


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
