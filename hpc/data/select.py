"""Which slices a bounded validation scores, and what the data look like before training starts.

``train.val_batches`` bounds a validation pass. Its slices are not the first ones in storage order
(edge planes of the first study, often without a single gap pixel: the gap metrics were then
undefined and reproject's iteration count was "chosen" from nothing) but a stratified sample:
evenly spaced over the split in canonical order (every study, TOF bin, segment and axial region in
proportion), taken among the slices that have gap pixels under the validation's corruption when
enough of them do. The choice is a pure function of the dataset and the config: every rank, and
every attempt of a requeued run, picks the same slices.

    runs = stratified_runs(index, runs, limit=64, context=2, has_gaps=lambda centres: ...)
    empty_fraction(index, studies) -> 0.98   # most sampled training slices hold no counts
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hpc.data.index import Run, SliceIndex
from hpc.io.shards import ShardArray

CANDIDATES_PER_SLICE = 8  # slices looked at (for gaps) per slice kept: bounds the reads of stored masks
MIN_CANDIDATES = 256
EMPTY_SAMPLE = 64  # slices read to estimate the fraction of empty training slices


def spread(n: int, k: int) -> np.ndarray:
    """``k`` evenly spaced positions in ``range(n)`` (all of them when k >= n), deterministic."""
    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def centres_of(runs: list[Run]) -> tuple[np.ndarray, np.ndarray]:
    """(centre slice ids, the run each belongs to) of ``runs``, in their order."""
    centre = np.concatenate([np.arange(r.lo, r.hi) for r in runs] or [np.zeros(0, np.int64)])
    owner = np.concatenate([np.full(r.hi - r.lo, i) for i, r in enumerate(runs)] or [np.zeros(0, np.int64)])
    return centre.astype(np.int64), owner.astype(np.int64)


def stratified_runs(runs: list[Run], limit: int, context: int,
                    has_gaps: Callable[[np.ndarray], np.ndarray] | None = None) -> list[Run]:
    """At most ``limit`` centre slices of ``runs`` as one-slice runs: evenly spaced over all of
    them, among those with gap pixels (``has_gaps(centres) -> bool``) when at least ``limit`` have
    gaps, else every slice with gaps plus evenly spaced others."""
    centre, owner = centres_of(runs)
    if limit <= 0 or limit >= len(centre):
        return runs
    cand = spread(len(centre), max(limit * CANDIDATES_PER_SLICE, MIN_CANDIDATES))
    if has_gaps is not None:
        gapped = cand[np.asarray(has_gaps(centre[cand]), bool)]
        if len(gapped) >= limit:
            chosen = gapped[spread(len(gapped), limit)]
        else:
            rest = np.setdiff1d(cand, gapped)
            chosen = np.union1d(gapped, rest[spread(len(rest), limit - len(gapped))])
    else:
        chosen = spread(len(centre), limit)
    out = []
    for pos in np.sort(chosen):
        r, c = runs[int(owner[pos])], int(centre[pos])
        out.append(Run(r.study, c, c + 1, max(r.stack_lo, c - context), min(r.stack_hi, c + 1 + context),
                       r.stack_lo, r.stack_hi))
    return out


def stored_mask_gaps(index: SliceIndex) -> Callable[[np.ndarray], np.ndarray]:
    """has_gaps for stored masks: a slice has gaps when its mask has a value below 1."""
    def has_gaps(centres: np.ndarray) -> np.ndarray:
        out = np.zeros(len(centres), bool)
        for si, study in enumerate(index.ds.studies):
            sel = np.flatnonzero((centres >= index.offsets[si]) & (centres < index.offsets[si + 1]))
            if not sel.size:
                continue
            with ShardArray(study, "mask") as masks:
                for i in sel:
                    k = int(centres[i] - index.offsets[si])
                    out[i] = bool((masks.read(k, k + 1) < 1).any())
        return out
    return has_gaps


def empty_fraction(index: SliceIndex, studies: list[int], n: int = EMPTY_SAMPLE) -> tuple[float, int]:
    """(fraction of all-zero target slices, slices read) among ``n`` evenly spaced slices of the
    ``studies`` (positions in the dataset): an all-zero slice teaches a repair nothing."""
    ids = np.concatenate([np.arange(index.offsets[s], index.offsets[s + 1]) for s in studies]
                         or [np.zeros(0, np.int64)])
    picked = ids[spread(len(ids), n)]
    empty = 0
    for si in sorted({index.study_of(int(g)) for g in picked}):
        with ShardArray(index.ds.studies[si], "target") as target:
            for g in picked[(picked >= index.offsets[si]) & (picked < index.offsets[si + 1])]:
                k = int(g - index.offsets[si])
                empty += not target.read(k, k + 1).any()
    return (empty / len(picked) if len(picked) else 0.0), len(picked)
