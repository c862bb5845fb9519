"""Inference as a library: a checkpoint's network run on sinograms exactly as training saw them.

Used by `hpc predict` (the CLI in hpc.repair.predict), `hpc evaluate`, `hpc export` and `hpc demo`. Every
function takes explicit arguments (never an argparse.Namespace), so a notebook or another tool can
repair a sinogram the same way (files in and out, and `Job`s: hpc.repair.files):

    rep = load_repairer("runs/demo/checkpoints/best.pt", torch.device("cpu"))
    spec = read_header("scan.s.hdr")
    check_compatible(rep, spec)                              # slice size / scanner of the training data
    mask = gap_mask(rep, spec, mask_spec=read_header("gaps.s.hdr"))   # or dead_blocks=[3, 17]
    path, counts = predict_file(rep, spec, Path("fixed.s.hdr"), "source", mask, batch=16)  # hpc.repair.files

The steps: a checkpoint -> `Repairer` (model + config + the training preprocessing); slices are
windowed exactly as the training loader windows them (2k+1 neighbouring slices of the same TOF bin
and segment, edges replicated or reflected); gap pixels are zeroed (or pre-filled) in every channel as
training corrupted them; normalize/pad, run the network, crop/denormalize exactly (`model_output`);
with a gap mask only gap pixels are replaced, every measured value is copied bytewise from the input;
integer outputs are rounded and clipped, and the counts reported (`Counts`). Reading and writing
files, and several studies (files, or a converted dataset's studies) as `Job`s: hpc.repair.files.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hpc.config import Config, from_stored
from hpc.data.fills import build_preprocess
from hpc.data.index import window_ids
from hpc.data.preprocess import Preprocess
from hpc.errors import ConfigError, InputError
from hpc.io.shards import Dataset
from hpc.io.sinogram import MaskReader
from hpc.io.spec import SinogramSpec
from hpc.physics import geometry as G
from hpc.physics.geometry import find_scanner
from hpc.physics.projdata import DeadBlockTables, dead_fractions, layout_for
from hpc.progress import Progress
from hpc.train.checkpoint import load, require_finite
from hpc.train.ema import inference_weights
from hpc.train.models import build_model, input_multiple, shapes


# ---------------------------------------------------------------- checkpoint
@dataclass
class Repairer:
    """A checkpoint's model, config and preprocessing, ready to run on ``device``."""
    path: Path
    cfg: Config
    model: torch.nn.Module  # SinogramModel: (B, C, V', X'), (B, 1, V', X') -> (B, 1, V', X')
    pre: Preprocess
    device: torch.device
    slice_shape: tuple[int, int] | None  # (V, X) the model was trained on, when recorded
    scanner: str  # geometry preset of the training data ("" when not recorded)
    metrics: dict = field(default_factory=dict)  # its validation's metrics (e.g. reproject_iters), {} if none

    @property
    def context(self) -> int:
        return self.cfg.in_channels() // 2


def strip_wrappers(state: dict) -> dict:
    """State dicts saved from DDP / torch.compile wrappers carry 'module.' / '_orig_mod.' prefixes."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def training_data(cfg: Config, ckpt: dict) -> dict:
    """{scale, slice_shape, scanner} of the training set: the checkpoint's ``data`` entry, else the
    manifest of the dataset at data.path when it is still there, else {} (unknown)."""
    if ckpt.get("data"):
        return dict(ckpt["data"])
    if cfg.data.path and (Path(cfg.data.path) / "manifest.json").is_file():

        ds = Dataset.open(cfg.data.path)
        return {"scale": ds.scale, "slice_shape": list(ds.slice_shape), "scanner": ds.scanner}
    return {}


def _check_shapes(path: Path, cfg: Config, weights: dict) -> None:
    """The network the stored config describes (built on the meta device: nothing allocated) has
    exactly the checkpoint's tensors; InputError naming the first difference otherwise."""
    want = shapes(cfg.model, cfg.in_channels())
    have = {k: tuple(v.shape) for k, v in weights.items() if torch.is_tensor(v)}
    if want == have:
        return
    m = cfg.model
    key = next((k for k in sorted(want) if want[k] != have.get(k)), None) or sorted(set(have) - set(want))[0]
    raise InputError(f"{path}: weights do not match its own config (model.name={m.name}, model.base={m.base}, "
                     f"model.depth={m.depth}, {cfg.in_channels()} input channels): {key} is "
                     f"{have.get(key, 'absent')} in the file, {want.get(key, 'absent')} for that config")


