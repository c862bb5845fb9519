"""`hpc predict --method`: which repair runs, and a baseline's repair of a whole file.

- ``unet``: the checkpoint's network, exactly as trained (hpc.repair.inference);
- ``hybrid``: the network on its tuned fill: a ``data.fill=reproject`` checkpoint whose fill runs the
  OSEM iteration count its validation chose for the reproject baseline (metric ``reproject_iters``)
  instead of ``data.fill_iters``;
- any registered baseline (hpc.registry.BASELINES): no checkpoint. Its free parameters (keyword
  arguments of its function, e.g. reproject's ``iters``) come from ``--method-param NAME=VALUE``,
  else from the checkpoint's validation when one is given (metric ``<baseline>_<parameter>``), else
  the baseline's own default.

A baseline repairs one segment's stack of planes at a time (hpc.baselines.stack.Stack: counts with
the gaps zeroed, measured fractions, valid LORs, mult / randoms when given, the scanner); one
registered with ``whole_study=True`` gets the whole study as one stack in canonical order, with its
layout. Its repaired planes go through the network's writer path (hpc.repair.inference.compose):
measured pixels keep the input's bytes, invalid LORs are 0, integer files are rounded and clipped
and the counts reported.

    method = resolve_method("reproject", ["iters=4"], None, scanner="mmr")
    counts = repair_baseline(method, spec, read, mask, writer.write, batch=16, aux={"mult": mult.read})
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpc.baselines.stack import Stack
from hpc.data.fills import build_preprocess
from hpc.errors import InputError
from hpc.io.spec import SinogramSpec
from hpc.physics.geometry import find_scanner
from hpc.progress import Progress
from hpc.registry import BASELINES, FILLS, SCANNERS
from hpc.repair.denoise import DenoiseMethod
from hpc.repair.inference import (
    Counts,
    MaskFn,
    Repairer,
    ValidFn,
    check_compatible,
    compose,
    dead_block_mask,
    file_mask,
    gap_mask,
    needs_repair,
    spec_layout,
    stack_bounds,
)
from hpc.train.models import input_multiple

UNET, HYBRID = "unet", "hybrid"
NETWORKS = (UNET, HYBRID)  # the methods that need --checkpoint
COPY_CHUNK = 256  # slices copied per read/write where nothing needs repair


def method_names() -> tuple[str, ...]:
    """What --method accepts: the networks, then the registered baselines (strongest first)."""
    return (*NETWORKS, *BASELINES.names())


@dataclass
class BaselineMethod:
    """A registered baseline as `hpc predict` runs it on whole files."""
    name: str
    params: dict[str, Any]  # every free parameter, resolved (given, validated or the default)
    scanner: str = ""  # --scanner; else each file's header, else the checkpoint's
    checkpoint: Repairer | None = None  # --checkpoint: where tuned parameters and a dataset's split come from

    @property
    def meta(self) -> dict[str, Any]:
        return BASELINES.meta(self.name)

    def scanner_name(self, spec: SinogramSpec) -> str:
        return self.scanner or spec.scanner or (self.checkpoint.scanner if self.checkpoint else "")

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"--method {self.name}" + (f" ({args})" if args else "")


Method = Repairer | BaselineMethod | DenoiseMethod  # the last: `hpc predict --dose` (hpc.repair.denoise)


# ---------------------------------------------------------------- parameters
def free_parameters(name: str) -> dict[str, inspect.Parameter]:
    """A baseline's free parameters: its keyword arguments after (stack, planes)."""
    params = list(inspect.signature(BASELINES.get(name)).parameters.values())[2:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p for p in params if p.kind in kinds}


def _kind(name: str, p: inspect.Parameter) -> type:
    """The type a parameter's value is converted to: its default's, else its tuned candidates'."""
    tuned = BASELINES.meta(name).get("tune", {}).get(p.name) or ()
    sample = p.default if p.default is not inspect.Parameter.empty else next(iter(tuned), "")
    return type(sample) if isinstance(sample, bool | int | float | str) else str


def param_help(name: str) -> str:
    """``iters=8, tuned over 1,2,...`` for each free parameter of baseline ``name``; "" for none."""
    parts = []
    for key, p in free_parameters(name).items():
        default = "" if p.default is inspect.Parameter.empty else f"={p.default}"
        tuned = BASELINES.meta(name).get("tune", {}).get(key)
        parts.append(f"{key}{default}" + (f", tuned over {','.join(map(str, tuned))}" if tuned else ""))
    return ", ".join(parts)


