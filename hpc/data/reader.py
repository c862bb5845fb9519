"""Reading planned batches from shards: one contiguous h5py read per run, windows cut from it.

A ``BatchReader`` is created in the main process but opens its h5py files lazily, in whichever
process first reads (each DataLoader / DALI worker after fork gets its own handles). It keeps the
runs its own future batches still need and drops a run right after its last use, so a worker
reads every run once per epoch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import hdf5plugin  # noqa: F401  (registers the blosc filter)
import numpy as np

from hpc.data.index import Run, SliceIndex, window_ids
from hpc.errors import InputError
from hpc.io.shards import open_shard, read_slab

# Bound on cached runs per process, only reached if a backend hands this process batches outside
# its lane (then runs are re-read rather than held until their planned last use).
MAX_CACHED_RUNS = 64


@dataclass(frozen=True)
class ReadSpec:
    """What to read besides ``target``."""
    context: int
    edge: str
    paired: bool  # stored `input`
    stored_mask: bool  # stored `mask`
    aux: tuple[str, ...] = ()  # optional float32 datasets of every study (mult, randoms: hpc.physics.recon)


class BatchReader:
    """``read(j) -> dict`` of numpy arrays for batch j of ``plan`` (a list of (b, 2) arrays of
    (run, centre)): ``target`` (b, C, V, X) in the stored dtype (the context
    stack; converted to float on the device: half the bytes to move for uint16 counts), ``ids`` (b, C) slice ids,
    optional ``input`` (b, C, V, X), ``mask`` (b, C, V, X) uint8 and the ``aux`` datasets (b, C, V, X)
    float32, and ``bytes`` read from disk for it."""

    def __init__(self, index: SliceIndex, runs: list[Run], spec: ReadSpec):
        self.index, self.runs, self.spec = index, runs, spec
        self.plan: list[np.ndarray] = []
        self._files: dict[str, h5py.File] = {}
        self._pid = -1
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        self._last_use: dict[int, int] = {}
        self._stride = 1
        self.bytes_read = 0
        for name, flag in (("input", spec.paired), ("mask", spec.stored_mask)):
            missing = [s.id for s in index.ds.studies if flag and not getattr(s, f"has_{name}")]
            if missing:
                raise InputError(f"{index.ds.root}: studies {missing} have no stored `{name}` "
                                 f"(needed by corrupt.{'paired' if name == 'input' else 'use_stored_mask'})")

    def __getstate__(self) -> dict:
        """Pickled for spawned reader processes (DALI): no open files, no cached runs."""
        state = dict(self.__dict__)
        state.update(_files={}, _pid=-1, _cache={}, _last_use={})
        return state

    def set_plan(self, plan: list[np.ndarray], stride: int) -> None:
        """A new epoch plan; this process will read batches j, j + stride, ... (one lane)."""
        self.plan, self._stride = plan, max(1, stride)
        self._cache.clear()
        self._last_use.clear()

    def _file(self, path: str) -> h5py.File:
        if self._pid != os.getpid():  # forked: never reuse the parent's handles
            self._files, self._pid = {}, os.getpid()
        if path not in self._files:
            self._files[path] = open_shard(path)
        return self._files[path]

    def _read_run(self, run: Run) -> dict[str, np.ndarray]:
        """Slices [read_lo, read_hi) of the run's study, across shard boundaries."""
        study = self.index.ds.studies[run.study]
        base = int(self.index.offsets[run.study])
        names = ["target"] + ["input"] * self.spec.paired + ["mask"] * self.spec.stored_mask + list(self.spec.aux)
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        lo, hi = run.read_lo - base, run.read_hi - base
        for shard in study.shards:
            a, b = max(lo, shard.first_slice), min(hi, shard.first_slice + shard.num_slices)
            if a >= b:
                continue
            f = self._file(str(shard.path))
            sl = slice(a - shard.first_slice, b - shard.first_slice)
            for name in names:
                d = f[name]
                arr = read_slab(d, sl.start, sl.stop, shard.path, shard.first_slice) if d.ndim == 3 \
                    else np.broadcast_to(d[()], (b - a, *d.shape))
                self.bytes_read += arr.nbytes if d.ndim == 3 else 0
                parts[name].append(arr)
        return {n: p[0] if len(p) == 1 else np.concatenate(p) for n, p in parts.items()}  # one shard: no copy

    def _uses(self, j: int) -> None:
        """Record, for this process's lane from batch j on, the last batch needing each run."""
        self._last_use.clear()
        for jj in range(j, len(self.plan), self._stride):
            for r in np.unique(self.plan[jj][:, 0]):
                self._last_use[int(r)] = jj

    def read(self, j: int, stacked: bool = True) -> dict[str, np.ndarray]:
        """Batch j. ``stacked=False``: each slice once, ``target`` (U, V, X) (and ``input``/``mask``)
        with ``window`` (b, C) positions into it, so the context stacks are built on the device
        (a slice in 2k+1 windows crosses to the GPU once, not 2k+1 times)."""
        pairs = self.plan[j]  # (b, 2): run, centre
        before = self.bytes_read
        if int(pairs[0, 0]) not in self._last_use or self._last_use[int(pairs[0, 0])] < j:
            self._uses(j)  # first batch of this lane in this process (or a resumed position)
        runs = [self.runs[int(r)] for r in pairs[:, 0]]
        ids = window_ids(pairs[:, 1], np.array([r.stack_lo for r in runs]),
                         np.array([r.stack_hi for r in runs]), self.spec.context, self.spec.edge)
        for r, run in zip(pairs[:, 0], runs, strict=True):
            if int(r) not in self._cache:
                while len(self._cache) >= MAX_CACHED_RUNS:
                    self._cache.pop(next(iter(self._cache)))  # the oldest
                self._cache[int(r)] = self._read_run(run)
        if stacked:
            batch = {name: np.stack([self._cache[int(r)][name][row - run.read_lo]
                                     for (r, _), run, row in zip(pairs, runs, ids, strict=True)])
                     for name in self._cache[int(pairs[0, 0])]}
        else:
            uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
            w, c = np.unravel_index(first, ids.shape)  # a window and channel holding each unique slice
            batch = {name: np.stack([self._cache[int(pairs[i, 0])][name][ids[i, ch] - runs[i].read_lo]
                                     for i, ch in zip(w, c, strict=True)])
                     for name in self._cache[int(pairs[0, 0])]}
            batch["window"] = inverse.reshape(ids.shape).astype(np.int64)
        for r in np.unique(pairs[:, 0]):
            if self._last_use.get(int(r), j) <= j:
                self._cache.pop(int(r), None)
        batch["ids"] = ids.astype(np.int64)
        batch["bytes"] = np.int64(self.bytes_read - before)
        return batch

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