def load_repairer(path: str | Path, device: torch.device) -> Repairer:
    """Load an hpc.train.train checkpoint (weights_only): the model from ``model`` + ``config``, the
    preprocessing from the config and the training set's scale."""

    path = Path(path)
    ckpt = require_finite(load(path), path)  # a diverged run's NaN weights would repair nothing
    try:
        cfg = from_stored(ckpt["config"], origin=f"{path}: config")  # older code's keys: a warning
    except ConfigError as exc:
        msg = str(exc)
        raise InputError(msg if msg.startswith(str(path)) else f"{path}: its stored config: {msg}") from None
    data = training_data(cfg, ckpt)
    if "scale" not in data and cfg.data.normalize in ("scale", "anscombe"):
        raise InputError(f"{path}: data.normalize={cfg.data.normalize} needs the training set's scale, and "
                         f"neither the checkpoint nor data.path ({cfg.data.path or 'unset'}) gives it")
    weights = strip_wrappers(inference_weights(ckpt))  # the moving average when the run kept one
    _check_shapes(path, cfg, weights)  # before building: a stored config of model.base=200000 allocates TBs
    model = build_model(cfg.model, cfg.in_channels())
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(f"{path}: weights do not match its own config ({cfg.model.name}, "
                         f"{cfg.in_channels()} channels): {first}") from None
    model.to(device).eval()
    shape = tuple(int(v) for v in data["slice_shape"]) if data.get("slice_shape") else None
    scanner = str(cfg.corrupt.scanner or data.get("scanner") or "")
    pre = build_preprocess(cfg, input_multiple(cfg), float(data.get("scale", 1.0)), scanner)
    return Repairer(path, cfg, model, pre, device, shape, scanner, dict(ckpt.get("metrics") or {}))


def check_compatible(rep: Repairer, spec: SinogramSpec) -> None:
    """Refuse an input the checkpoint was not trained for (slice size, scanner geometry)."""
    if rep.slice_shape is not None and tuple(spec.slice_shape) != rep.slice_shape:
        raise InputError(f"{spec.source}: slices are {spec.views}x{spec.bins} (views x bins) but "
                         f"checkpoint {rep.path} was trained on {rep.slice_shape[0]}x{rep.slice_shape[1]}")
    sc = find_scanner(rep.scanner)
    if sc is not None and (sc.views % spec.views or spec.bins > sc.bins):
        raise InputError(f"{spec.source}: slices are {spec.views}x{spec.bins} but checkpoint "
                         f"{rep.path} was trained on scanner {sc.name!r} ({sc.views} views, mashed by an "
                         f"integer, x up to {sc.bins} bins)")


def _scanner(name: str, where: Path | str):

    try:
        return G.get_scanner(name)
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from None


# ---------------------------------------------------------------- masks
AUX = ("mult", "randoms")  # what data.fill=reproject models (hpc.physics.recon.ReprojectFill)
MaskFn = Callable[[int, int], np.ndarray]  # (start, stop) -> (n, V, X) float32 measured fraction, 1 = measured
ValidFn = Callable[[int, int], np.ndarray]  # (start, stop) -> (n, V, X) bool, False = no line of response


def file_mask(spec: SinogramSpec, mask_spec: SinogramSpec) -> MaskFn:
    """A mask file for the input's slices: one slice per slice, per plane (shared by the TOF bins)
    or one for all; measured fractions in [0, 1] (integer masks: 1 where non-zero)."""
    return MaskReader(mask_spec, spec).read


def spec_layout(spec: SinogramSpec, scanner: str = ""):
    """The input's hpc.physics.projdata.Layout on ``scanner`` (default: its header's), or None if unknown."""

    for name in (spec.scanner, scanner):  # the file's own scanner first
        try:
            return layout_for(name, spec.segments, spec.axial_counts, spec.views, spec.bins, spec.tof_bins,
                              spec.ring_diffs) if name else None
        except ValueError:
            continue
    return None


def valid_fn(spec: SinogramSpec, scanner: str = "") -> ValidFn | None:
    """Which pixels of each slice are lines of response (virtual crystals and rings are not), from
    the layout on ``scanner`` (or the header's); None when the geometry is unknown."""
    lay = spec_layout(spec, scanner)
    if lay is None:
        return None
    return lambda a, b: lay.valid(np.arange(a, b) % lay.planes)