def _convert(name: str, p: inspect.Parameter, value: Any, where: str) -> Any:
    """``value`` (text, or a number a checkpoint recorded) as the parameter's type; numbers finite,
    and positive where every tuned candidate is (an iteration count)."""
    kind = _kind(name, p)
    try:
        if kind is bool and isinstance(value, str):
            out = {"true": True, "1": True, "false": False, "0": False}[value.strip().lower()]
        elif kind is int and isinstance(value, float) and value.is_integer():
            out = int(value)
        else:
            out = kind(value.strip() if isinstance(value, str) else value)
    except (ValueError, KeyError, TypeError):
        what = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, "text")
        raise InputError(f"{where}: {name}'s {p.name} takes {what}, got {value!r}") from None
    tuned = BASELINES.meta(name).get("tune", {}).get(p.name) or ()
    if kind in (int, float) and (not math.isfinite(out) or (tuned and min(tuned) > 0 and out <= 0)):
        raise InputError(f"{where}: {name}'s {p.name} must be a finite{' positive' if tuned else ''} number, "
                         f"got {value!r}")
    return out


def parse_params(name: str, items: list[str], chosen: dict[str, Any] | None = None) -> dict[str, Any]:
    """``NAME=VALUE`` items -> every free parameter of baseline ``name``: given, else ``chosen`` (a
    checkpoint's validated values), else the default. InputError (one line) for an unknown name, a
    malformed item, a value of the wrong type or a parameter without default left unset."""
    free, out = free_parameters(name), {}
    takes = param_help(name) or "no parameters"
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key.strip() not in free:
            raise InputError(f"--method-param {item}: {name} takes {takes} (NAME=VALUE)")
        out[key.strip()] = _convert(name, free[key.strip()], text, f"--method-param {item}")
    for key, p in free.items():
        if key in out:
            continue
        if chosen and key in chosen:
            out[key] = _convert(name, p, chosen[key], f"the checkpoint's {name}_{key}")
        elif p.default is not inspect.Parameter.empty:
            out[key] = p.default
        else:
            raise InputError(f"--method {name}: give --method-param {key}=VALUE (it has no default)")
    return out


def tuned_params(name: str, rep: Repairer | None) -> dict[str, Any]:
    """The values a checkpoint's validation chose for baseline ``name``: metrics ``<name>_<param>``."""
    if rep is None:
        return {}
    return {k: rep.metrics[f"{name}_{k}"] for k in free_parameters(name) if f"{name}_{k}" in rep.metrics}


# ---------------------------------------------------------------- choosing the method
def hybrid_repairer(rep: Repairer, iters: int) -> Repairer:
    """``rep`` with its data.fill=reproject fill running ``iters`` OSEM iterations."""
    cfg = copy.deepcopy(rep.cfg)
    cfg.data.fill_iters = int(iters)
    pre = build_preprocess(cfg, input_multiple(cfg), rep.pre.scale, rep.scanner)
    return dataclasses.replace(rep, cfg=cfg, pre=pre)


def _hybrid(rep: Repairer, items: list[str]) -> Repairer:
    if rep.cfg.data.fill != "reproject":
        raise InputError(f"{rep.path}: --method hybrid needs a data.fill=reproject checkpoint (this one has "
                         f"data.fill={rep.cfg.data.fill}); use --method unet")
    bad = [i for i in items if i.partition("=")[0].strip() != "iters"]
    if bad:
        raise InputError(f"--method-param {bad[0]}: hybrid takes iters (the fill's OSEM iterations)")
    if items:
        text = items[-1].partition("=")[2]
        if not text.strip().isdigit() or int(text) < 1:
            raise InputError(f"--method-param {items[-1]}: iters must be a positive integer")
        return hybrid_repairer(rep, int(text))
    iters = rep.metrics.get("reproject_iters")
    if not iters:
        raise InputError(f"{rep.path}: its validation chose no reproject iteration count (no reproject_iters in "
                         "its metrics); give --method-param iters=N")
    return hybrid_repairer(rep, int(iters))


