"""`hpc predict --dose F`: denoise a low-dose scan (a fraction F of a full scan's counts) into an
estimate of the full-dose counts, written in the source's format (docs/EVALUATION.md, "Denoising").

- ``--method unet``: a denoising checkpoint (``corrupt.dose`` or ``corrupt.paired``), fed what it was
  trained on (network_input: thinned counts scaled by 1 / F, or stored low-dose
  counts as they are), every slice through the network;
- any registered denoiser (hpc.registry.DENOISERS: ``reproject``, ``gauss``, ``scaled``), no
  checkpoint, its free parameters from ``--method-param`` (what `hpc evaluate --task denoise`
  recommends), factors from ``--mult`` / ``--randoms`` (the FULL-dose randoms + scatter estimate).

Every bin with a line of response is replaced (there are no measured bins to keep); integer files
are rounded and clipped, and the counts reported, as for a repair.

    m = resolve_denoise("gauss", ["sigma=1.0"], None, dose=0.25)
    counts = denoise_study(m, spec, read, None, writer.write, batch=16)
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpc.baselines.denoise import LowDose
from hpc.errors import InputError
from hpc.io.spec import SinogramSpec
from hpc.physics.geometry import find_scanner
from hpc.progress import Progress
from hpc.registry import DENOISERS
from hpc.repair.inference import Counts, MaskFn, Repairer, ValidFn, compose, repair, stack_bounds

UNET = "unet"


def network_input(rep: Repairer, low: np.ndarray, dose: float) -> np.ndarray:
    """What the network was trained on: the stored low-dose counts (corrupt.paired), or thinned
    counts scaled back to the full dose (corrupt.dose < 1: hpc.data.transform)."""
    return low if rep.cfg.corrupt.paired else low / dose


def check_denoiser(rep: Repairer) -> None:
    c = rep.cfg.corrupt
    if not (c.paired or c.dose < 1):
        raise InputError(f"{rep.path}: not a denoising network (trained with corrupt.dose = {c.dose} and "
                         "corrupt.paired = false); train with e.g. corrupt.dose=0.25 corrupt.dead_blocks=0")


@dataclass
class DenoiseMethod:
    """What `hpc predict --dose F --method NAME` runs."""
    name: str  # unet or a registered denoiser
    params: dict[str, Any]
    dose: float
    scanner: str = ""  # --scanner; else each file's header, else the checkpoint's
    checkpoint: Repairer | None = None

    @property
    def meta(self) -> dict[str, Any]:
        return {} if self.name == UNET else DENOISERS.meta(self.name)

    def scanner_name(self, spec: SinogramSpec) -> str:
        if self.name == UNET:
            return self.checkpoint.scanner
        return self.scanner or spec.scanner or (self.checkpoint.scanner if self.checkpoint else "")

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"--dose {self.dose:g} --method {self.name}" + (f" ({args})" if args else "")


def resolve_denoise(name: str, items: list[str], rep: Repairer | None, dose: float, scanner: str = "") -> DenoiseMethod:
    """--dose F --method NAME --method-param ``items`` -> a DenoiseMethod (one line for anything wrong)."""
    if not 0 < dose < 1:
        raise InputError(f"--dose must be in (0, 1): the fraction of a full scan's counts, got {dose}")
    names = (UNET, *DENOISERS.names())
    if name not in names:
        raise InputError(f"--dose: --method {name} does not denoise; expected one of {' | '.join(names)}")
    if name == UNET:
        if rep is None:
            raise InputError("--dose --method unet needs --checkpoint (a denoising checkpoint written by hpc train)")
        if items:
            raise InputError(f"--method-param {items[0]}: unet takes no parameters")
        check_denoiser(rep)
        return DenoiseMethod(name, {}, dose, scanner, rep)
    params = denoiser_defaults(name)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in params:
            raise InputError(f"--method-param {item}: {name} takes {', '.join(f'{k}=' for k in params) or 'nothing'}")
        params[key] = denoiser_value(name, key, value, f"--method-param {item}")
    return DenoiseMethod(name, params, dose, scanner, rep)


def denoiser_defaults(name: str) -> dict[str, Any]:
    """A registered denoiser's free parameters (keywords after ``(d, planes)``) and their defaults."""
    return {k: p.default for k, p in list(inspect.signature(DENOISERS.get(name)).parameters.items())[2:]}


def denoiser_value(name: str, key: str, value: str, where: str) -> Any:
    """``value`` as the type of the parameter's default (one line naming ``where`` if it is not one)."""
    kind = type(denoiser_defaults(name)[key])
    try:
        return kind(value)
    except ValueError:
        raise InputError(f"{where}: {value!r} is not a {kind.__name__}") from None


def denoise_study(m: DenoiseMethod, spec: SinogramSpec, read: Callable[[int, int], np.ndarray], mask: MaskFn | None,
                  write: Callable[[int, np.ndarray], None], batch: int, progress: Progress | None = None,
                  aux: dict[str, Callable[[int, int], np.ndarray]] | None = None, valid: ValidFn | None = None,
                  todo: np.ndarray | None = None) -> Counts:
    """Every slice of ``spec`` denoised (``mask`` is None: nothing is measured "as is"); the
    network through hpc.repair.inference.repair on its training scale, a denoiser stack by stack."""
    if m.name == UNET:
        rep = m.checkpoint

        def scaled(a: int, b: int) -> np.ndarray:
            return network_input(rep, read(a, b).astype(np.float32), m.dose)

        counts = repair(rep, spec, scaled, None, write, batch, progress, aux, valid, todo)
        return counts
    counts, run, sc = Counts(), DENOISERS.get(m.name), find_scanner(m.scanner_name(spec))
    lo, hi = stack_bounds(spec)
    for a, b in sorted(set(zip(lo.tolist(), hi.tolist(), strict=True))):
        src = read(a, b)  # (n, V, X) source dtype: one (TOF bin, segment) stack in memory
        factors = {k: np.asarray(f(a, b), np.float64) for k, f in (aux or {}).items()}
        v = np.ones(src.shape, bool) if valid is None else valid(a, b).copy()
        if "mult" in factors:
            v &= factors["mult"] > 0
        d = LowDose(src.astype(np.float64), m.dose, v, factors.get("mult"), factors.get("randoms"), sc)
        pred = np.concatenate([np.asarray(run(d, np.arange(c, min(c + batch, b - a)), **m.params), np.float64)
                               for c in range(0, b - a, batch)])
        pred = np.maximum(pred, 0.0)  # counts (as `hpc evaluate` floors every output)
        out = compose(src, pred, None, v, spec.dtype, counts, merged=True)
        counts.slices += b - a
        counts.modelled += b - a
        if progress is not None:
            progress.update(b - a)
        write(a, out.astype(spec.dtype.newbyteorder("=")))
    return counts
