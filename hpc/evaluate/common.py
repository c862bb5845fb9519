"""What both of `hpc evaluate`'s tasks (repair: hpc.evaluate.evaluate, denoise: hpc.evaluate.denoise)
share: the slices scored, the scanner geometry of a study, the per-study result sums and their
pooling, the lines of response, and the image reconstruction every version gets.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hpc.errors import OutputError
from hpc.evaluate.scoring import IMAGE_ITERS, IMAGE_SUBSETS, ImageScore, SinoScore
from hpc.evaluate.studies import Study
from hpc.io.spec import SinogramSpec
from hpc.physics import geometry as G
from hpc.physics import recon as R
from hpc.physics.geometry import find_scanner
from hpc.physics.projector import cached_projector, default_grid
from hpc.repair.inference import Repairer, model_output, windows


def pick_slices(n: int, limit: int) -> np.ndarray:
    """All slices, or ``limit`` evenly spaced ones (deterministic)."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def geometry(rep: Repairer | None, layout: SinogramSpec):
    """The scanner whose projector matches these slices (uncompressed views), or None: the
    checkpoint's training scanner first (when there is one), else the file's."""

    sc = find_scanner(rep.scanner if rep is not None else "") or find_scanner(
        str(layout.fields.get("originating system", "")))
    return sc if sc is not None and (sc.views, sc.bins) == tuple(layout.slice_shape) else None


@dataclass
class StudyResult:
    sino: dict[str, dict[str, SinoScore]] = field(default_factory=dict)  # method -> ref -> score
    image: dict[str, dict[str, ImageScore]] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)  # method -> seconds for this study
    panel: dict | None = None
    panel_rank: tuple[bool, int] = (False, -1)  # (has images, gap pixels) of the panel's slice: the most wins
    slices: int = 0  # slices scored
    image_planes: int = 0  # direct planes reconstructed (for each version) for the image metrics


def valid_lors(sc, data: dict, shape: tuple[int, ...]) -> np.ndarray:
    """Pixels that can hold counts: mult > 0 when known, else the scanner's real-crystal LORs."""

    if "mult" in data:
        return data["mult"] > 0
    if sc is not None:
        return np.broadcast_to(G.gap_mask(sc) > 0, shape).copy()
    return np.ones(shape, bool)


def image_planes(sc, st: Study, lo: int, hi: int, images: bool = True) -> np.ndarray | None:
    """Axial positions (mm from the first ring) of a segment-0 stack's planes, if it gets images."""
    seg, counts = st.layout.segments, st.layout.axial_counts
    if not images or sc is None or lo != 0 or st.layout.tof_bins != 1 or seg[0] != 0:
        return None
    if counts[0] == sc.rings:
        return np.arange(hi - lo) * sc.ring_spacing_mm
    if counts[0] == 2 * sc.rings - 1:  # span-compressed segment 0: half-ring steps
        return np.arange(hi - lo) * sc.ring_spacing_mm / 2
    return None


def reconstruct(sc, sino: np.ndarray, valid: np.ndarray, data: dict) -> np.ndarray:
    """OSEM (IMAGE_ITERS x IMAGE_SUBSETS) images (N, ny, nx) of sinograms (N, V, X), every valid bin
    used (gaps of a gapped sinogram are zeros to it), mult and randoms modelled when known."""
    t = {k: torch.from_numpy(np.ascontiguousarray(data[k])).float() for k in ("mult", "randoms") if k in data}
    x = R.osem(sc, torch.from_numpy(np.ascontiguousarray(sino)).float(), IMAGE_ITERS, IMAGE_SUBSETS,
               weight=torch.from_numpy(valid).float(), mult=t.get("mult"), add=t.get("randoms"))
    return x.double().numpy()


def warm_projectors(sc, device: torch.device | str = "cpu") -> float:
    """Build (and cache) the system matrices reproject and the image reconstruction use; their one-time
    cost is reported apart from the methods' times. Returns the seconds it took."""

    t0 = time.perf_counter()
    grid = default_grid(sc)
    for subsets in (R.REPROJECT_SUBSETS, IMAGE_SUBSETS):
        R.subset_projectors(sc, grid, subsets, False, torch.device(device))
    cached_projector(sc, grid, False, 0, 1, device)
    return time.perf_counter() - t0


def check_output_dir(out: Path, inputs: list[Path] = ()) -> None:
    """-o must be a directory (or not exist yet), never an existing file, and never the input
    dataset or simulation directory or a place inside it (``inputs``): evaluate never writes into
    what it reads (as `hpc predict` refuses)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory (evaluate writes report.md, metrics.json "
                          "and panels/ into a directory)")
    real = os.path.realpath(out)
    for src in inputs:
        banned = os.path.realpath(src)
        if real == banned or real.startswith(banned + os.sep):
            raise OutputError(f"{out}: inside the input {src}; write the evaluation elsewhere (-o)")


def pool(results: dict[str, StudyResult]) -> StudyResult:
    pooled = StudyResult()
    for res in results.values():
        for attr in ("sino", "image"):
            for name, refs in getattr(res, attr).items():
                for ref, score in refs.items():
                    dst = getattr(pooled, attr).setdefault(name, {})
                    dst[ref] = dst[ref].add(score) if ref in dst else type(score)().add(score)
        for name, t in res.times.items():
            pooled.times[name] = pooled.times.get(name, 0.0) + t / len(results)  # mean per study
        pooled.slices += res.slices
        pooled.image_planes += res.image_planes
    return pooled


def network_output(rep: Repairer, st: Study, lo: int, data: dict, w: np.ndarray | None, valid: np.ndarray,
                   planes: np.ndarray, batch: int, prepare: Callable[[np.ndarray], np.ndarray] | None = None
                   ) -> np.ndarray:
    """Model output (n, V, X) for stack planes ``planes``: context windows of ``data["input"]`` as the
    loader builds them (``prepare``d as the network was trained, e.g. a denoiser's dose scale), their
    measured fractions ``w`` (None: nothing missing), lines of response ``valid`` and, for a
    data.fill=reproject network, mult / randoms."""
    out = []
    for a in range(0, len(planes), batch):
        ids = windows(rep, st.layout, lo + planes[a:a + batch]) - lo  # (b, C) within the stack
        aux = {k: data[k][ids] for k in ("mult", "randoms") if k in data}  # data.fill=reproject models them
        x = data["input"][ids] if prepare is None else prepare(data["input"][ids])
        out.append(model_output(rep, x, None if w is None else w[ids], aux, valid[ids]))
    return np.concatenate(out)
