"""Cylindrical PET scanner hardware: presets, detector pair <-> (view, tangential position), crystal
positions, blocks and virtual crystals, all in STIR's conventions (UCL/STIR, re-derived in
tests/test_geometry.py). Axial compression, segments, view and TOF mashing: :mod:`hpc.physics.projdata`.

Transaxial mapping (non-arc-corrected, STIR's ``ProjDataInfoCylindricalNoArcCorr``). N detectors per
ring; uncompressed view ``v`` in [0, N/2) and tangential position ``t = bin - bins // 2`` belong to

    d1 = (v + floor(t / 2)) mod N,        d2 = (v - ceil(t / 2) + N / 2) mod N.

``d1`` is the detector in the plane's first ring (``ring_a``), ``d2`` the one in ``ring_b`` (STIR's
segment = ring difference ``ring_b - ring_a``). Every unordered detector pair with ``|t| < N / 2``
has exactly one (v, t); :func:`lor_to_bin` says whether it had to swap the two ends to find it
(then the ring pair swaps too). Views 0 .. N/2 - 1 cover 180 degrees; view v + N/2 is view v with
t -> -t and the ends swapped.

Positions (STIR's frame): detector d sits at angle ``psi = 2 pi d / N + tilt`` at ``(x, y) = R
(sin psi, -cos psi)``, R = inner radius + average depth of interaction. The chord (v, t) has its
normal at ``phi = 2 pi v / N - pi (t mod 2) / N + tilt`` (odd t sit half a crystal earlier:
"interleaved" sampling) and signed distance ``s = R sin(pi t / N)``; see :func:`lor_coordinates`.

Blocks: crystal c of ring r is in transaxial block ``c // block_trans`` and axial block
``r // block_axial``; block id ``axial_block * n_trans + trans_block``. Virtual crystals (the gaps
between blocks that Siemens counts in ``detectors_per_ring``) are, as in STIR's
``BinNormalisationFromECAT8``, the first ``virtual_trans`` crystals of each transaxial block and the
last ``virtual_axial`` rings of each axial block (mCT: rings 13, 27, 41). They belong to their
block and record nothing: LORs through them are neither data nor gaps.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from hpc.registry import SCANNERS

SPEED_OF_LIGHT_MM_PER_PS = 0.299792458


@dataclass(frozen=True)
class Scanner:
    """A scanner's hardware (STIR's ``Scanner``) and the layout its vendor's sinograms use."""
    name: str  # hpc's key ("mmr")
    stir_name: str  # STIR's name, written as `originating system` ("Siemens mMR")
    rings: int  # crystal rings, virtual rings included
    detectors_per_ring: int  # crystals per ring, virtual crystals included
    block_trans: int  # crystals per block along the ring (virtual ones included)
    block_axial: int  # rings per block (virtual ones included)
    bins: int  # maximum number of non-arc-corrected bins (STIR)
    inner_radius_mm: float
    doi_mm: float  # average depth of interaction
    bin_size_mm: float  # STIR's default bin size
    ring_spacing_mm: float
    tilt_rad: float = 0.0  # STIR's intrinsic azimuthal tilt (view offset)
    arc_bins: int = 0  # STIR's default number of arc-corrected bins (0: = bins)
    tof_bins: int = 1  # STIR's maximum number of (unmashed) TOF bins
    tof_bin_ps: float = 0.0  # width of one unmashed TOF bin
    tof_fwhm_ps: float = 0.0  # coincidence timing resolution
    virtual_trans: int = 0  # virtual crystals at the start of each transaxial block
    virtual_axial: int = 0  # virtual rings at the end of each axial block
    # the layout of the vendor's sinograms (hpc.physics.projdata.default_layout)
    span: int = 1
    max_ring_diff: int = -1  # -1: rings - 1
    view_mashing: int = 1
    tof_mashing: int = 1
    aliases: tuple[str, ...] = ()  # other names STIR accepts, e.g. a header's `originating system`

    def __post_init__(self) -> None:
        n = self.detectors_per_ring
        problems = []
        if n % 2 or n % self.block_trans:
            problems.append(f"detectors_per_ring {n} must be even and a multiple of block_trans {self.block_trans}")
        if not 0 < self.bins < n:
            problems.append(f"bins {self.bins} must be in (0, detectors_per_ring {n})")
        if self.tof_bins > 1 and (self.tof_fwhm_ps <= 0 or self.tof_bin_ps <= 0):
            problems.append("tof_bins > 1 needs tof_fwhm_ps and tof_bin_ps")
        if not (0 <= self.virtual_trans < self.block_trans and 0 <= self.virtual_axial < self.block_axial):
            problems.append("virtual crystals must leave real crystals in every block")
        if (n // 2) % self.view_mashing or self.tof_bins % self.tof_mashing:
            problems.append("view_mashing must divide the views, tof_mashing the TOF bins")
        if problems:
            raise ValueError(f"scanner {self.name!r}: " + "; ".join(problems))

    @property
    def views(self) -> int:
        """Uncompressed views over 180 degrees (N / 2)."""
        return self.detectors_per_ring // 2

    @property
    def radius_mm(self) -> float:
        """Effective ring radius: inner radius + average depth of interaction."""
        return self.inner_radius_mm + self.doi_mm

    @property
    def fov_radius_mm(self) -> float:
        """Radius of the transaxial field of view covered by the stored bins."""
        return self.radius_mm * math.sin(math.pi * (self.bins // 2) / self.detectors_per_ring)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, self.stir_name, *self.aliases)


# From STIR's src/buildblock/Scanner.cxx (set_params: rings, max non-arc-corrected bins, default
# arc-corrected bins, detectors per ring, inner ring radius, average depth of interaction, ring
# spacing, bin size, intrinsic tilt, ..., crystals per block axially / transaxially, ..., TOF bins,
# TOF bin size, timing resolution) and get_num_virtual_{axial,transaxial}_crystals_per_block().
# Vendor layouts: mMR span 11 / max ring difference 60 (837 planes); mCT span 11 / 49 (621 planes),
# 168 = 336 / 2 views, 13 TOF bins; Vision 600 span 19 / 79 (815 planes), 264 TOF bins mashed by 8
# (STIR's InterfileHeaderSiemens default); GE data are read by STIR as span 1.
PRESETS: tuple[Scanner, ...] = (
    # Unit tests: brute force over every crystal pair stays cheap (24 x 24 x 4 x 4).
    Scanner("test", "hpc test", rings=4, detectors_per_ring=24, block_trans=4, block_axial=2, bins=12,
            inner_radius_mm=95.0, doi_mm=5.0, bin_size_mm=13.1, ring_spacing_mm=4.0, max_ring_diff=0),
    # Demo: a UNet trains on it on 2 CPU cores in minutes; 16 blocks of 8 crystals per ring. Coarse
    # (fictional) 12 mm rings so that its 8 planes cover 96 mm of anatomy.
    Scanner("demo", "hpc demo", rings=8, detectors_per_ring=128, block_trans=8, block_axial=4, bins=64,
            inner_radius_mm=328.0, doi_mm=7.0, bin_size_mm=8.2, ring_spacing_mm=12.0, max_ring_diff=0),
    Scanner("mmr", "Siemens mMR", rings=64, detectors_per_ring=504, block_trans=9, block_axial=8, bins=344,
            inner_radius_mm=328.0, doi_mm=7.0, bin_size_mm=2.08626, ring_spacing_mm=4.0625, arc_bins=344,
            virtual_trans=1, span=11, max_ring_diff=60, aliases=("mMR", "2008")),
    Scanner("mct", "Siemens mCT", rings=55, detectors_per_ring=672, block_trans=14, block_axial=14, bins=400,
            inner_radius_mm=421.0, doi_mm=7.0, bin_size_mm=2.005, ring_spacing_mm=4.054, arc_bins=336,
            tof_bins=13, tof_bin_ps=4.056 * 1000 / 13, tof_fwhm_ps=555.0, virtual_trans=1, virtual_axial=1,
            span=11, max_ring_diff=49, view_mashing=2, aliases=("mCT", "2011", "1104", "1094", "Biograph mCT")),
    Scanner("vision600", "Siemens Vision 600", rings=80, detectors_per_ring=21 * 38, block_trans=21,
            block_axial=10, bins=520, inner_radius_mm=410.0, doi_mm=7.0, bin_size_mm=1.6,
            ring_spacing_mm=3.29114, tilt_rad=0.0324, arc_bins=520, tof_bins=33 * 8, tof_bin_ps=143.231 / 8,
            tof_fwhm_ps=214.0, virtual_trans=1, span=19, max_ring_diff=79, tof_mashing=8,
            aliases=("Vision 600", "1208", "vision")),
    Scanner("signa", "GE Signa PET/MR", rings=45, detectors_per_ring=2 * 224, block_trans=4, block_axial=9,
            bins=357, inner_radius_mm=311.8, doi_mm=8.5, bin_size_mm=2.01565, ring_spacing_mm=5.56,
            tilt_rad=-5.23 * math.pi / 180, arc_bins=331, tof_bins=351, tof_bin_ps=13.02, tof_fwhm_ps=390.0,
            tof_mashing=351, aliases=("PET/MR Signa", "Signa PET/MR", "signa pet/mr")),
)
for _sc in PRESETS:  # hpc.registry.SCANNERS: the presets by hpc's key (get_scanner also takes STIR's names)
    SCANNERS.register(_sc.name)(_sc)


def _norm_name(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).lower()


SLAB_NAME = re.compile(r"(.+?)[\s-]+slab\s*(\d+)")  # "mmr-slab8", "Siemens mMR slab 8": a slab's names


def slab(sc: Scanner, rings: int) -> Scanner:
    """The first ``rings`` rings of ``sc`` as a scanner of their own (``hpc simulate --rings``): the
    same transaxial geometry, span (at most 2 rings - 1, what K rings allow) and blocks, maximum
    ring difference ``rings - 1``, named
    ``<name>-slab<K>`` / ``<STIR name> slab <K>`` so that files declaring it resolve back to it
    (:func:`get_scanner`); ValueError unless 1 <= rings <= sc.rings."""
    if not 1 <= rings <= sc.rings:
        raise ValueError(f"slab of {rings} rings: {sc.name!r} has 1..{sc.rings}")
    if rings == sc.rings:
        return sc
    return dataclasses.replace(sc, name=f"{sc.name}-slab{rings}", stir_name=f"{sc.stir_name} slab {rings}",
                               rings=rings, max_ring_diff=rings - 1, span=min(sc.span, 2 * rings - 1), aliases=())


def get_scanner(name: str) -> Scanner:
    """The preset called ``name``: hpc's key, STIR's name or one of its aliases (case, blanks and
    underscores ignored, so ``Siemens mMR``, ``siemens_mmr`` and ``mmr`` are the same scanner);
    ``<preset> slab <K>`` (or ``<key>-slab<K>``) is that preset's first K rings (:func:`slab`)."""
    key = _norm_name(name)
    m = SLAB_NAME.fullmatch(key)
    if m:
        return slab(get_scanner(m.group(1)), int(m.group(2)))
    for sc in SCANNERS.values():
        if key in (_norm_name(n) for n in sc.names):
            return sc
    raise ValueError(f"unknown scanner {name!r}; valid: {', '.join(SCANNERS)} "
                     f"(or STIR's names: {', '.join(s.stir_name for s in SCANNERS.values())})")


def find_scanner(name: str) -> Scanner | None:
    """``get_scanner(name)``, or None for an empty or unknown name (a header's free-text
    `originating system`, a dataset recording no scanner)."""
    try:
        return get_scanner(name) if name else None
    except ValueError:
        return None


# ---------------------------------------------------------------- transaxial
def sino_to_lor(sc: Scanner, view: ArrayLike, bin: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Detectors (d1, d2) of uncompressed views and bins (arrays, any shape); d1 is in ring_a."""
    n = sc.detectors_per_ring
    t = np.asarray(bin, np.int64) - sc.bins // 2
    v = np.asarray(view, np.int64)
    # floor(t / 2) and ceil(t / 2) for negative t too (STIR: arithmetic shifts t >> 1, (t + 1) >> 1)
    return (v + np.floor_divide(t, 2)) % n, (v - np.floor_divide(t + 1, 2) + n // 2) % n


def lor_to_bin(sc: Scanner, d1: ArrayLike, d2: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(view, bin, swapped) of the LORs between detectors d1 and d2 (d1 != d2): the uncompressed
    view and bin with ``sino_to_lor == (d1, d2)``, or, where ``swapped``, ``== (d2, d1)``. ``bin``
    may fall outside [0, bins): outside the stored field of view."""
    n = sc.detectors_per_ring
    a, b = np.asarray(d1, np.int64) % n, np.asarray(d2, np.int64) % n
    # d1 - d2 = t - N/2 (mod N) with t in (-N/2, N/2]
    t = (a - b + n // 2) % n
    t = np.where(t > n // 2, t - n, t)
    v = (a - np.floor_divide(t, 2)) % n
    swapped = v >= n // 2  # (d2, d1) lies at view v - N/2, tangential position -t
    return np.where(swapped, v - n // 2, v), np.where(swapped, -t, t) + sc.bins // 2, swapped


def lor_to_sino(sc: Scanner, d1: ArrayLike, d2: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(view, bin) of the LORs between detectors d1 and d2, whichever end is which."""
    view, bin, _ = lor_to_bin(sc, d1, d2)
    return view, bin


def crystal_positions(sc: Scanner) -> np.ndarray:
    """(N, 2) transaxial (x, y) in mm of every detector (at the depth of interaction)."""
    psi = 2 * np.pi * np.arange(sc.detectors_per_ring) / sc.detectors_per_ring + sc.tilt_rad
    return sc.radius_mm * np.stack([np.sin(psi), -np.cos(psi)], axis=1)


def lor_endpoints(sc: Scanner) -> tuple[np.ndarray, np.ndarray]:
    """Positions (mm) of the two detectors of every uncompressed (view, bin), each (V, X, 2): d1
    (in ring_a) and d2 of ``sino_to_lor``. Projectors trace these, so they follow STIR's convention."""
    view, bin = np.meshgrid(np.arange(sc.views), np.arange(sc.bins), indexing="ij")
    d1, d2 = sino_to_lor(sc, view, bin)
    pos = crystal_positions(sc)
    return pos[d1], pos[d2]


def tof_kernel(sc: Scanner, mashing: int = 1) -> tuple[float, np.ndarray]:
    """(sigma, edges) in mm along the LOR: the standard deviation of the Gaussian timing kernel and
    the ``tof_bins / mashing + 1`` bin edges (``sc.tof_bins`` is unmashed, as in STIR),
    measured from the LOR's midpoint along d = (-sin phi, cos phi) (phi of ``lor_coordinates``).
    The outer edges are -inf / +inf (the outer bins are open-ended)."""
    m = mashing
    n = sc.tof_bins // m
    c = SPEED_OF_LIGHT_MM_PER_PS / 2  # a time difference dt moves the emission point by c dt / 2
    sigma = c * sc.tof_fwhm_ps / (2 * math.sqrt(2 * math.log(2)))
    edges = (np.arange(n + 1) - n / 2) * c * sc.tof_bin_ps * m
    edges[0], edges[-1] = -np.inf, np.inf
    return sigma, edges


def lor_coordinates(sc: Scanner) -> tuple[np.ndarray, np.ndarray]:
    """Exact normal angle phi (rad) and signed distance s (mm) of every uncompressed (view, bin),
    each (V, X): the chord between its two detectors is {p : p . (cos phi, sin phi) = s}."""
    n = sc.detectors_per_ring
    t = np.arange(sc.bins) - sc.bins // 2  # (X,)
    phi = 2 * np.pi * np.arange(sc.views)[:, None] / n - np.pi * (t[None, :] % 2) / n + sc.tilt_rad  # (V, X)
    s = sc.radius_mm * np.sin(np.pi * t / n)
    return phi, np.broadcast_to(s, phi.shape)


# ---------------------------------------------------------------- virtual crystals
def virtual_crystal(sc: Scanner, crystal: ArrayLike) -> np.ndarray:
    """True for virtual (gap) crystals: the first ``virtual_trans`` of each transaxial block."""
    return np.asarray(crystal, np.int64) % sc.block_trans < sc.virtual_trans


def virtual_ring(sc: Scanner, ring: ArrayLike) -> np.ndarray:
    """True for virtual rings: the last ``virtual_axial`` of each axial block."""
    return np.asarray(ring, np.int64) % sc.block_axial >= sc.block_axial - sc.virtual_axial


def transaxial_valid(sc: Scanner) -> np.ndarray:
    """(V, X) bool over uncompressed views: both detectors of the LOR are real crystals."""
    view, bin = np.meshgrid(np.arange(sc.views), np.arange(sc.bins), indexing="ij")
    d1, d2 = sino_to_lor(sc, view, bin)
    return ~(virtual_crystal(sc, d1) | virtual_crystal(sc, d2))


def gap_mask(sc: Scanner) -> np.ndarray:
    """(V, X) uint8 over uncompressed views: 0 where an end of the LOR is a virtual crystal."""
    return transaxial_valid(sc).astype(np.uint8)


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


def check_blocks(sc: Scanner, blocks: ArrayLike) -> np.ndarray:
    """Block ids as a 1-D int64 array; ValueError naming the valid range otherwise."""
    blocks = np.asarray(blocks, np.int64).reshape(-1)
    n_blocks = block_counts(sc)[1]
    if ((blocks < 0) | (blocks >= n_blocks)).any():
        raise ValueError(f"dead blocks {blocks.tolist()}: ids must be in [0, {n_blocks}) on scanner {sc.name!r}")
    return blocks


def transaxial_block_masks(sc: Scanner) -> np.ndarray:
    """(n_trans, 2, V, X) bool over uncompressed views: LORs whose end d1 / d2 lies in block t."""
    view, bin = np.meshgrid(np.arange(sc.views), np.arange(sc.bins), indexing="ij")
    d1, d2 = sino_to_lor(sc, view, bin)
    blocks = np.arange(block_counts(sc)[0])[:, None, None]  # (T, 1, 1)
    return np.stack([d1 // sc.block_trans == blocks, d2 // sc.block_trans == blocks], axis=1)
