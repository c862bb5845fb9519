"""The fully 3-D physics baseline: OSEM of the whole study's slab with the 3-D projector (oblique and
span-compressed planes traced as the sums of their ring pairs' oblique LORs, detector blur modelled
by default), its expected counts projected into the gaps (hpc.physics.recon3d.reproject3d). A
``whole_study`` baseline: it sees the study in canonical order with its layout (non-TOF only). Its
free parameter, the OSEM iteration count (4 subsets of views), is chosen on validation data from
``TUNE_ITERS``. It runs on the GPU when one is visible (``device="auto"``; ``--method-param
device=cpu`` keeps it on the CPU): ~16 s per projection of an mMR 8-ring slab on one CPU core.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from hpc.baselines.reproject import reproject as reproject2d
from hpc.baselines.stack import Stack
from hpc.distributed.device import DEVICES, resolve_device
from hpc.errors import HpcWarning
from hpc.physics import recon3d as R3
from hpc.physics.projdata import Layout, span1_layout
from hpc.registry import BASELINES

TUNE_ITERS = (1, 2, 3, 4, 6, 8, 12, 16)  # one OSEM run serves them all (Stack.planned); resolution
# recovery (the blur model) converges slower than the 2-D reproject: the demo chose 8 of (1..8), the edge
DEFAULT_ITERS = 4  # when no validation chose one


def _segment_layout(stack: Stack) -> Layout | None:
    """The layout of a stack handed over without one (hpc evaluate gives segment stacks): the direct
    planes of a span-1 segment 0 (one plane per ring) are a layout; anything else is None."""
    sc = stack.scanner
    if sc is None or stack.y.shape != (sc.rings, sc.views, sc.bins):
        return None
    return span1_layout(sc, [0])


def _tensor(a: np.ndarray | None, dev: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(dev, dtype)


@BASELINES.register("reproject3d", order=1, needs_scanner=True, whole_study=True, tune={"iters": TUNE_ITERS})
def reproject3d(stack: Stack, planes: np.ndarray, iters: int = DEFAULT_ITERS, blur: bool = True,
                device: str = "auto") -> np.ndarray:
    """3-D OSEM (``iters`` x 4 subsets) of the whole study, projected into the gaps of ``planes``."""
    if device not in DEVICES:
        raise ValueError(f"baseline 'reproject3d': device must be one of {', '.join(DEVICES)}, got {device!r}")
    layout = stack.layout if stack.layout is not None else _segment_layout(stack)
    if layout is None:  # a stack of unknown planes (hpc evaluate's segment stacks of a compressed study)
        warnings.warn("reproject3d: no layout for a stack of one segment; ran the 2-D reproject instead "
                      "(the 3-D baseline needs the whole study: hpc predict --method reproject3d)",
                      HpcWarning, stacklevel=2)
        return reproject2d(stack, planes, iters=iters)
    if layout.tof_bins > 1 or stack.y.shape != (layout.planes, layout.views, layout.bins):
        raise ValueError(f"baseline 'reproject3d': study {stack.y.shape} is not the non-TOF layout's "
                         f"({layout.planes}, {layout.views}, {layout.bins}) (TOF is not supported)")
    key = ("reproject3d", int(iters), bool(blur))
    if key not in stack.memo:  # one reconstruction per study, whatever planes each call asks for
        # every iteration count planned on this stack with the same blur (hpc evaluate's tuning
        # candidates) from one OSEM run: 8 iterations for all of (1, 2, 3, 4, 6, 8) instead of 24
        want = {int(iters)} | {int(p.get("iters", DEFAULT_ITERS)) for p in stack.planned.get("reproject3d", ())
                               if bool(p.get("blur", True)) == bool(blur)}
        # float32 reconstruction; the repair in float64, so measured bins keep their exact values
        dev = resolve_device(device, what="reproject3d's device")
        t = {k: _tensor(getattr(stack, k), dev) for k in ("w", "mult", "randoms")}
        path = R3.reproject3d_path(layout, _tensor(stack.y, dev, torch.float64), t["w"], sorted(want), R3.SUBSETS,
                                   valid=_tensor(stack.valid, dev, torch.bool), mult=t["mult"], add=t["randoms"],
                                   blur=bool(blur), dtype=torch.float32)
        for it, out in path.items():
            stack.memo[("reproject3d", it, bool(blur))] = out.double().cpu().numpy()
    return stack.memo[key][np.asarray(planes)]
