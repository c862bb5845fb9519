"""Siemens PETLINK 32-bit list-mode files from known sinograms (``hpc simulate --listmode``, tests,
bench/listmode.py): the inverse of hpc.io.listmode.

Each count of a prompts / delayeds sinogram (the file layout: span 1 for the mMR) becomes one
event word; events get uniform random times in their part's [t0, t1) milliseconds, ties in a
random order, and a time mark is written every millisecond before that millisecond's events, so
histogramming the file gives back the sinograms exactly, frame by frame. Optional extra tags
(a singles-like word, a control word) check that readers skip them.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hpc.io.atomic import atomic_open, atomic_write_text
from hpc.io.interfile import format_header
from hpc.physics import projdata as P
from hpc.physics import projector as J
from hpc.physics.attenuation import MuMap
from hpc.physics.norm import NormComponents, crystal_shift
from hpc.simulate.phantom import Phantom, mu_at

PROMPT = np.uint32(1 << 30)
MARK = np.uint32(1 << 31)
SINGLES_TAG = np.uint32(0xB << 28)  # bits 31-28 = 1011: a tag that is not a time mark
CONTROL_TAG = np.uint32(0xFFFF0000)


def header_items(layout: P.Layout, data_name: str, words: int, duration_s: float,
                 originating_system: str | None = None) -> list[tuple[str, object]]:
    """The keys of a Siemens list-mode header (as the mMR writes them) for addresses in ``layout``."""
    sc = layout.scanner
    return [("!INTERFILE", ""), ("!originating system", originating_system or sc.stir_name),
            ("%SMS-MI header name space", "PETLINK bin address"), ("%SMS-MI version number", "3.4"),
            ("!GENERAL DATA", ""), ("!data offset in bytes", 0), ("name of data file", data_name),
            ("!GENERAL IMAGE DATA", ""), ("!type of data", "PET"), ("PET data type", "Emission"),
            ("data format", "CoincidenceList"), ("!PET STUDY (Emission data)", ""),
            ("number of rings", sc.rings), ("%number of TOF time bins", layout.tof_bins),
            ("!IMAGE DATA DESCRIPTION", ""), ("image duration (sec)", round(duration_s)),
            ("%total listmode word counts", words), ("%COINCIDENCE LIST DATA", ""),
            ("%LM event and tag words format (bits)", 32), ("%timing tagwords interval (msec)", 1),
            ("%axial compression", layout.span), ("%maximum ring difference", max(layout.max_rd)),
            ("%number of projections", layout.bins), ("%number of views", layout.views),
            ("%number of segments", len(layout.segments)), ("%segment table", list(layout.axial_counts))]


Counts = np.ndarray | tuple[np.ndarray, np.ndarray]  # a dense sinogram, or (addresses (K,), counts (K,))


def _addresses(counts: Counts) -> np.ndarray:
    """(E,) uint32 address of each count (a dense sinogram's flat index, Siemens storage order)."""
    if isinstance(counts, tuple):
        addr, n = counts
        return np.repeat(np.asarray(addr, np.uint32), np.asarray(n, np.int64))
    flat = np.asarray(counts).reshape(-1)
    return np.repeat(np.arange(flat.size, dtype=np.uint32), flat)


def event_words(prompts: Counts, delayeds: Counts) -> np.ndarray:
    """(E,) uint32 event words, one per count."""
    return np.concatenate([_addresses(prompts) | PROMPT, _addresses(delayeds)])


def sparse_counts(counts: np.ndarray, layout: P.Layout, file_layout: P.Layout) -> tuple[np.ndarray, np.ndarray]:
    """(addresses (K,) int64 in ``file_layout``, counts (K,)) of the non-zero bins of ``counts`` (T, P,
    V, X) in ``layout`` (TOF bins in Siemens storage order); both span 1, unmashed, same bins and TOF
    bins, ``layout``'s ring pairs a subset of the file's: how a simulated study of a few segments
    becomes list mode addressed like the scanner's (mMR: 4084 planes)."""
    if layout.span != 1 or layout.view_mashing != 1 or layout.bins != file_layout.bins \
            or layout.tof_bins != file_layout.tof_bins:
        raise ValueError("list mode from a simulation needs a span-1, unmashed layout with the scanner's bins "
                         f"(got span {layout.span}, view mashing {layout.view_mashing}, {layout.bins} bins)")
    _, ra, rb = layout.ring_pairs  # one ring pair per plane (span 1)
    to_file = file_layout.plane_of(*file_layout.ring_pair_plane(ra, rb))  # (P,) file plane of each plane
    t, p, v, x = np.nonzero(counts)
    per_tof = file_layout.planes * file_layout.views * file_layout.bins
    addr = t * per_tof + (to_file[p] * file_layout.views + v) * file_layout.bins + x
    return addr.astype(np.int64), np.asarray(counts)[t, p, v, x]


def write_listmode(stem: str | os.PathLike, layout: P.Layout, parts: Sequence[tuple[int, int, Counts, Counts]],
                   rng: np.random.Generator, first_mark: int = 0, lead_events: int = 0,
                   extra_tags: bool = True) -> Path:
    """Write ``<stem>.l`` + ``<stem>.l.hdr``. ``parts``: (t0_ms, t1_ms, prompts, delayeds) with
    integer sinograms shaped like ``layout`` ((T, P, V, X) or (P, V, X)) or sparse (addresses,
    counts) pairs (:func:`sparse_counts`); marks run from
    ``first_mark`` for max(t1) ms. ``lead_events``: that many time-0 events precede the first
    mark (as in real files). Returns the header path."""
    shape = (layout.tof_bins * layout.planes, layout.views, layout.bins)
    words, times = [], []
    for t0, t1, prompts, delayeds in parts:
        for sino in (prompts, delayeds):
            if not isinstance(sino, tuple) and np.asarray(sino).reshape(-1).size != int(np.prod(shape)):
                raise ValueError(f"sinogram {np.shape(sino)} does not match the layout {shape}")
        w = event_words(prompts, delayeds)
        words.append(w)
        times.append(rng.integers(t0, t1, w.size))
    w, t = np.concatenate(words), np.concatenate(times)
    order = rng.permutation(w.size)
    order = order[np.argsort(t[order], kind="stable")]  # by time, random within a millisecond
    w, t = w[order], t[order]
    duration = max(int(p[1]) for p in parts)
    at = np.searchsorted(t, np.arange(duration), "left")  # mark m goes before the events of ms m
    at[0] = min(lead_events, int((t == 0).sum()))
    stream = np.insert(w, at, MARK | (np.uint32(first_mark) + np.arange(duration, dtype=np.uint32)))
    if extra_tags:
        stream = _with_extra_tags(stream, rng)
    return _write(Path(stem), layout, stream, duration / 1000)


def _with_extra_tags(stream: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Singles-like tags every ~2000 words and one control word: readers must skip both."""
    at = np.arange(1000, stream.size, 2000)
    tags = SINGLES_TAG | rng.integers(0, 1 << 20, at.size).astype(np.uint32)
    stream = np.insert(stream, at, tags)
    return np.insert(stream, stream.size // 2, CONTROL_TAG)


def _write(stem: Path, layout: P.Layout, stream: np.ndarray, duration_s: float) -> Path:
    data = stem.with_name(stem.name + ".l")
    with atomic_open(data) as fh:
        fh.write(stream.astype("<u4").tobytes())
    header = stem.with_name(stem.name + ".l.hdr")
    atomic_write_text(header, format_header(header_items(layout, data.name, stream.size, duration_s)))
    return header


def write_random_listmode(stem: str | os.PathLike, layout: P.Layout, events: int, rng: np.random.Generator,
                          events_per_ms: int = 370, delayed_fraction: float = 0.14,
                          chunk: int = 1 << 24) -> tuple[Path, dict[str, int]]:
    """A large file for benchmarks, written chunk by chunk (memory independent of its size):
    uniform random addresses, a time mark every ``events_per_ms`` events (the mMR's 15-minute
    file: 331 M words, ~370 per ms). Returns the header and the true totals."""
    stem = Path(stem)
    n_addr = layout.tof_bins * layout.planes * layout.views * layout.bins
    truth = {"prompts": 0, "delayeds": 0, "marks": 0}
    data = stem.with_name(stem.name + ".l")
    with atomic_open(data) as fh:
        done = 0
        while done < events:
            n = min(chunk - chunk % events_per_ms, events - done)
            w = rng.integers(0, n_addr, n, dtype=np.uint32)
            prompt = rng.random(n) >= delayed_fraction
            w[prompt] |= PROMPT
            truth["prompts"] += int(prompt.sum())
            at = np.arange(0, n, events_per_ms)
            marks = MARK | (np.uint32(truth["marks"]) + np.arange(at.size, dtype=np.uint32))
            truth["marks"] += at.size
            fh.write(np.insert(w, at, marks).astype("<u4").tobytes())
            done += n
    truth["delayeds"] = events - truth["prompts"]
    header = stem.with_name(stem.name + ".l.hdr")
    words = events + truth["marks"]
    atomic_write_text(header, format_header(header_items(layout, data.name, words, truth["marks"] / 1000)))
    return header, truth


# ---------------------------------------------------------------- hpc simulate --listmode
def file_layout(layout: P.Layout) -> P.Layout:
    """The layout list-mode addresses of ``layout``'s scanner index (as the mMR writes them): span 1,
    every ring difference up to the scanner's maximum, unmashed, the layout's TOF bins."""
    sc = layout.scanner
    return P.cti_layout(sc, 1, None, 1, layout.tof_mashing)


def check_listmode_layout(layout: P.Layout) -> None:
    """``hpc simulate --listmode`` writes span-1, unmashed acquisitions (what list mode addresses)."""
    if layout.span != 1 or layout.view_mashing != 1 or layout.bins != layout.scanner.bins:
        raise ValueError(f"--listmode needs --span 1, no view mashing and the scanner's {layout.scanner.bins} bins "
                         f"(got span {layout.span}, view mashing {layout.view_mashing}, {layout.bins} bins)")


def write_acquisition(out: Path, study_id: str, layout: P.Layout, prompts: np.ndarray, randoms: np.ndarray,
                      seconds: float, rng: np.random.Generator) -> Path:
    """``<id>.l`` + ``.l.hdr``: the study's ``prompts`` (T, P, V, X counts, TOF in Siemens storage
    order) and delayeds drawn from its expected ``randoms`` (same shape), at uniform random times
    over ``seconds``, addressed like the scanner's own list mode (:func:`file_layout`)."""
    check_listmode_layout(layout)
    full = file_layout(layout)
    delayeds = rng.poisson(np.asarray(randoms, np.float64))
    events = sparse_counts(prompts, layout, full), sparse_counts(delayeds, layout, full)
    part = (0, max(1, round(seconds * 1000)), *events)
    return write_listmode(out / study_id, full, [part], rng)


def scanner_norm(sc, efficiencies: np.ndarray) -> NormComponents:
    """The normalisation a scanner with these crystal ``efficiencies`` (rings, N) would ship, as
    components: geometric, interference and axial effects 1, the efficiencies stored the way the
    vendor stores them (on the mMR one crystal off: hpc.physics.norm applies STIR's shift back)."""
    stored = np.roll(np.asarray(efficiencies, np.float64), -crystal_shift(sc), axis=1)
    lay = P.cti_layout(sc)
    return NormComponents(sc, np.ones((2 * sc.rings - 1, sc.bins)), np.ones((sc.bins, sc.block_trans)), stored,
                          np.ones(lay.planes), lay)


def phantom_mumap(sc, ph: Phantom, pixel_mm: float = 4.0) -> MuMap:
    """The phantom's mu-map as a scanner's CT-derived map would be: (2R - 1) slices of half a ring
    spacing (slice k at the planes with ring_a + ring_b = k), ``pixel_mm`` square pixels covering the
    field of view, odd sizes (STIR's pixel 0 = the centre), values in 1/cm."""
    half = int(np.ceil(sc.fov_radius_mm / pixel_mm))
    grid = J.ImageGrid(2 * half + 1, 2 * half + 1, pixel_mm)
    slices = [J.ellipse_image(mu_at(ph, ph.z0 + k / 2 * sc.ring_spacing_mm), grid, oversample=2)
              for k in range(2 * sc.rings - 1)]
    return MuMap((np.stack(slices) * 10).astype(np.float32), (sc.ring_spacing_mm / 2, pixel_mm, pixel_mm))
