"""What a baseline sees and returns: one segment's stack of planes of one study.

    out = BASELINES.get("axial3d")(stack, planes)             # (n, V, X) repaired counts
    out = BASELINES.get("reproject")(stack, planes, iters=8)  # free parameters as keywords

A baseline uses the fully measured valid pixels (w = 1) as its data and returns, for the requested
``planes``, measured pixels unchanged, ``y + (1 - w) model`` in partly measured ones, the model in
gaps and 0 where no LOR exists (valid False). Registered with metadata:

- ``per_slice``: each plane is repaired alone (validation runs it on its batches' centre slices);
- ``needs_scanner``: uses the scanner geometry (skipped where the data's scanner is unknown);
- ``tune``: {parameter: candidate values} chosen on validation studies (e.g. reproject's iterations);
  a checkpoint's validation records its choice as the metric ``<baseline>_<parameter>`` (e.g.
  ``reproject_iters``), which `hpc predict --method NAME --checkpoint CKPT` then uses;
- ``whole_study``: needs every segment at once (a fully 3-D method): `hpc predict` hands it the whole
  study's slices as one stack in canonical order (TOF bin, segment, axial position), with
  ``layout`` set, and ``planes`` indexing those slices.

Free parameters are keyword arguments with defaults (``iters: int = 8``); `hpc predict
--method-param NAME=VALUE` is checked against the signature and converted to the default's type.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from hpc.registry import BASELINES


@dataclass
class Stack:
    """One segment of one study, float64 (P, V, X) unless noted."""
    y: np.ndarray  # counts as measured (what the gaps hold is ignored)
    w: np.ndarray  # measured fraction: 1 measured, 0 a gap, in between a partly lost compressed bin
    valid: np.ndarray  # bool: the pixel is a real line of response
    mult: np.ndarray | None = None  # multiplicative factors (efficiency x attenuation), when known
    randoms: np.ndarray | None = None  # additive background, when known
    scanner: object | None = None  # hpc.physics.geometry.Scanner, when known
    memo: dict = field(default_factory=dict)  # whole-stack results shared by calls on parts of its planes
    # hpc.physics.projdata.Layout of the slices, when known: set (keyword) for ``whole_study`` baselines,
    # whose stack is the whole study; None for one segment's stack
    layout: object | None = None
    # baseline name -> every parameter set it will be called with on this stack (set by `hpc evaluate`
    # when it tunes): an iterative baseline can compute them all in one run
    planned: dict = field(default_factory=dict)


# (stack, planes (n,) indices into the stack, **free parameters) -> (n, V, X) float64
Baseline = Callable[..., np.ndarray]


def per_slice(fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]) -> Baseline:
    """A baseline from a 2-D function ``fn(y (V, X), w, valid) -> (V, X)`` applied to each plane."""
    def run(stack: Stack, planes: np.ndarray) -> np.ndarray:
        return np.stack([fn(stack.y[p], stack.w[p], stack.valid[p]) for p in planes])
    run.__doc__ = fn.__doc__
    return run


def baseline_batch(name: str, x: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """A ``per_slice`` baseline on a batch: x (B, 1, V, X) centre slices, mask (B, 1, V, X) measured
    fractions, valid (V, X), (B, 1, V, X) or None -> (B, 1, V, X) with x's dtype and device
    (computed on the CPU in float64)."""
    run = BASELINES.get(name)
    if not BASELINES.meta(name).get("per_slice"):
        raise ValueError(f"baseline {name!r} needs whole stacks of planes, not a batch of slices")
    xs = x.detach().double().cpu().numpy()[:, 0]  # (B, V, X)
    ms = mask.detach().expand_as(x).double().cpu().numpy()[:, 0]
    vs = np.ones(xs.shape, bool) if valid is None else np.broadcast_to(
        valid.detach().cpu().numpy().reshape(-1, *xs.shape[-2:]) > 0, xs.shape)
    out = run(Stack(xs, ms, vs), np.arange(len(xs)))
    return torch.from_numpy(out[:, None]).to(device=x.device, dtype=x.dtype)
