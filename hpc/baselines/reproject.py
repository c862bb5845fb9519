"""The physicist's baseline: reconstruct each plane from its measured bins only (2-D OSEM, gaps out of
the likelihood, multiplicative factors and randoms modelled when known) and project the image into
the gaps (hpc.physics.recon.reproject). Its free parameter, the OSEM iteration count, is chosen on
validation data from ``TUNE_ITERS`` (4 subsets).
"""
from __future__ import annotations

import numpy as np
import torch

from hpc.baselines.stack import Stack
from hpc.physics import recon as R
from hpc.registry import BASELINES

TUNE_ITERS = (1, 2, 3, 4, 6, 8, 12, 16, 24)  # candidates, scored in one OSEM run (hpc.physics.recon.reproject_path)
DEFAULT_ITERS = 8  # when no validation chose one


@BASELINES.register("reproject", order=0, needs_scanner=True, tune={"iters": TUNE_ITERS})
def reproject(stack: Stack, planes: np.ndarray, iters: int = DEFAULT_ITERS) -> np.ndarray:
    """2-D OSEM (``iters`` x 4 subsets) of each requested plane, projected into its gaps."""
    def t(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a[planes])).float()

    out = R.reproject(stack.scanner, t(stack.y), t(stack.w), iters, R.REPROJECT_SUBSETS,
                      valid=torch.from_numpy(np.ascontiguousarray(stack.valid[planes])), mult=t(stack.mult),
                      add=t(stack.randoms))
    return out.double().numpy()