def dead_block_mask(spec: SinogramSpec, scanner: str, blocks: list[int]) -> MaskFn:
    """Measured fractions under the listed dead blocks, from the layout of ``spec`` on ``scanner``:
    0/1 for span-1 unmashed data, fractions where a plane sums ring pairs or views."""

    sc = _scanner(scanner, spec.source)
    try:
        lay = layout_for(sc, spec.segments, spec.axial_counts, spec.views, spec.bins, spec.tof_bins, spec.ring_diffs)
        tables = DeadBlockTables(lay)
        hit = np.flatnonzero(tables.hit_planes(blocks))
        fractions = dead_fractions(lay, blocks, hit, tables)  # (H, V, X): only planes a dead block reaches
    except ValueError as exc:
        raise InputError(f"{spec.source}: --dead-blocks {blocks} on scanner {scanner!r}: {exc}") from None
    row = np.full(lay.planes, -1)
    row[hit] = np.arange(hit.size)

    def read(a: int, b: int) -> np.ndarray:
        out = np.ones((b - a, *spec.slice_shape), np.float32)
        k = row[np.arange(a, b) % spec.planes]  # canonical order repeats the planes for each TOF bin
        out[k >= 0] = fractions[k[k >= 0]]
        return out

    return read


def gap_mask(rep: Repairer, spec: SinogramSpec, mask_spec: SinogramSpec | None = None,
             dead_blocks: list[int] | None = None, scanner: str = "") -> MaskFn | None:
    """The gaps of ``spec``: from a mask file's layout ``mask_spec``, else from the listed dead
    blocks (geometry of ``scanner``, default the checkpoint's), else None (no gaps) when the model
    does not inpaint. Every check runs here, before anything is written."""
    if mask_spec is not None:
        return file_mask(spec, mask_spec)
    if dead_blocks is not None:
        scanner = scanner or rep.scanner
        if not scanner:
            raise InputError(f"--dead-blocks: {rep.path} records no scanner; give --scanner NAME")
        return dead_block_mask(spec, scanner, dead_blocks)
    if rep.cfg.model.inpaint:
        raise InputError(f"{rep.path}: an inpainting model needs the gaps: give --mask FILE or --dead-blocks IDS")
    return None


# ---------------------------------------------------------------- repair
@dataclass
class Counts:
    """What happened to the predicted (gap) values on their way into the output dtype."""
    replaced: int = 0  # pixels whose value came from the model
    rounded: int = 0  # non-integer predictions rounded (integer outputs)
    clipped_low: int = 0
    clipped_high: int = 0
    nonfinite: int = 0  # NaN/inf predictions (written as 0)
    slices: int = 0
    modelled: int = 0  # slices that had gaps and went through the model (the others were copied)

    def summary(self) -> str:
        return (f"{self.slices} slices ({self.modelled} with gaps through the model), {self.replaced} pixels "
                f"predicted; {self.rounded} rounded to "
                f"integers, {self.clipped_low} clipped low, {self.clipped_high} clipped high, "
                f"{self.nonfinite} non-finite set to 0")


def to_dtype(pred: np.ndarray, dtype: np.dtype, counts: Counts) -> np.ndarray:
    """Float predictions -> ``dtype``: integer types are rounded and clipped, counted, never wrapped."""
    bad = ~np.isfinite(pred)
    counts.nonfinite += int(bad.sum())
    pred = np.where(bad, 0.0, pred)
    if dtype.kind == "f":
        return pred.astype(dtype)
    info = np.iinfo(dtype)
    r = np.rint(pred)
    counts.rounded += int((r != pred).sum())
    counts.clipped_low += int((r < info.min).sum())
    counts.clipped_high += int((r > info.max).sum())
    return np.clip(r, info.min, info.max).astype(dtype)


def stack_bounds(spec: SinogramSpec) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) (N,) of each slice's (TOF bin, segment) stack: windows never cross them."""
    sizes = np.tile(np.asarray(spec.axial_counts), spec.tof_bins)
    hi = np.cumsum(sizes)
    return np.repeat(hi - sizes, sizes), np.repeat(hi, sizes)


@torch.no_grad()
def model_output(rep: Repairer, raw: np.ndarray, m: np.ndarray | None,
                 aux: dict[str, np.ndarray] | None = None, v: np.ndarray | None = None) -> np.ndarray:
    """Model output in counts, float64 (B, V, X), for context stacks ``raw`` (B, C, V, X) with
    measured fractions ``m`` (B, C, V, X) (None: no gaps); ``aux``: their ``mult`` / ``randoms``
    (B, C, V, X), which data.fill=reproject models when given; ``v``: lines of response (None: all)."""
    x = torch.from_numpy(raw.astype(np.float32)).to(rep.device)
    mask = torch.ones_like(x) if m is None else torch.from_numpy(m.astype(np.float32)).to(rep.device)
    extra = {k: torch.from_numpy(np.asarray(a, np.float32)).to(rep.device) for k, a in (aux or {}).items()}
    valid = None if v is None else torch.from_numpy(v.astype(np.float32)).to(rep.device)
    x, state = rep.pre.forward(rep.pre.gaps(x, mask, extra, valid))  # gaps in every channel, as in training
    k = raw.shape[1] // 2
    y = rep.model(x, rep.pre.pad_mask(mask[:, k:k + 1], state))  # (B, 1, V', X')
    return rep.pre.inverse(y.float(), state)[:, 0].double().cpu().numpy()


