"""The validation panel a training run logs (W&B, TensorBoard): one figure that shows a repair.

The slice is the validation slice with the most gap pixels (hpc.train.validate keeps it), as
`hpc evaluate` picks its panels. Columns: the network's input (gaps zeroed), its prediction, the
target, |prediction - target| and the mask, each with a labelled colour bar. The scales are fixed
so that panels of successive validations (the same slice) compare by eye: the sinograms and the
error share 0 .. the target's maximum (an error as bright as the data is as large as the data); the
mask spans 0 (gap, black) .. 1 (measured, white), so a slice without gaps is white, never black.
"""
from __future__ import annotations

import numpy as np
import torch

COLUMNS = (("input", "input (gaps zeroed)", "viridis"), ("prediction", "prediction", "viridis"),
           ("target", "target", "viridis"), ("error", "|prediction - target|", "magma"),
           ("mask", "mask (1 = measured)", "gray"))


def _array(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, np.float32)


def render_panel(panels: dict, step: int) -> tuple[np.ndarray, str]:
    """(RGB uint8 (H, W, 3), caption) of the panel of a validation at ``step`` samples. ``panels``:
    (V, X) images under the names of COLUMNS, plus ``slice`` (its global slice id) and
    ``gap_pixels`` when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = {k: _array(panels[k]) for k, _, _ in COLUMNS if k in panels}
    top = float(max(np.nanmax(arrays["target"]) if "target" in arrays else 0.0, 1e-12))
    limits = {"mask": (0.0, 1.0)}
    caption = (f"step {step}: validation slice {panels.get('slice', '?')}, the one with the most gap pixels "
               f"({panels.get('gap_pixels', '?')}); sinograms and error on 0..{top:.3g} (normalized counts)")
    fig, axes = plt.subplots(1, len(arrays), figsize=(2.6 * len(arrays), 3.0), squeeze=False)
    for ax, (key, label, cmap) in zip(axes[0], [c for c in COLUMNS if c[0] in arrays], strict=True):
        lo, hi = limits.get(key, (0.0, top))
        im = ax.imshow(arrays[key], cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("bin", fontsize=7)
        ax.set_ylabel("view", fontsize=7)
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, shrink=0.85).ax.tick_params(labelsize=6)
    fig.suptitle(caption, fontsize=7)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.15, top=0.8, wspace=0.45)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb, caption
