"""Histogramming list mode: time frames as word ranges, workers over byte ranges, exact counts.

A frame [a, b) (seconds from the first time mark) is a word range: time marks never decrease, so
its ends are found by bisection on the marks (hpc.io.listmode.WordFile) and every event between
them belongs to the frame; no event needs a time of its own. Each range is cut into ``workers``
equal parts. Memory is bounded by the target layout (prompts + delayeds + one trash plane), never
by the file.

``device="numba"`` (the default where numba imports): hpc.io.lmnumba's compiled kernel; workers
are threads sharing one histogram, each adding its own regions of it (exact, no merge). On 2 cores
3.1-3.7x as fast as numpy end to end (docs/BENCHMARKS.md, "List mode").
``device="numpy"``: :func:`hpc.io.listmode.histogram_words`; workers are processes, not threads
(``np.add.at``, the O(events) accumulation, holds the GIL; ``np.bincount`` would cost O(bins) per
chunk), spawned (``python -m hpc`` and the ``hpc`` script are safe to spawn from). Each fills its
own accumulator and copies it once into a file in /dev/shm that the parent adds up: O(bins) per
worker and frame. ``device="cpu"|"cuda"`` runs hpc.io.lmtorch's kernel in this process instead.

    hdr = read_header("scan.l.hdr")
    for h in histogram(hdr, layout=cti_layout(hdr.layout.scanner, span=11), frames="0:60,60:300"):
        h.prompts, h.delayeds            # (T, P, V, X) uint32 in the target layout
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from hpc.errors import InputError
from hpc.io.listmode import (
    CHUNK_WORDS,
    BinMap,
    ListModeHeader,
    WordFile,
    bin_map,
    fan_tables,
    histogram_words,
    parse_frames,
)
from hpc.physics import projdata as P

DEVICES = ("numba", "numpy", "cpu", "cuda")  # compiled (threads), numpy (processes), torch on the CPU / a GPU


# numba where it is installed (a dependency; the GPU machine's bare venv lacks it), else numpy. Looked
# up, not imported: importing numba costs ~0.2-0.5 s, and every `hpc convert` imports this module.
DEFAULT_DEVICE = "numba" if importlib.util.find_spec("numba") is not None else "numpy"


@dataclass
class Histogram:
    """One time frame: prompts and delayeds in the target layout, optional delayed fan sums."""
    frame_ms: tuple[int, int] | None  # [start, stop) from the first time mark; None: the whole file
    prompts: np.ndarray  # (T, P, V, X) uint32
    delayeds: np.ndarray  # (T, P, V, X) uint32
    fansums: np.ndarray | None  # (rings, N) uint32: delayed events per crystal (both ends counted)
    stats: dict[str, int]  # words, prompts, delayeds, dropped_*, marks, other_tags, first/last mark (ms)


def default_target(src: P.Layout) -> P.Layout:
    """The scanner's vendor layout (mMR: span 11) with the file's TOF bins, for span-1 list mode;
    compressed list mode (mCT-like) stays as written (it cannot be rebinned to another span)."""
    if src.span > 1 or src.view_mashing > 1:
        return src
    sc = src.scanner
    return P.cti_layout(sc, tof_mashing=sc.tof_bins // src.tof_bins if src.tof_bins > 1 else 0)


def histogram(hdr: ListModeHeader, layout: P.Layout | None = None, frames: str | list | None = None,
              workers: int = 1, fansums: bool = False, chunk_words: int = CHUNK_WORDS,
              device: str = DEFAULT_DEVICE, check: Callable[[], None] | None = None) -> Iterator[Histogram]:
    """Histogram ``hdr``'s list mode into ``layout`` (default: :func:`default_target`, e.g. mMR
    span 11), one :class:`Histogram` per frame (``"0:60,60:300"`` in seconds from the first time
    mark, or [(start_ms, stop_ms)]; None: the whole file), in frame order. ``workers`` > 1: that many
    threads (numba) or processes (numpy), each on its own byte range, accumulators added (exact).
    ``device``: one of DEVICES. Every check that needs no histogramming is done before this returns.
    ``check`` is called between chunks (one process, numba's threads) or frames (worker processes):
    hpc convert's Ctrl-C."""
    dst = layout or default_target(hdr.layout)
    if device not in DEVICES:
        raise InputError(f"{hdr.path}: histogram device {device!r}: expected one of {', '.join(DEVICES)}")
    try:
        bmap = bin_map(hdr.layout, dst)
        tabs = fan_tables(hdr.layout) if fansums else None
        spans = frame_ranges(hdr, parse_frames(frames) if isinstance(frames, str) else frames)
    except ValueError as exc:
        raise InputError(f"{hdr.path}: {exc}") from None
    return _frames(hdr, bmap, tabs, spans, workers, chunk_words, device, check)


def frame_ranges(hdr: ListModeHeader, frames: list[tuple[int, int]] | None) -> list[tuple]:
    """[(frame_ms, start_word, stop_word)]: events before the first time mark count at time 0."""
    if not frames:
        return [(None, 0, hdr.words)]
    with WordFile(hdr) as wf:
        _, first = wf.next_mark(0)
        if first is None:
            raise ValueError("no time marks in the data: cannot cut time frames")
        return [((a, b), 0 if a == 0 else wf.mark_at_or_after(first + a), wf.mark_at_or_after(first + b))
                for a, b in frames]


def _frames(hdr: ListModeHeader, bmap: BinMap, tabs, spans: list[tuple], workers: int, chunk: int,
            device: str, check: Callable[[], None] | None) -> Iterator[Histogram]:
    if device == "numba":
        from hpc.io.lmnumba import NumbaKernel  # late: compiles on first use

        runner = NumbaKernel(hdr, bmap, tabs, workers, chunk, check)
    elif device != "numpy":
        from hpc.io.lmtorch import TorchKernel  # late: imports torch, only for this path

        runner = TorchKernel(hdr, bmap, tabs, device, chunk, check)
    else:
        runner = Workers(hdr, bmap, tabs, workers, chunk, check)
    try:
        for frame, start, stop in spans:
            if check is not None:
                check()
            acc, fans, parts = runner.run(start, stop)
            yield _result(hdr, bmap, frame, acc, fans, parts, stop - start)
    finally:
        runner.close()


def _result(hdr: ListModeHeader, bmap: BinMap, frame, acc: np.ndarray, fans, parts: list[dict],
            words: int) -> Histogram:
    """Split the accumulator (prompts, trash, delayeds, trash), check that time marks continue
    across the workers' ranges."""
    n, size = bmap.bins, bmap.size
    marks = [p for p in parts if p["first_mark"] >= 0]
    for prev, cur in zip(marks, marks[1:], strict=False):
        if cur["first_mark"] < prev["last_mark"]:
            raise InputError(f"{hdr.data_path}: time mark at word {cur['first_mark_word']} ({cur['first_mark']} ms) "
                             "is earlier than the one before it: time marks must not go backwards")
    with WordFile(hdr) as wf:
        origin = wf.next_mark(0)[1] or 0
    stats = {"words": words, "prompts": int(acc[:n].sum(dtype=np.int64)),
             "delayeds": int(acc[size:size + n].sum(dtype=np.int64)),
             "dropped_prompts": int(acc[n:size].sum(dtype=np.int64)),
             "dropped_delayeds": int(acc[size + n:].sum(dtype=np.int64)),
             "marks": sum(p["marks"] for p in parts), "other_tags": sum(p["other_tags"] for p in parts),
             "first_mark_ms": marks[0]["first_mark"] - origin if marks else -1,
             "last_mark_ms": marks[-1]["last_mark"] - origin if marks else -1}
    shape = bmap.target
    return Histogram(frame, acc[:n].reshape(shape), acc[size:size + n].reshape(shape),
                     None if fans is None else fans.reshape(-1, hdr.layout.scanner.detectors_per_ring), stats)


class Workers:
    """Runs a frame's word range in ``workers`` parts: in this process (1) or in spawned processes
    writing into per-worker accumulator files in /dev/shm (no pickling of 300 MB arrays)."""

    def __init__(self, hdr: ListModeHeader, bmap: BinMap, tabs, workers: int, chunk: int,
                 check: Callable[[], None] | None = None):
        self.hdr, self.bmap, self.tabs, self.chunk, self.check = hdr, bmap, tabs, chunk, check
        self.workers = max(1, int(workers))
        self.dtype = np.uint32 if hdr.words < 2**32 else np.uint64  # a bin never exceeds the events
        self.n_fans = hdr.layout.scanner.rings * hdr.layout.scanner.detectors_per_ring if tabs else 0
        self.pool, self.files = None, []
        if self.workers > 1:
            self._start()

    def _start(self) -> None:
        where = "/dev/shm" if os.path.isdir("/dev/shm") else None
        try:
            for _ in range(self.workers):
                fd, name = tempfile.mkstemp(prefix="hpc-lm-", suffix=".acc", dir=where)
                self.files.append(name)
                os.ftruncate(fd, (2 * self.bmap.size + self.n_fans) * np.dtype(self.dtype).itemsize)
                os.close(fd)
        except OSError:
            self.close()
            raise
        self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init, initargs=(self.hdr, self.bmap, self.tabs, self.chunk,
                                                                     self.dtype))

    def run(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None, list[dict]]:
        """(accumulator (2 * size,), fan sums (rings * N,) or None, per-part stats) of words [start, stop)."""
        if self.pool is None:
            acc = np.zeros(2 * self.bmap.size, self.dtype)
            fans = np.zeros(self.n_fans, self.dtype) if self.tabs else None
            with WordFile(self.hdr) as wf:
                st = histogram_words(wf, start, stop, self.bmap, acc, fans, self.tabs, self.chunk, self.check)
            return acc, fans, [st]
        cuts = np.linspace(start, stop, self.workers + 1).astype(np.int64)
        parts = list(self.pool.map(_work, self.files, cuts[:-1].tolist(), cuts[1:].tolist()))
        total = None
        for name in self.files:  # exact: integer accumulators added
            part = np.memmap(name, self.dtype, "r")
            total = np.array(part) if total is None else np.add(total, part, out=total)
            del part
        k = 2 * self.bmap.size
        return total[:k], (total[k:] if self.tabs else None), parts

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        for name in self.files:
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass


_STATE: dict = {}  # a worker process's tables, set once by _init


def _init(hdr: ListModeHeader, bmap: BinMap, tabs, chunk: int, dtype: type) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _STATE.update(hdr=hdr, bmap=bmap, tabs=tabs, chunk=chunk, dtype=dtype)


def _work(name: str, start: int, stop: int) -> dict[str, int]:
    """Histogram a range into private memory (anonymous pages may be huge pages: the random
    increments miss the TLB less than on a shared mapping), then copy it to the shared file."""
    s = _STATE
    out = np.memmap(name, s["dtype"], "r+")
    acc = np.zeros(out.size, s["dtype"])
    k = 2 * s["bmap"].size
    with WordFile(s["hdr"]) as wf:
        st = histogram_words(wf, start, stop, s["bmap"], acc[:k], acc[k:] if s["tabs"] else None, s["tabs"],
                             s["chunk"])
    out[:] = acc
    out.flush()
    return st
