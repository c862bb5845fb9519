"""Export a checkpoint as one self-contained model for LibTorch (TorchScript) or ONNX Runtime.

The exported graph takes counts, not network values: ``repaired = model(raw, mask)`` with raw
(B, 2k+1, V, X) float32 context stacks (the slice and its k neighbours each side in the same
segment, edges replicated as `hpc predict` does) and mask (B, 2k+1, V, X) float32 measured fractions
(1 = measured, 0 = gap, in between a partly lost span-compressed bin: its counts + (1 - mask) x model).
It zeroes the gaps, normalizes, pads, runs the network, crops, denormalizes and returns
(B, 1, V, X) float32 counts in which measured pixels are the input's own values. The batch size is
free; V and X are fixed to the training slice size (or --slice-shape). FILE.json beside the model
records these conventions and the preprocessing parameters.

examples:
  hpc export --checkpoint runs/demo/checkpoints/best.pt --format onnx -o repair.onnx
  hpc export --checkpoint best.pt --format torchscript -o repair.pt --slice-shape 252,344
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from hpc.errors import InputError
from hpc.io.atomic import atomic_path, atomic_write_text, refuse_onto
from hpc.repair.inference import Repairer, load_repairer

FORMATS = ("torchscript", "onnx")
# Bounds for --slice-shape: the largest sinograms (e.g. a Vision 600: 399 views x 520 bins) are far
# below; the example inputs are (2, C, V, X) float32 twice, plus the network's activations.
MAX_SIDE, MAX_PIXELS = 4096, 1 << 22
OPSET = 18


class CountsModel(nn.Module):
    """Preprocessing + network + exact inverse + measured-pixel merge, as one module."""

    def __init__(self, rep: Repairer):
        super().__init__()
        self.model, self.pre = rep.model, rep.pre
        self.centre = rep.cfg.in_channels() // 2

    def forward(self, raw: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c = self.centre
        x, state = self.pre.forward(self.pre.gaps(raw, mask))  # (B, C, V', X')
        y = self.model(x, self.pre.pad_mask(mask[:, c:c + 1], state))
        out = self.pre.inverse(y, state)  # (B, 1, V, X) counts
        m, r = mask[:, c:c + 1], raw[:, c:c + 1]
        # measured kept bitwise, gaps from the model, a partly measured bin: its counts + the lost fraction
        return torch.where(m >= 1, r, torch.where(m > 0, r + (1 - m) * out, out))


def example_inputs(rep: Repairer, shape: tuple[int, int], batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Poisson-like counts and a mask with a gap band, (batch, C, V, X) each (tracing and tests)."""
    g = torch.Generator().manual_seed(0)
    c = rep.cfg.in_channels()
    raw = torch.poisson(torch.full((batch, c, *shape), 20.0), generator=g)
    mask = torch.ones_like(raw)
    mask[..., shape[1] // 3: shape[1] // 3 + max(1, shape[1] // 8)] = 0.0
    return raw, mask


def export(rep: Repairer, fmt: str, path: Path, shape: tuple[int, int]) -> tuple[Path, Path]:
    """Write the model and its JSON sidecar atomically; returns both paths."""
    if rep.cfg.data.fill == "reproject":  # a sparse-matrix reconstruction inside: not traceable to ONNX
        raise InputError(f"{rep.path}: data.fill=reproject runs an OSEM reconstruction before the network; "
                         f"export supports data.fill=zero|linear models only")
    module = CountsModel(rep).cpu().eval()
    inputs = example_inputs(rep, shape)
    with torch.no_grad(), atomic_path(path) as tmp:
        if fmt == "torchscript":
            torch.jit.trace(module, inputs, check_trace=False).save(str(tmp))
        else:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(module, inputs, str(tmp), input_names=["raw", "mask"], output_names=["repaired"],
                              dynamic_shapes=({0: batch}, {0: batch}), opset_version=OPSET, dynamo=True,
                              external_data=False, verbose=False)
    cfg = rep.cfg
    meta = {
        "checkpoint": str(rep.path), "format": fmt, "inputs": {
            "raw": ["batch", cfg.in_channels(), *shape], "mask": ["batch", cfg.in_channels(), *shape]},
        "output": {"repaired": ["batch", 1, *shape]}, "units": "counts (float32); mask 1 = measured",
        "context": cfg.data.context, "edge": cfg.data.edge, "normalize": cfg.data.normalize,
        "scale": rep.pre.scale, "pad_multiple": rep.pre.multiple, "pad_bins": cfg.data.pad_bins,
        "pad_views": "periodic, radial axis mirrored on wrap", "model": cfg.model.name,
        "inpaint": cfg.model.inpaint, "scanner": rep.scanner,
    }
    sidecar = atomic_write_text(path.with_name(path.name + ".json"), json.dumps(meta, indent=1) + "\n")
    return path, sidecar


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint .pt written by hpc train")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("-o", "--output", required=True, help="model file (FILE.json is written beside it)")
    p.add_argument("--slice-shape", metavar="V,X", help="views,bins (default: the training slice size)")


def run(args: argparse.Namespace) -> int:
    rep = load_repairer(args.checkpoint, torch.device("cpu"))
    if args.slice_shape:
        try:
            shape = tuple(int(v) for v in args.slice_shape.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 2 or min(shape) < 1:
            raise InputError(f"--slice-shape: expected V,X positive integers, got {args.slice_shape!r}")
        if max(shape) > MAX_SIDE or shape[0] * shape[1] > MAX_PIXELS:
            raise InputError(f"--slice-shape {shape[0]},{shape[1]}: larger than any scanner's sinogram "
                             f"(at most {MAX_SIDE} per side and {MAX_PIXELS} pixels); tracing it would "
                             "allocate tens of GB")
    elif rep.slice_shape is not None:
        shape = rep.slice_shape
    else:
        raise InputError(f"{rep.path}: records no training slice size; give --slice-shape V,X")
    out = Path(args.output)
    refuse_onto([out, out.with_name(out.name + ".json")], [Path(args.checkpoint)])  # -o m.pt on m.pt
    model, sidecar = export(rep, args.format, out, shape)
    print(f"wrote {model} and {sidecar}")
    return 0
