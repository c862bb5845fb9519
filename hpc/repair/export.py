"""Export a checkpoint as one self-contained model for LibTorch (TorchScript) or ONNX Runtime.

The exported graph takes counts, not network values: ``repaired = model(raw, mask)`` with raw
(B, 2k+1, V, X) float32 context stacks (the slice and its k neighbours each side in the same
segment, edges replicated as `hpc predict` does) and mask (B, 2k+1, V, X) float32 measured fractions
(1 = measured, 0 = gap, in between a partly lost span-compressed bin: its counts + (1 - mask) x model).
It zeroes the gaps, normalizes, pads, runs the network, crops, denormalizes and returns
(B, 1, V, X) float32 counts in which measured pixels are the input's own values. The batch size is
free; V and X are fixed to the training slice size (or --slice-shape). FILE.json beside the model
records these conventions and the preprocessing parameters.

A data.fill=reproject model runs an OSEM reconstruction (a sparse-matrix projector) before its
network, which is not traceable: its fill stays OUTSIDE the exported graph, which then takes a third
input, ``filled`` (B, 2k+1, V, X) float32: the same context stacks with their gaps filled by the
reproject fill (what `hpc predict --method reproject --method-param iters=N` writes for the file,
N = data.fill_iters; its Python call is in the sidecar). ``raw`` still gives the measured counts
that are kept (and a partly lost bin's counts). FILE.json's ``fill`` says how to compute it.

examples:
  hpc export --checkpoint runs/demo/checkpoints/best.pt --format onnx -o repair.onnx
  hpc export --checkpoint best.pt --format torchscript -o repair.pt --slice-shape 252,344
  hpc export --checkpoint reproject_fill.pt --format onnx -o repair.onnx   # inputs raw, mask, filled
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from hpc.errors import InputError, OutputError
from hpc.io.atomic import atomic_path, atomic_write_text, refuse_onto, sweep_stale
from hpc.physics.recon import REPROJECT_SUBSETS
from hpc.registry import FILLS
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
        return self.repair(raw, mask, self.pre.gaps(raw, mask))

    def repair(self, raw: torch.Tensor, mask: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        """The network on ``filled`` (B, C, V, X: the gaps as data.fill fills them), merged with ``raw``."""
        c = self.centre
        x, state = self.pre.forward(filled)  # (B, C, V', X')
        y = self.model(x, self.pre.pad_mask(mask[:, c:c + 1], state))
        out = self.pre.inverse(y, state)  # (B, 1, V, X) counts
        m, r = mask[:, c:c + 1], raw[:, c:c + 1]
        # measured kept bitwise, gaps from the model, a partly measured bin: its counts + the lost fraction
        return torch.where(m >= 1, r, torch.where(m > 0, r + (1 - m) * out, out))


class FilledCountsModel(CountsModel):
    """A model whose fill cannot be traced (data.fill=reproject): the filled stacks are an input."""

    def forward(self, raw: torch.Tensor, mask: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        return self.repair(raw, mask, filled)


def fill_outside(rep: Repairer) -> bool:
    """Whether the model's data.fill stays outside the exported graph (registered with
    ``export="outside"``: a reconstruction, not traceable)."""
    return FILLS.meta(rep.cfg.data.fill).get("export") == "outside"


def example_inputs(rep: Repairer, shape: tuple[int, int], batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Poisson-like counts and a mask with a gap band, (batch, C, V, X) each (tracing and tests);
    with the fill outside the graph also ``filled`` (the counts, gaps at their mean)."""
    g = torch.Generator().manual_seed(0)
    c = rep.cfg.in_channels()
    raw = torch.poisson(torch.full((batch, c, *shape), 20.0), generator=g)
    mask = torch.ones_like(raw)
    mask[..., shape[1] // 3: shape[1] // 3 + max(1, shape[1] // 8)] = 0.0
    if not fill_outside(rep):
        return raw, mask
    return raw, mask, torch.where(mask > 0, raw, torch.full_like(raw, 20.0))


def fill_recipe(rep: Repairer) -> dict:
    """The sidecar's ``fill``: which fill the model expects and how to compute it outside the graph."""
    d, sc, iters = rep.cfg.data, rep.scanner or "NAME", rep.cfg.data.fill_iters
    if not fill_outside(rep) or d.fill != "reproject":
        return {"data.fill": d.fill, "in_graph": not fill_outside(rep)}
    return {
        "data.fill": d.fill, "in_graph": False, "fill_iters": iters, "subsets": REPROJECT_SUBSETS, "scanner": sc,
        "factors": "mult (efficiency x attenuation) and randoms are modelled when given: give the study's own, "
                   "as for hpc predict; without mult the scanner's virtual-crystal LORs are left out",
        # what `hpc predict --method hybrid` runs the fill with: the count validation chose for reproject
        "hybrid_iters": int(rep.metrics.get("reproject_iters", 0)) or None,
        "command": f"hpc predict --method reproject --method-param iters={iters} --scanner {sc} INPUT --mask MASK "
                   "[--mult MULT --randoms RANDOMS] -o FILLED",
        "command_note": "FILLED's slices, windowed like raw's, are the filled stacks; from a float32 INPUT they "
                        "are the fill exactly (an integer file is written rounded: use the Python call)",
        "python": f"hpc.physics.recon.ReprojectFill(hpc.physics.geometry.get_scanner({sc!r}), iters={iters}, "
                  f"subsets={REPROJECT_SUBSETS})(raw, mask, {{'mult': mult, 'randoms': randoms}})  # (B, C, V, X) "
                  "float32 tensors; leave out the factors you do not have",
    }


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Tracing and ONNX export talk: TracerWarnings about Python branches on shapes (fixed here: V
    and X are fixed, only the batch is free), FutureWarnings from torch's own internals, log lines
    about torchvision operators and progress prints. None of it is about the user's model or
    input, so none of it is shown; a failure is still an exception (the CLI's one line)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export(rep: Repairer, fmt: str, path: Path, shape: tuple[int, int]) -> tuple[Path, Path]:
    """Write the model and its JSON sidecar atomically; returns both paths."""
    # a reproject fill (sparse-matrix OSEM) is not traceable to ONNX: it stays outside, its output an input
    names = ["raw", "mask", "filled"] if fill_outside(rep) else ["raw", "mask"]
    model = FilledCountsModel(rep) if fill_outside(rep) else CountsModel(rep)
    module = model.cpu().eval().requires_grad_(False)  # an inference graph: no parameter wants grads
    inputs = example_inputs(rep, shape)
    with torch.no_grad(), quiet_tracing(), atomic_path(path) as tmp:
        if fmt == "torchscript":
            torch.jit.trace(module, inputs, check_trace=False).save(str(tmp))
        else:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(module, inputs, str(tmp), input_names=names, output_names=["repaired"],
                              dynamic_shapes=tuple({0: batch} for _ in names), opset_version=OPSET, dynamo=True,
                              external_data=False, verbose=False)
    cfg = rep.cfg
    meta = {
        "checkpoint": str(rep.path), "format": fmt, "inputs": {n: ["batch", cfg.in_channels(), *shape] for n in names},
        "output": {"repaired": ["batch", 1, *shape]}, "units": "counts (float32); mask 1 = measured",
        "context": cfg.data.context, "edge": cfg.data.edge, "normalize": cfg.data.normalize,
        "scale": rep.pre.scale, "pad_multiple": rep.pre.multiple, "pad_bins": cfg.data.pad_bins,
        "pad_views": "periodic, radial axis mirrored on wrap", "model": cfg.model.name,
        "inpaint": cfg.model.inpaint, "scanner": rep.scanner, "fill": fill_recipe(rep),
    }
    sidecar = atomic_write_text(path.with_name(path.name + ".json"), json.dumps(meta, indent=1) + "\n")
    return path, sidecar


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint .pt written by hpc train")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("-o", "--output", required=True, help="model file (FILE.json is written beside it)")
    p.add_argument("--slice-shape", metavar="V,X", help="views,bins (default: the training slice size)")


def check_outputs(out: Path, checkpoint: Path, fmt: str) -> None:
    """Refuse, before the work, outputs that could not be written after it: the checkpoint itself,
    a directory (the model or its sidecar, which is written second); leftovers of a killed export go."""
    targets = [out, out.with_name(out.name + ".json")]
    refuse_onto(targets, [checkpoint])  # -o m.pt on m.pt
    for t in targets:
        if t.is_dir():
            raise OutputError(f"{t}: is a directory; give the model a file name (e.g. -o {t}/repair"
                              f"{'.pt' if fmt == 'torchscript' else '.onnx'})")
    sweep_stale(out.parent, out.name)


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    check_outputs(out, Path(args.checkpoint), args.format)
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
    model, sidecar = export(rep, args.format, out, shape)
    print(f"wrote {model} and {sidecar}")
    return 0