def check_method_name(name: str, checkpoint: bool) -> None:
    """An unknown method, or a network without a checkpoint: one line (before anything is loaded)."""
    if name not in method_names():
        raise InputError(f"--method {name}: unknown; expected one of {' | '.join(method_names())}")
    if name in NETWORKS and not checkpoint:
        raise InputError(f"--method {name} needs --checkpoint (a checkpoint written by hpc train)")


def resolve_method(name: str, items: list[str], rep: Repairer | None, scanner: str = "") -> Method:
    """--method NAME with --method-param ``items`` (and the checkpoint ``rep`` when given) -> what
    hpc.repair.files runs: a Repairer (unet, hybrid) or a BaselineMethod."""
    check_method_name(name, rep is not None)
    if name == UNET:
        if items:
            raise InputError(f"--method-param {items[0]}: unet takes no parameters (its fill runs data.fill_iters; "
                             "--method hybrid runs the validated count)")
        return rep
    if name == HYBRID:
        return _hybrid(rep, items)
    return BaselineMethod(name, parse_params(name, items, tuned_params(name, rep)), scanner, rep)


# ---------------------------------------------------------------- what the job builders ask
def check_method(m: Method, spec: SinogramSpec) -> None:
    """Refuse an input the method cannot repair: the checkpoint's slice size / scanner, or for a
    geometry-aware baseline an unknown scanner or slices of another size than the scanner's."""
    if isinstance(m, Repairer):
        check_compatible(m, spec)
        return
    if isinstance(m, DenoiseMethod) and m.checkpoint is not None and m.name == "unet":
        check_compatible(m.checkpoint, spec)
        return
    if not m.meta.get("needs_scanner"):
        return
    name = m.scanner_name(spec)
    sc = find_scanner(name)
    if sc is None:
        said = f"names {name!r}, not a known scanner" if name else "names none"
        raise InputError(f"{spec.source}: --method {m.name} needs the scanner geometry and the header {said}; "
                         f"give --scanner NAME ({', '.join(SCANNERS.names())})")
    if (sc.views, sc.bins) != tuple(spec.slice_shape):
        raise InputError(f"{spec.source}: --method {m.name} projects scanner {sc.name!r}'s {sc.views}x{sc.bins} "
                         f"slices (views x bins); these are {spec.views}x{spec.bins}")


def method_gaps(m: Method, spec: SinogramSpec, mask_spec: SinogramSpec | None = None,
                dead_blocks: list[int] | None = None, scanner: str = "") -> MaskFn | None:
    """The gaps of ``spec`` for method ``m`` (hpc.repair.inference.gap_mask for a network); a
    baseline has nothing to do without gaps, so it needs a mask or dead blocks."""
    if isinstance(m, Repairer):
        return gap_mask(m, spec, mask_spec, dead_blocks, scanner)
    if isinstance(m, DenoiseMethod):
        if mask_spec is not None or dead_blocks is not None:
            raise InputError(f"{spec.source}: --dose denoises the whole scan; --mask / --dead-blocks are for repairs")
        return None
    if mask_spec is not None:
        return file_mask(spec, mask_spec)
    if dead_blocks is not None:
        name = scanner or m.scanner_name(spec)
        if not name:
            raise InputError(f"--dead-blocks: {spec.source} names no scanner; give --scanner NAME")
        return dead_block_mask(spec, name, dead_blocks)
    raise InputError(f"{spec.source}: --method {m.name} fills gaps: give --mask FILE or --dead-blocks IDS")


def needs_gaps(m: Method) -> bool:
    if isinstance(m, DenoiseMethod):
        return False
    return isinstance(m, BaselineMethod) or m.cfg.model.inpaint


def models_factors(m: Method) -> bool:
    """Whether the method uses a study's mult / randoms (a baseline may: it gets them when known)."""
    return isinstance(m, BaselineMethod | DenoiseMethod) or bool(FILLS.meta(m.cfg.data.fill).get("aux"))


def geometry_name(m: Method, spec: SinogramSpec) -> str:
    return m.scanner if isinstance(m, Repairer) else m.scanner_name(spec)


def describe(m: Method) -> str:
    """What the output header's comment says repaired it."""
    if isinstance(m, BaselineMethod | DenoiseMethod):
        return m.describe() + (f" ({m.checkpoint.path.name})" if isinstance(m, DenoiseMethod) and m.name == "unet"
                               else "")
    return f"{m.path.name} ({m.cfg.model.name}, data.fill={m.cfg.data.fill})"