def windows(rep: Repairer, spec: SinogramSpec, centres: np.ndarray) -> np.ndarray:
    """(n,) centre slices -> (n, 2k+1) slice ids, exactly as the loader builds them."""
    lo, hi = stack_bounds(spec)
    return window_ids(centres, lo[centres], hi[centres], rep.context, rep.cfg.data.edge)


def needs_repair(spec: SinogramSpec, mask: MaskFn | None, valid: ValidFn | None, step: int = 64) -> np.ndarray:
    """(N,) bool: the slices with a gap or a partly measured pixel on a real LOR (every slice when
    there is no mask: the model rewrites them all)."""
    n = spec.num_slices
    if mask is None:
        return np.ones(n, bool)
    todo = np.zeros(n, bool)
    for a in range(0, n, step):
        b = min(a + step, n)
        lost = mask(a, b) < 1
        if valid is not None:
            lost &= valid(a, b)
        todo[a:b] = lost.reshape(b - a, -1).any(1)
    return todo


def compose(src: np.ndarray, pred: np.ndarray, m: np.ndarray | None, v: np.ndarray | None, dtype: np.dtype,
            counts: Counts, merged: bool = False) -> np.ndarray:
    """The repaired slices: measured pixels (fraction 1) keep the input's bytes, gaps are the model,
    a partly measured bin its counts plus the lost fraction of the model, c + (1 - m) pred; pixels
    without a line of response (``v`` False) 0. Predictions are rounded/clipped for integer files.
    ``merged``: ``pred`` already is c + (1 - m) model there (a baseline's output, hpc.baselines.stack)."""
    out = src.copy()
    change = np.ones(src.shape, bool) if m is None else m < 1
    if v is not None:
        change &= v
    value = pred[change] if m is None or merged else np.where(
        m[change] > 0, src[change] + (1 - m[change]) * pred[change], pred[change])
    out[change] = to_dtype(value, dtype, counts)
    counts.replaced += int(change.sum())
    if v is not None:
        out[~v] = 0
    return out


def repair(rep: Repairer, spec: SinogramSpec, read: Callable[[int, int], np.ndarray], mask: MaskFn | None,
           write: Callable[[int, np.ndarray], None], batch: int, progress: Progress | None = None,
           aux: dict[str, Callable[[int, int], np.ndarray]] | None = None, valid: ValidFn | None = None,
           todo: np.ndarray | None = None) -> Counts:
    """Repair every slice of ``spec`` in canonical order: the slices in ``todo`` (default:
    :func:`needs_repair`) through the model, ``batch`` centre slices at a time; the others are
    copied. ``read(start, stop) -> (n, V, X)`` the input, ``write(start, out (n, V, X) source dtype)``;
    ``aux``: readers of the study's mult / randoms (data.fill=reproject models them); ``progress``
    counts the slices that need the model."""
    counts = Counts()
    todo = needs_repair(spec, mask, valid) if todo is None else todo
    work = np.flatnonzero(todo)
    for a in range(0, spec.num_slices, max(batch, 256)):  # copies move in big chunks, the model in batches
        b = min(a + max(batch, 256), spec.num_slices)
        out = read(a, b)
        if valid is not None:
            out[~valid(a, b)] = 0  # no counts where there is no line of response
        mine = work[(work >= a) & (work < b)]
        for c in range(0, mine.size, batch):
            centres = mine[c:c + batch]
            ids = windows(rep, spec, centres)  # (n, 2k+1) global ids
            r0, r1 = int(ids.min()), int(ids.max()) + 1  # one contiguous read covers every window
            slab = read(r0, r1)
            mslab = mask(r0, r1) if mask is not None else None
            vslab = valid(r0, r1) if valid is not None else None
            extra = {k: f(r0, r1)[ids - r0] for k, f in (aux or {}).items()}
            pred = model_output(rep, slab[ids - r0], None if mslab is None else mslab[ids - r0], extra,
                                None if vslab is None else vslab[ids - r0])
            k = centres - r0
            out[centres - a] = compose(slab[k], pred, None if mslab is None else mslab[k],
                                       None if vslab is None else vslab[k], spec.dtype, counts)
            counts.modelled += centres.size
            if progress is not None:
                progress.update(centres.size)
        counts.slices += b - a
        write(a, out.astype(spec.dtype.newbyteorder("=")))
    return counts
