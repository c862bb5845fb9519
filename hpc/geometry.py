"""Cylindrical PET scanner geometry: presets, detector pair <-> sinogram bin, planes <-> ring
pairs, and the lines of response lost to dead detector blocks.

Transaxial mapping (non-arc-corrected, interleaved, as Siemens and STIR store sinograms). With N
detectors per ring at angles 2 pi c / N, the chord between crystals a and b has its normal at angle
pi (a + b) / N and lies at distance R cos(pi (a - b) / N) from the centre. With k = (a + b) mod N
(the sign flips when a + b >= N) and t = N/2 - |a - b| (signed like the distance):

    normal angle  phi = pi k / N  in [0, pi)        view = k // 2          (views = N / 2)
    distance      s   = R sin(pi t / N)              bin  = t + bins // 2

Each view holds two angles (k even / odd, half a crystal apart, "interleaved"); the parity of k
follows from t, so (view, bin) -> (a, b) is unique. Bins outside [0, bins) lie outside the field of
view and are not stored.

Axial mapping: span 1 (no axial compression). A plane joins ring_a and ring_b; its segment number is
the ring difference ``ring_b - ring_a`` (STIR's numbering) and ``axial = min(ring_a, ring_b)`` its
position within the segment (``rings - |segment|`` planes). Storage order of segments: 0, -1, +1,
-2, +2, ... (STIR's default). In a plane the crystal ``a`` of ``sino_to_lor`` sits in ring_a.

Blocks: crystal c of ring r is in transaxial block ``c // block_trans`` and axial block
``r // block_axial``; block id = ``axial_block * n_trans + trans_block``. A dead block loses every
LOR with either end in it. Virtual crystals (gaps between real blocks that Siemens counts in
``detectors_per_ring``) are the last ``virtual_trans`` crystals of each transaxial block: they
belong to their block (a dead block loses them too) and record nothing (``gap_mask``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

SPEED_OF_LIGHT_MM_PER_PS = 0.299792458


@dataclass(frozen=True)
class Scanner:
    name: str
    rings: int
    detectors_per_ring: int  # crystals per ring, virtual crystals included
    block_trans: int  # crystals per block along the ring (virtual ones included)
    block_axial: int  # rings per block
    views: int  # = detectors_per_ring / 2
    bins: int  # radial (tangential) bins, < detectors_per_ring
    radius_mm: float  # effective ring radius: inner radius + average depth of interaction
    bin_size_mm: float  # sampling distance at the centre of the field of view
    ring_spacing_mm: float
    tof_bins: int = 1
    tof_fwhm_ps: float = 0.0  # coincidence timing resolution
    tof_bin_ps: float = 0.0  # width of one TOF bin
    virtual_trans: int = 0  # virtual (gap) crystals at the end of each transaxial block
    aliases: tuple[str, ...] = ()  # other names, e.g. a header's `originating system`

    def __post_init__(self) -> None:
        n = self.detectors_per_ring
        problems = []
        if n % self.block_trans:
            problems.append(f"detectors_per_ring {n} is not a multiple of block_trans {self.block_trans}")
        if 2 * self.views != n:
            problems.append(f"views {self.views} must be detectors_per_ring / 2 = {n / 2}")
        if not 0 < self.bins < n:
            problems.append(f"bins {self.bins} must be in (0, detectors_per_ring {n})")
        if self.tof_bins > 1 and (self.tof_fwhm_ps <= 0 or self.tof_bin_ps <= 0):
            problems.append("tof_bins > 1 needs tof_fwhm_ps and tof_bin_ps")
        if problems:
            raise ValueError(f"scanner {self.name!r}: " + "; ".join(problems))

    @property
    def fov_radius_mm(self) -> float:
        """Radius of the transaxial field of view covered by the stored bins."""
        return self.radius_mm * math.sin(math.pi * (self.bins // 2) / self.detectors_per_ring)


# Numbers from STIR, src/buildblock/Scanner.cxx (set_params: rings, max non-arc-corrected bins,
# detectors per ring, inner ring radius, average depth of interaction, ring spacing, bin size, ...,
# axial / transaxial crystals per block). Effective radius = inner radius + depth of interaction.
SCANNERS: dict[str, Scanner] = {
    # Unit tests: brute force over every crystal pair stays cheap (24 x 24 x 4 x 4).
    "test": Scanner("test", rings=4, detectors_per_ring=24, block_trans=4, block_axial=2, views=12,
                    bins=12, radius_mm=100.0, bin_size_mm=13.1, ring_spacing_mm=4.0),
    # Demo: a UNet trains on it on 2 CPU cores in minutes; 16 blocks of 8 crystals per ring. Coarse
    # (fictional) 12 mm rings so that its 8 planes cover 96 mm of anatomy.
    "demo": Scanner("demo", rings=8, detectors_per_ring=128, block_trans=8, block_axial=4, views=64,
                    bins=64, radius_mm=335.0, bin_size_mm=8.2, ring_spacing_mm=12.0),
    # Siemens_mMR: 64, 344, 2*252, 328.0, 7.0, 4.0625, 2.08626, ..., 8 axial x 9 transaxial
    # crystals per block: "8x8 blocks, 1 virtual crystal, 56 blocks along the ring".
    "mmr": Scanner("mmr", rings=64, detectors_per_ring=504, block_trans=9, block_axial=8, views=252,
                   bins=344, radius_mm=328.0 + 7.0, bin_size_mm=2.08626, ring_spacing_mm=4.0625,
                   virtual_trans=1, aliases=("Siemens mMR", "mMR", "2008")),
    # Siemens_mCT: 55, 400, (13+1)*48, 421.0, 7.0, 4.054, 2.005, ..., 13+1 x 13+1 per block
    # ("1 virtual crystal along axial and transaxial direction"; "13 TOF bins"). The 55 rings
    # include the 3 virtual rings between the 4 axial blocks. Timing: 527 ps FWHM and 312.5 ps
    # TOF bins (Jakoby et al. 2011, Phys. Med. Biol. 56:2375, mCT performance).
    "mct": Scanner("mct", rings=55, detectors_per_ring=672, block_trans=14, block_axial=14, views=336,
                   bins=400, radius_mm=421.0 + 7.0, bin_size_mm=2.005, ring_spacing_mm=4.054,
                   tof_bins=13, tof_fwhm_ps=527.0, tof_bin_ps=312.5, virtual_trans=1,
                   aliases=("Siemens mCT", "mCT", "Biograph mCT", "2011", "1104")),
}


def get_scanner(name: str) -> Scanner:
    """The preset named ``name`` (its key or an alias, case-insensitive)."""
    key = name.strip().lower()
    for sc in SCANNERS.values():
        if key == sc.name or key in (a.lower() for a in sc.aliases):
            return sc
    raise ValueError(f"unknown scanner {name!r}; valid: {', '.join(SCANNERS)} "
                     f"(aliases: {', '.join(a for s in SCANNERS.values() for a in s.aliases)})")


# ---------------------------------------------------------------- transaxial
def lor_to_sino(sc: Scanner, ca: ArrayLike, cb: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(view, bin) of the LORs between crystals ``ca`` and ``cb`` (arrays, any shape, ca != cb).
    Symmetric in (ca, cb). ``bin`` may fall outside [0, bins): outside the field of view."""
    n = sc.detectors_per_ring
    ca, cb = np.asarray(ca, np.int64) % n, np.asarray(cb, np.int64) % n
    total = ca + cb  # in [0, 2N - 2]
    sign = np.where(total >= n, -1, 1)
    t = sign * (n // 2 - np.abs(ca - cb))
    return (total % n) // 2, t + sc.bins // 2


def sino_to_lor(sc: Scanner, view: ArrayLike, bin: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Crystals (a, b) of sinogram positions (view, bin); a is the end that sits in ring_a."""
    n = sc.detectors_per_ring
    t = np.asarray(bin, np.int64) - sc.bins // 2
    k = 2 * np.asarray(view, np.int64) + (t + n // 2) % 2  # the angle index of this bin's parity
    total = np.where(t >= 0, k, k + n)
    diff = n // 2 - np.abs(t)  # |a - b|; a - b >= 0 in the unreduced sum
    return ((total + diff) // 2) % n, ((total - diff) // 2) % n


def lor_coordinates(sc: Scanner) -> tuple[np.ndarray, np.ndarray]:
    """Exact normal angle phi (rad) and signed distance s (mm) of every stored LOR, each (V, X)."""
    n = sc.detectors_per_ring
    t = np.arange(sc.bins) - sc.bins // 2  # (X,)
    k = 2 * np.arange(sc.views)[:, None] + (t[None, :] + n // 2) % 2  # (V, X)
    s = sc.radius_mm * np.sin(np.pi * t / n)
    return np.pi * k / n, np.broadcast_to(s, k.shape)


def crystal_positions(sc: Scanner) -> np.ndarray:
    """(N, 2) transaxial (x, y) in mm of every crystal of a ring (virtual ones included): crystal c at
    angle 2 pi c / N on the effective radius, the frame of ``lor_coordinates`` (a chord's normal
    angle is the mean of its two crystals' angles)."""
    ang = 2 * np.pi * np.arange(sc.detectors_per_ring) / sc.detectors_per_ring
    return sc.radius_mm * np.stack([np.cos(ang), np.sin(ang)], axis=1)


def lor_endpoints(sc: Scanner) -> tuple[np.ndarray, np.ndarray]:
    """Positions (mm) of the two crystals of every stored LOR, each (V, X, 2): end a, end b of
    ``sino_to_lor``. Projectors trace these, so they follow this module's (view, bin) convention."""
    view, bin = np.meshgrid(np.arange(sc.views), np.arange(sc.bins), indexing="ij")
    ca, cb = sino_to_lor(sc, view, bin)
    pos = crystal_positions(sc)
    return pos[ca], pos[cb]


def tof_kernel(sc: Scanner) -> tuple[float, np.ndarray]:
    """(sigma, edges) in mm along the LOR: the standard deviation of the Gaussian timing kernel and
    the ``tof_bins + 1`` bin edges, measured from the LOR's midpoint along d = (-sin phi, cos phi)
    (phi of ``lor_coordinates``). The outer edges are -inf / +inf (the outer bins are open-ended)."""
    c = SPEED_OF_LIGHT_MM_PER_PS / 2  # a time difference dt moves the emission point by c dt / 2
    sigma = c * sc.tof_fwhm_ps / (2 * math.sqrt(2 * math.log(2)))
    edges = (np.arange(sc.tof_bins + 1) - sc.tof_bins / 2) * c * sc.tof_bin_ps
    edges[0], edges[-1] = -np.inf, np.inf
    return sigma, edges


def transaxial_block_masks(sc: Scanner) -> np.ndarray:
    """(n_trans, 2, V, X) bool: LORs whose end a / end b lies in transaxial block t."""
    view, bin = np.meshgrid(np.arange(sc.views), np.arange(sc.bins), indexing="ij")
    ca, cb = sino_to_lor(sc, view, bin)
    blocks = np.arange(sc.detectors_per_ring // sc.block_trans)[:, None, None]  # (T, 1, 1)
    return np.stack([ca // sc.block_trans == blocks, cb // sc.block_trans == blocks], axis=1)


def gap_mask(sc: Scanner) -> np.ndarray:
    """(V, X) uint8: 0 where an end of the LOR is a virtual crystal (never measured), else 1."""
    view, bin = np.meshgrid(np.arange(sc.views), np.arange(sc.bins), indexing="ij")
    virtual = [(c % sc.block_trans) >= sc.block_trans - sc.virtual_trans for c in sino_to_lor(sc, view, bin)]
    return (~(virtual[0] | virtual[1])).astype(np.uint8)


# ---------------------------------------------------------------- axial
def segment_sequence(max_ring_diff: int) -> tuple[int, ...]:
    """Segments in storage order: 0, -1, +1, ..., -max_ring_diff, +max_ring_diff."""
    return (0,) + tuple(s for d in range(1, max_ring_diff + 1) for s in (-d, d))


def axial_counts(sc: Scanner, segments: Sequence[int]) -> tuple[int, ...]:
    """Planes per segment (span 1: rings - |ring difference|)."""
    for s in segments:
        if abs(s) >= sc.rings:
            raise ValueError(f"segment {s}: scanner {sc.name!r} has ring differences below {sc.rings}")
    return tuple(sc.rings - abs(int(s)) for s in segments)


def plane_rings(sc: Scanner, segment: ArrayLike, axial: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(ring_a, ring_b) of planes (segment = ring_b - ring_a, axial position in the segment)."""
    seg, ax = np.broadcast_arrays(np.asarray(segment, np.int64), np.asarray(axial, np.int64))
    bad = np.flatnonzero((ax < 0) | (ax >= sc.rings - np.abs(seg)))
    if bad.size:
        i = bad[0]
        raise ValueError(f"plane (segment {seg.flat[i]}, axial {ax.flat[i]}) does not exist on scanner "
                         f"{sc.name!r} ({sc.rings} rings, span 1)")
    return ax + np.maximum(-seg, 0), ax + np.maximum(seg, 0)


def plane_index(sc: Scanner, ring_a: ArrayLike, ring_b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(segment, axial) of the planes joining ring_a and ring_b."""
    ra, rb = np.asarray(ring_a, np.int64), np.asarray(ring_b, np.int64)
    if ((ra < 0) | (ra >= sc.rings) | (rb < 0) | (rb >= sc.rings)).any():
        raise ValueError(f"ring numbers must be in [0, {sc.rings}) on scanner {sc.name!r}")
    return rb - ra, np.minimum(ra, rb)


def plane_list(sc: Scanner, segments: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(ring_a, ring_b) of every plane of ``segments`` in storage order, each (planes,)."""
    counts = axial_counts(sc, segments)
    seg = np.concatenate([np.full(c, s) for s, c in zip(segments, counts, strict=True)])
    return plane_rings(sc, seg, np.concatenate([np.arange(c) for c in counts]))


# ---------------------------------------------------------------- blocks
def block_counts(sc: Scanner) -> tuple[int, int]:
    """(transaxial blocks per ring, blocks in all)."""
    n_trans = sc.detectors_per_ring // sc.block_trans
    return n_trans, n_trans * math.ceil(sc.rings / sc.block_axial)


def axial_block(sc: Scanner, ring: ArrayLike) -> np.ndarray:
    """Axial block of each ring."""
    return np.asarray(ring, np.int64) // sc.block_axial


def block_id(sc: Scanner, axial_blk: ArrayLike, trans_blk: ArrayLike) -> np.ndarray:
    """Block id ``axial_block * n_trans + trans_block`` (the loader's numbering too)."""
    return np.asarray(axial_blk, np.int64) * block_counts(sc)[0] + np.asarray(trans_blk, np.int64)


def block_of(sc: Scanner, crystal: ArrayLike, ring: ArrayLike) -> np.ndarray:
    """Block id of crystal ``crystal`` in ring ``ring``."""
    return block_id(sc, axial_block(sc, ring), np.asarray(crystal, np.int64) // sc.block_trans)


def random_blocks(sc: Scanner, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct block ids, sorted."""
    n_blocks = block_counts(sc)[1]
    if not 0 <= k <= n_blocks:
        raise ValueError(f"dead blocks: {k} requested, scanner {sc.name!r} has {n_blocks} blocks")
    return np.sort(rng.choice(n_blocks, size=k, replace=False))


def dead_block_mask(sc: Scanner, blocks: ArrayLike, segments: Sequence[int] | None = None) -> np.ndarray:
    """(planes, V, X) uint8, 1 = measured, 0 = an end of the LOR lies in one of ``blocks``; planes
    of ``segments`` (None: the direct planes, segment 0) in storage order."""
    n_trans, n_blocks = block_counts(sc)
    blocks = np.asarray(blocks, np.int64).reshape(-1)
    if ((blocks < 0) | (blocks >= n_blocks)).any():
        raise ValueError(f"dead blocks {blocks.tolist()}: ids must be in [0, {n_blocks}) on scanner {sc.name!r}")
    ra, rb = plane_list(sc, (0,) if segments is None else segments)
    ax_a, ax_b = axial_block(sc, ra), axial_block(sc, rb)  # (P,)
    tm = transaxial_block_masks(sc)  # (T, 2, V, X)
    lost = np.zeros((ra.size, sc.views, sc.bins), bool)
    for blk in blocks:
        ax, tr = divmod(int(blk), n_trans)
        lost |= (ax_a == ax)[:, None, None] & tm[tr, 0]
        lost |= (ax_b == ax)[:, None, None] & tm[tr, 1]
    return (~lost).astype(np.uint8)