# ---------------------------------------------------------------- a baseline over a whole file
def _groups(spec: SinogramSpec, whole: bool) -> list[tuple[int, int]]:
    """(start, stop) of the stacks a baseline sees: one per (TOF bin, segment), or the whole study."""
    if whole:
        return [(0, spec.num_slices)]
    lo, hi = stack_bounds(spec)
    return sorted(set(zip(lo.tolist(), hi.tolist(), strict=True)))


def _copy(read: Callable[[int, int], np.ndarray], write: Callable[[int, np.ndarray], None],
          valid: ValidFn | None, a: int, b: int, spec: SinogramSpec, counts: Counts) -> None:
    """Slices [a, b) with nothing to repair: copied, 0 where there is no LOR."""
    for c in range(a, b, COPY_CHUNK):
        d = min(c + COPY_CHUNK, b)
        out = read(c, d)
        if valid is not None:
            out[~valid(c, d)] = 0
        write(c, out.astype(spec.dtype.newbyteorder("=")))
        counts.slices += d - c


def _stack(m: BaselineMethod, spec: SinogramSpec, src: np.ndarray, w: np.ndarray, v: np.ndarray | None,
           aux: dict[str, np.ndarray], whole: bool) -> Stack:
    """What the baseline sees of slices ``src`` (n, V, X): gaps zeroed, valid = LOR and mult > 0."""
    y = np.where(w > 0, src.astype(np.float64), 0.0)  # gap values never enter a method
    valid = np.ones(y.shape, bool) if v is None else v.copy()
    if "mult" in aux:
        valid &= aux["mult"] > 0
    name = m.scanner_name(spec)
    return Stack(y, w, valid, aux.get("mult"), aux.get("randoms"), find_scanner(name),
                 layout=spec_layout(spec, name) if whole else None)


def _run(m: BaselineMethod, stack: Stack, planes: np.ndarray, step: int, progress: Progress | None) -> np.ndarray:
    """The baseline's repaired planes (n, V, X) float64, ``step`` planes per call."""
    run, out = BASELINES.get(m.name), []
    for c in range(0, planes.size, step):
        part = planes[c:c + step]
        got = np.asarray(run(stack, part, **m.params), np.float64)
        if got.shape != (part.size, *stack.y.shape[1:]):
            raise ValueError(f"baseline {m.name!r} returned {got.shape} for {part.size} planes of {stack.y.shape[1:]}")
        out.append(got)
        if progress is not None:
            progress.update(part.size)
    return np.concatenate(out)


def repair_baseline(m: BaselineMethod, spec: SinogramSpec, read: Callable[[int, int], np.ndarray],
                    mask: MaskFn | None, write: Callable[[int, np.ndarray], None], batch: int,
                    progress: Progress | None = None, aux: dict[str, Callable[[int, int], np.ndarray]] | None = None,
                    valid: ValidFn | None = None, todo: np.ndarray | None = None) -> Counts:
    """Repair every slice of ``spec`` with baseline ``m``, as hpc.repair.inference.repair does with a
    network: the slices in ``todo`` (default: those with gaps) stack by stack (``batch`` planes per
    call; a whole_study baseline: the study in one call), the others copied; written through
    ``compose`` (measured bytes kept, integer outputs rounded and clipped, counted)."""
    counts, whole = Counts(), bool(m.meta.get("whole_study"))
    todo = needs_repair(spec, mask, valid) if todo is None else todo
    for a, b in _groups(spec, whole):
        planes = np.flatnonzero(todo[a:b])
        if planes.size == 0:
            _copy(read, write, valid, a, b, spec, counts)
            continue
        src = read(a, b)  # (n, V, X) source dtype: one stack (or the study) in memory
        w = np.ones(src.shape) if mask is None else np.clip(np.asarray(mask(a, b), np.float64), 0, 1)
        v = None if valid is None else valid(a, b)
        stack = _stack(m, spec, src, w, v, {k: np.asarray(f(a, b), np.float64) for k, f in (aux or {}).items()},
                       whole)
        pred = _run(m, stack, planes, planes.size if whole else batch, progress)
        out = src.copy()
        if v is not None:
            out[~v] = 0
        out[planes] = compose(src[planes], pred, w[planes], None if v is None else v[planes], spec.dtype, counts,
                              merged=True)
        counts.slices += b - a
        counts.modelled += planes.size
        write(a, out.astype(spec.dtype.newbyteorder("=")))
    return counts
