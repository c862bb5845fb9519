"""Siemens component-based normalisation (ECAT8 ``.n``) -> per-bin efficiencies (files: hpc.io.normfile).

Re-derived from STIR's ``BinNormalisationFromECAT8`` and ``InterfileNormHeaderSiemens`` (no code
copied; docs/FORMAT.md, "Normalisation", says what was checked). The ``.n`` file is little-endian float32, one
block per component at ``data offset in bytes [k]``, ``%matrix size [k]`` fastest axis first:

- geometric effects ``{X, 2R-1}``: by ring_a + ring_b (rows) and tangential bin;
- crystal interference ``{B, X}``: by tangential bin (rows) and uncompressed view mod B (B = crystals
  per block transaxially);
- crystal efficiencies ``{N, R}``: by ring (rows) and crystal. On the mMR STIR shifts them by one
  crystal (crystal c takes the value stored at c - 1, cyclically) before use;
- axial effects ``{planes}``: one per plane of the norm's own layout (span 11 / %maximum ring
  difference: mMR 837, mCT 621), by the plane holding the ring pair; ring differences beyond it: 1;
- dead-time parameters and "additional axial effects": read and kept, not used (as in STIR).

A bin's efficiency (what multiplies the true counts; normalisation divides by it) is, over the
uncompressed views u it mashes and the ring pairs (a, b) of its plane, with crystals (c_a, c_b) of
(u, bin) and the virtual crystals' efficiencies set to 0:

    eff = sum_u  I[bin, u mod B]  sum_(a,b)  e[a, c_a] e[b, c_b] G[a + b, bin] / A[plane(a, b)]

so a span-compressed bin sums its ring pairs, and a LOR through a virtual crystal has 0. (STIR's
loop over mashed views adds the running sum each time, counting the first view m times; with
view mashing 1, as the mMR stores, both agree.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpc.physics import geometry as G
from hpc.physics import projdata as P

MAIN = ("geometric effects", "crystal interference", "crystal efficiencies", "axial effects")
USE_ALL = ("crystal", "geometric", "interference", "axial")
MMR_CRYSTAL_SHIFT = 1  # STIR: "for mMR, we need to shift the efficiencies for 1 crystal"


@dataclass(frozen=True)
class NormComponents:
    """The components of a Siemens normalisation file, as stored."""
    scanner: G.Scanner
    geometric: np.ndarray  # (2R - 1, X) by ring_a + ring_b, bin
    interference: np.ndarray  # (X, B) by bin, view mod B
    crystal: np.ndarray  # (R, N) as stored (before any shift)
    axial: np.ndarray  # (planes of norm_layout,) divides
    norm_layout: P.Layout  # the span / maximum ring difference the axial effects are given for
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # other components by name, unused
    path: Path | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected ``%matrix size`` of each main component, fastest axis first (Siemens order)."""
        sc = self.scanner
        return {MAIN[0]: (sc.bins, 2 * sc.rings - 1), MAIN[1]: (sc.block_trans, sc.bins),
                MAIN[2]: (sc.detectors_per_ring, sc.rings), MAIN[3]: (self.norm_layout.planes,)}


def crystal_shift(sc: G.Scanner) -> int:
    """Crystals the stored efficiencies are rolled by before use: 1 on the mMR (STIR), 0 elsewhere
    (where no shift is known)."""
    return MMR_CRYSTAL_SHIFT if sc.name == "mmr" else 0


def crystal_efficiencies(comp: NormComponents, shift: int | None = None, gaps: bool = True) -> np.ndarray:
    """(R, N) crystal efficiencies as used: shifted (default: 1 crystal on the mMR, as STIR; 0
    elsewhere, where it is not known) and 0 at virtual crystals and rings (``gaps``)."""
    sc = comp.scanner
    shift = crystal_shift(sc) if shift is None else shift
    eff = np.roll(comp.crystal, shift, axis=1)  # eff[:, c] = stored[:, c - shift]
    if gaps:
        virtual = G.virtual_crystal(sc, np.arange(sc.detectors_per_ring))[None, :] \
            | G.virtual_ring(sc, np.arange(sc.rings))[:, None]
        eff = np.where(virtual, 0.0, eff)
    return eff


def axial_table(comp: NormComponents) -> np.ndarray:
    """(R, R) axial-effect divisor of each ring pair (a, b); 1 beyond the norm's ring differences."""
    sc = comp.scanner
    plane, ra, rb = comp.norm_layout.ring_pairs
    table = np.ones((sc.rings, sc.rings))
    table[ra, rb] = comp.axial[plane]
    return table


def bin_efficiencies(comp: NormComponents, layout: P.Layout, planes: np.ndarray | None = None,
                     use: tuple[str, ...] = USE_ALL, shift: int | None = None) -> np.ndarray:
    """(n, V, X) float32 efficiencies of ``planes`` (storage indices; None: all) of ``layout``
    (non-TOF; a TOF layout's bins share them). ``use``: the components to apply (STIR's
    use_detector_efficiencies, use_geometric_factors, ...)."""
    sc = comp.scanner
    if layout.scanner != sc or layout.bins != sc.bins:
        raise ValueError(f"layout ({layout.scanner.name}, {layout.bins} bins) is not the norm's "
                         f"({sc.name}, {sc.bins} bins)")
    planes = np.arange(layout.planes) if planes is None else np.asarray(planes, np.int64).reshape(-1)
    u, b = np.meshgrid(np.arange(sc.views), np.arange(sc.bins), indexing="ij")
    ca, cb = G.sino_to_lor(sc, u, b)  # (U, X) crystals of each uncompressed LOR
    eff = crystal_efficiencies(comp, shift) if "crystal" in use else np.ones((sc.rings, sc.detectors_per_ring))
    geo = comp.geometric if "geometric" in use else np.ones_like(comp.geometric)
    ax = axial_table(comp) if "axial" in use else np.ones((sc.rings, sc.rings))
    inter = comp.interference[b, u % sc.block_trans] if "interference" in use else 1.0  # (U, X)
    pl, ra, rb = layout.ring_pairs
    first = np.searchsorted(pl, np.arange(layout.planes + 1))  # ring pairs of plane p: first[p]:first[p+1]
    out = np.empty((planes.size, layout.views, layout.bins), np.float32)
    for i, p in enumerate(planes):
        a, bb = ra[first[p]:first[p + 1]], rb[first[p]:first[p + 1]]  # (K,) ring pairs
        lor = eff[a][:, ca] * eff[bb][:, cb] * (geo[a + bb] / ax[a, bb][:, None])[:, None, :]  # (K, U, X)
        per_view = lor.sum(0) * inter  # (U, X)
        out[i] = per_view.reshape(layout.views, layout.view_mashing, sc.bins).sum(1)
    return out
