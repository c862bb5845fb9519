"""Global slice index, study splits, contiguous runs and the per-rank epoch plan.

Every slice of a dataset has a global id (studies in manifest order, canonical slice order within
a study). Slices of one (study, TOF bin, segment) form a *stack*: context windows never cross a
stack boundary. A stack is cut into *runs* of ``run_length`` centre slices; a run is read from disk
in one contiguous request (centres plus ``k`` context slices each side), and all its windows are
cut from that read, so each slice is read about ``1 + 2k / run_length`` times per epoch.

The epoch plan is a pure function of (seed, epoch, rank, world, lanes): runs are shuffled, their
windows concatenated and dealt to ranks in contiguous equal chunks; each rank's chunk is split into
``lanes`` contiguous segments (one per reader worker, so workers never read the same run), each
shuffled through a buffer and cut into batches; batch ``j`` comes from lane ``j % lanes``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hpc.errors import ConfigError
from hpc.io.shards import Dataset

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Run:
    study: int  # position in the dataset's studies
    lo: int  # centre slices [lo, hi), global ids
    hi: int
    read_lo: int  # slices read from disk [read_lo, read_hi), global ids
    read_hi: int
    stack_lo: int  # the (study, tof, segment) stack [stack_lo, stack_hi) holding the run
    stack_hi: int


class SliceIndex:
    """Global slice ids of a dataset with each slice's study, TOF bin, segment and axial position
    (computed from the manifest's layout: no file is opened)."""

    def __init__(self, ds: Dataset):
        self.ds = ds
        self.offsets = np.cumsum([0] + [s.num_slices for s in ds.studies])  # (studies + 1,)
        tof, seg, axial, stacks = [], [], [], []
        for si, s in enumerate(ds.studies):
            if sum(s.axial_counts) * s.tof_bins != s.num_slices:
                raise ConfigError(f"{ds.root}/manifest.json: study {s.id}: tof_bins x axial_counts "
                                  f"!= num_slices ({s.tof_bins} x {sum(s.axial_counts)} != {s.num_slices})")
            start = int(self.offsets[si])
            for t in range(s.tof_bins):
                for sg, n in zip(s.segments, s.axial_counts, strict=True):
                    stacks.append((si, start, start + n))
                    tof.append(np.full(n, t))
                    seg.append(np.full(n, sg))
                    axial.append(np.arange(n))
                    start += n
        self.stacks = stacks  # (study, lo, hi)
        self.tof = np.concatenate(tof).astype(np.int64)
        self.segment = np.concatenate(seg).astype(np.int64)
        self.axial = np.concatenate(axial).astype(np.int64)

    @property
    def num_slices(self) -> int:
        return int(self.offsets[-1])

    def study_of(self, gid: int) -> int:
        return int(np.searchsorted(self.offsets, gid, side="right") - 1)

    def runs(self, studies: list[int], run_length: int, context: int) -> list[Run]:
        """Runs of the given studies' stacks, in canonical order (run_length >= 1)."""
        wanted, out = set(studies), []
        for si, lo, hi in self.stacks:
            if si not in wanted:
                continue
            for a in range(lo, hi, run_length):
                b = min(a + run_length, hi)
                out.append(Run(si, a, b, max(lo, a - context), min(hi, b + context), lo, hi))
        return out


def window_ids(centres: np.ndarray, stack_lo: np.ndarray, stack_hi: np.ndarray, context: int,
               edge: str) -> np.ndarray:
    """(n,) centres -> (n, 2k+1) slice ids, kept inside each centre's stack by replicating or
    reflecting the edge slice (reflection falls back to replication in stacks too short for it).
    ``edge``: hpc.config.Edge."""
    ids = centres[:, None] + np.arange(-context, context + 1)[None, :]
    lo, hi = stack_lo[:, None], stack_hi[:, None] - 1
    if edge == "reflect":
        ids = np.where(ids < lo, 2 * lo - ids, ids)
        ids = np.where(ids > hi, 2 * hi - ids, ids)
    return np.clip(ids, lo, hi)


def split_studies(ids: list[str], fractions: list[float], explicit: dict[str, list[str]],
                  seed: int) -> dict[str, list[str]]:
    """Study ids per split. Explicit lists win; otherwise a seeded shuffle cut by ``fractions``
    (each split with a positive fraction gets at least one study when there are enough)."""
    if any(explicit.values()):
        unknown = sorted({s for lst in explicit.values() for s in lst} - set(ids))
        if unknown:
            raise ConfigError(f"data.*_studies: unknown study ids {unknown}; dataset has {ids}")
        return {name: list(explicit.get(name, [])) for name in SPLITS}
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    total = sum(fractions)
    counts = [int(round(len(ids) * f / total)) for f in fractions]
    for i in (1, 2):  # a requested val/test split never ends up empty while train keeps > 1
        if fractions[i] > 0 and counts[i] == 0 and len(ids) - sum(counts[1:]) > 1:
            counts[i] = 1
    counts[0] = len(ids) - counts[1] - counts[2]
    out, start = {}, 0
    for name, n in zip(SPLITS, counts, strict=True):
        out[name] = order[start:start + n]
        start += n
    return out


def config_split(ids: list[str], data, split: str) -> list[str]:
    """The study ids of ``split`` under a data config (its explicit lists, fractions and seed): the
    one rule the loader, `hpc evaluate --split` and `hpc predict --split` share."""
    explicit = {"train": data.train_studies, "val": data.val_studies, "test": data.test_studies}
    return split_studies(ids, data.split, explicit, data.seed)[split]


def _shuffle_buffer(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of a streaming shuffle buffer of ``size`` over items 0..n-1."""
    out, buf = np.empty(n, dtype=np.int64), []
    draws = rng.random(n)
    nxt = 0
    for i in range(n):
        while len(buf) < max(size, 1) and nxt < n:
            buf.append(nxt)
            nxt += 1
        k = int(draws[i] * len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        out[i] = buf.pop()
    return out


def plan_epoch(runs: list[Run], *, epoch: int, seed: int, rank: int, world: int, batch: int,
               lanes: int, shuffle: bool, buffer: int, drop_last: bool) -> list[np.ndarray]:
    """This rank's batches for one epoch: a list of (b, 2) int arrays of (run number, centre).

    ``drop_last`` (training): every rank gets ``N // world`` windows and full batches only.
    Otherwise (validation) ranks get contiguous chunks differing by at most one window, nothing is
    dropped, and each rank cuts its chunk into the same number of batches of at most ``batch``
    (sizes differ by at most one; only a split with fewer windows than batches has fewer)."""
    if batch < 1 or lanes < 1 or not 0 <= rank < world:
        raise ValueError(f"plan_epoch: batch={batch}, lanes={lanes}, rank={rank}, world={world}")
    order = np.random.default_rng([seed, epoch]).permutation(len(runs)) if shuffle else np.arange(len(runs))
    run_no = np.concatenate([np.full(runs[r].hi - runs[r].lo, r) for r in order] or [np.zeros(0, int)])
    centre = np.concatenate([np.arange(runs[r].lo, runs[r].hi) for r in order] or [np.zeros(0, int)])
    n = len(centre)
    if drop_last:
        per = n // world
        lo, hi = rank * per, (rank + 1) * per
        sizes = [batch] * (per // batch)
    else:  # every rank the same number of batches (no rank waits in a collective), sizes <= batch
        lo, hi = rank * n // world, (rank + 1) * n // world
        nb = math.ceil(math.ceil(n / world) / batch)  # batches of the largest rank's chunk
        sizes = [len(a) for a in np.array_split(np.arange(hi - lo), nb) if len(a)]
    pairs = np.stack([run_no[lo:hi], centre[lo:hi]], axis=1)  # (n_rank, 2)
    batches: list[np.ndarray] = [np.zeros((0, 2), int)] * len(sizes)
    start = 0
    for lane in range(lanes):
        js = list(range(lane, len(sizes), lanes))
        seg = pairs[start:start + sum(sizes[j] for j in js)]
        start += len(seg)
        if shuffle:
            seg = seg[_shuffle_buffer(len(seg), buffer, np.random.default_rng([seed, epoch, rank, lane]))]
        cut = 0
        for j in js:
            batches[j] = seg[cut:cut + sizes[j]]
            cut += sizes[j]
    return batches
