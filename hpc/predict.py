"""Repair sinograms with a trained checkpoint; the output is written in the source's own format.

Slices are windowed exactly as the training loader windows them (2k+1 neighbouring slices of the
same TOF bin and segment, edges replicated or reflected), gap pixels are zeroed (or pre-filled) in every channel as
training corrupted them, then normalized/padded with the checkpoint's preprocessing, repaired in
batches and mapped back exactly (crop, denormalize). With a gap mask (--mask FILE, or --dead-blocks
with the scanner geometry) only gap pixels are replaced: every measured value is copied bytewise
from the input. Predictions written into integer files are rounded and clipped, and the counts are
reported. Memory is bounded by --batch slices; the GPU is used when present.

examples:
  hpc predict --checkpoint runs/demo/checkpoints/best.pt s1_gaps.s.hdr --mask s1_mask.s.hdr -o s1_fixed.s.hdr
  hpc predict --checkpoint best.pt scan.hs --dead-blocks 3,17 --scanner demo -o scan_fixed.hs
  hpc predict --checkpoint best.pt scan.s.hdr --mask gaps.s.hdr -o scan_fixed.h5 --format h5
  hpc predict --checkpoint best.pt scan.raw --shape 1,64,96,128 --dtype uint16 --mask m.raw -o fixed.raw
  hpc predict --checkpoint best.pt a.s.hdr b.s.hdr --mask a_mask.s.hdr b_mask.s.hdr -o fixed/   # fixed/a.s.hdr ...
  hpc predict --checkpoint best.pt data/scans --split test -o fixed/        # fixed/<study>_repaired.h5
  torchrun --nproc_per_node=8 -m hpc predict --checkpoint best.pt data/scans -o fixed/   # 8 GPUs

Several inputs (files, or the studies of a converted dataset, read from its stored `input` or
`target` with its stored `mask`) go to a directory. Under torchrun / srun / mpirun each rank
repairs every WORLD_SIZE-th study on its own GPU (LOCAL_RANK); a single study runs on one rank.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch

from hpc.augment import Preprocess
from hpc.config import Config, from_dict
from hpc.data.index import window_ids
from hpc.errors import ConfigError, InputError, OutputError
from hpc.io.shards import RepairedH5Writer
from hpc.io.sinogram import SinogramReader, SinogramSpec, SinogramWriter, raw_spec, read_header
from hpc.progress import Progress

FORMATS = ("source", "h5")


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

    @property
    def context(self) -> int:
        return self.cfg.in_channels() // 2


def _strip_wrappers(state: dict) -> dict:
    """State dicts saved from DDP / torch.compile wrappers carry 'module.' / '_orig_mod.' prefixes."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(name)


def training_data(cfg: Config, ckpt: dict) -> dict:
    """{scale, slice_shape, scanner} of the training set: the checkpoint's ``data`` entry, else the
    manifest of the dataset at data.path when it is still there, else {} (unknown)."""
    if ckpt.get("data"):
        return dict(ckpt["data"])
    if cfg.data.path and (Path(cfg.data.path) / "manifest.json").is_file():
        from hpc.io.shards import Dataset

        ds = Dataset.open(cfg.data.path)
        return {"scale": ds.scale, "slice_shape": list(ds.slice_shape), "scanner": ds.scanner}
    return {}


def load_repairer(path: str | Path, device: torch.device) -> Repairer:
    """Load an hpc.train checkpoint (weights_only): the model from ``model`` + ``config``, the
    preprocessing from the config and the training set's scale."""
    from hpc.checkpoint import load
    from hpc.models import build_model

    path = Path(path)
    ckpt = load(path)
    cfg = from_dict(ckpt["config"])
    data = training_data(cfg, ckpt)
    if "scale" not in data and cfg.data.normalize in ("scale", "anscombe"):
        raise InputError(f"{path}: data.normalize={cfg.data.normalize} needs the training set's scale, and "
                         f"neither the checkpoint nor data.path ({cfg.data.path or 'unset'}) gives it")
    model = build_model(cfg.model, cfg.in_channels())
    try:
        model.load_state_dict(_strip_wrappers(ckpt["model"]))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(f"{path}: weights do not match its own config ({cfg.model.name}, "
                         f"{cfg.in_channels()} channels): {first}") from None
    model.to(device).eval()
    shape = tuple(int(v) for v in data["slice_shape"]) if data.get("slice_shape") else None
    scanner = str(cfg.corrupt.scanner or data.get("scanner") or "")
    return Repairer(path, cfg, model, Preprocess(cfg, scale=float(data.get("scale", 1.0))), device,
                    shape, scanner)


def check_compatible(rep: Repairer, spec: SinogramSpec) -> None:
    """Refuse an input the checkpoint was not trained for (slice size, scanner geometry)."""
    if rep.slice_shape is not None and tuple(spec.slice_shape) != rep.slice_shape:
        raise InputError(f"{spec.source}: slices are {spec.views}x{spec.bins} (views x bins) but "
                         f"checkpoint {rep.path} was trained on {rep.slice_shape[0]}x{rep.slice_shape[1]}")
    sc = _known_scanner(rep.scanner)
    if sc is not None and (sc.views, sc.bins) != tuple(spec.slice_shape):
        raise InputError(f"{spec.source}: slices are {spec.views}x{spec.bins} but checkpoint "
                         f"{rep.path} was trained on scanner {sc.name!r} ({sc.views}x{sc.bins})")


def _known_scanner(name: str):
    """The geometry preset called ``name``, or None (a header's free-text `originating system`)."""
    from hpc import geometry as G

    try:
        return G.get_scanner(name) if name else None
    except ValueError:
        return None


def _scanner(name: str, where: Path | str):
    from hpc import geometry as G

    try:
        return G.get_scanner(name)
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from None


# ---------------------------------------------------------------- masks
MaskFn = Callable[[int, int], np.ndarray]  # (start, stop) -> (n, V, X) uint8, 1 = measured


def file_mask(spec: SinogramSpec, mask_spec: SinogramSpec) -> MaskFn:
    """A mask file of the same layout as the input (or a single (V, X) slice for all)."""
    if mask_spec.slice_shape != spec.slice_shape or mask_spec.num_slices not in (1, spec.num_slices):
        raise InputError(f"{mask_spec.source}: mask is {mask_spec.num_slices}x{mask_spec.views}x"
                         f"{mask_spec.bins}, input {spec.source} is {spec.num_slices}x{spec.views}x{spec.bins}")
    reader = SinogramReader(mask_spec)
    if mask_spec.num_slices == 1:
        one = (reader.read(0, 1) > 0).astype(np.uint8)
        return lambda a, b: np.broadcast_to(one, (b - a, *one.shape[1:]))
    return lambda a, b: (reader.read(a, b) > 0).astype(np.uint8)


def dead_block_mask(spec: SinogramSpec, scanner: str, blocks: list[int]) -> MaskFn:
    """Gaps of the listed dead blocks, from the scanner geometry, for every slice of ``spec``."""
    from hpc import geometry as G

    sc = _scanner(scanner, spec.source)
    if (sc.views, sc.bins) != tuple(spec.slice_shape):
        raise InputError(f"{spec.source}: slices are {spec.views}x{spec.bins} but scanner {scanner!r} "
                         f"has {sc.views}x{sc.bins} (views x bins)")
    try:
        planes = G.dead_block_mask(sc, blocks, segments=list(spec.segments))  # (planes, V, X)
    except ValueError as exc:
        raise InputError(f"--dead-blocks {blocks}: {exc}") from None
    if len(planes) != spec.planes:
        raise InputError(f"{spec.source}: {spec.planes} planes per TOF bin, scanner {scanner!r} "
                         f"gives {len(planes)} for segments {list(spec.segments)}")
    # canonical order repeats the planes for each TOF bin: index instead of tiling (bounded memory)
    return lambda a, b: planes[np.arange(a, b) % spec.planes]


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

    def summary(self) -> str:
        return (f"{self.slices} slices, {self.replaced} pixels predicted; {self.rounded} rounded to "
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
def model_output(rep: Repairer, raw: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """Model output in counts, float64 (B, V, X), for context stacks ``raw`` (B, C, V, X) with gap
    masks ``m`` (B, C, V, X) 1 = measured (None: no gaps)."""
    x = torch.from_numpy(raw.astype(np.float32)).to(rep.device)
    mask = torch.ones_like(x) if m is None else torch.from_numpy(m.astype(np.float32)).to(rep.device)
    x, state = rep.pre.forward(rep.pre.gaps(x, mask))  # gaps in every channel, as in training
    k = raw.shape[1] // 2
    y = rep.model(x, rep.pre.pad_mask(mask[:, k:k + 1], state))  # (B, 1, V', X')
    return rep.pre.inverse(y.float(), state)[:, 0].double().cpu().numpy()


def windows(rep: Repairer, spec: SinogramSpec, centres: np.ndarray) -> np.ndarray:
    """(n,) centre slices -> (n, 2k+1) slice ids, exactly as the loader builds them."""
    lo, hi = stack_bounds(spec)
    return window_ids(centres, lo[centres], hi[centres], rep.context, rep.cfg.data.edge)


def repair(rep: Repairer, spec: SinogramSpec, read: Callable[[int, int], np.ndarray], mask: MaskFn | None,
           write: Callable[[int, np.ndarray], None], batch: int, progress: Progress | None = None) -> Counts:
    """Repair every slice of ``spec`` in canonical order, ``batch`` centre slices at a time;
    ``read(start, stop) -> (n, V, X)`` the input, ``write(start, out (n, V, X) in the source dtype)``."""
    counts = Counts()
    for a in range(0, spec.num_slices, batch):
        b = min(a + batch, spec.num_slices)
        ids = windows(rep, spec, np.arange(a, b))  # (n, 2k+1) global ids
        r0, r1 = int(ids.min()), int(ids.max()) + 1  # one contiguous read covers every window
        slab = read(r0, r1)  # (r1 - r0, V, X) source dtype, native byte order
        mslab = mask(r0, r1) if mask is not None else None
        pred = model_output(rep, slab[ids - r0], None if mslab is None else mslab[ids - r0])
        src = slab[a - r0:b - r0]
        if mslab is None:
            out = to_dtype(pred, spec.dtype, counts)
            counts.replaced += out.size
        else:
            gap = mslab[a - r0:b - r0] == 0
            out = src.copy()  # measured values: the input's own bytes
            out[gap] = to_dtype(pred[gap], spec.dtype, counts)
            counts.replaced += int(gap.sum())
        counts.slices += b - a
        write(a, out.astype(spec.dtype.newbyteorder("=")))
        if progress is not None:
            progress.update(b - a)
    return counts


# ---------------------------------------------------------------- outputs
def open_input(path: str, shape: str | None, dtype: str, endian: str, offset: int) -> SinogramSpec:
    """An Interfile header, or a raw file with --shape/--dtype."""
    if shape:
        try:
            dims = tuple(int(v) for v in shape.split(","))
        except ValueError:
            raise InputError(f"{path}: --shape must be T,S,V,X integers, got {shape!r}") from None
        if not dtype:
            raise InputError(f"{path}: a raw file needs --dtype (e.g. uint16)")
        return raw_spec(path, dims, dtype, endian, offset)
    return read_header(path)


def predict_file(rep: Repairer, spec: SinogramSpec, output: Path, fmt: str, mask: MaskFn | None,
                 batch: int, quiet: bool = False) -> tuple[Path, Counts]:
    """Repair one input file into ``output`` (same format as the source, or HDF5)."""
    with SinogramReader(spec) as reader:
        return predict_study(rep, spec, reader.read, output, fmt, mask, batch, quiet)


def predict_study(rep: Repairer, spec: SinogramSpec, read: Callable[[int, int], np.ndarray], output: Path,
                  fmt: str, mask: MaskFn | None, batch: int, quiet: bool = False) -> tuple[Path, Counts]:
    """Repair the slices ``read`` gives (layout ``spec``) into ``output``; nothing appears there
    unless every slice was written."""
    if output.resolve() in {spec.source.resolve(), spec.data_path.resolve()}:
        raise OutputError(f"{output}: the output would overwrite the input")
    comment = f"repaired by hpc predict with {rep.path.name} ({rep.cfg.model.name})"
    writer = RepairedH5Writer(spec, output, comment) if fmt == "h5" else SinogramWriter(spec, output, comment)
    with writer, Progress(spec.num_slices, "slices", f"predict {output.name}", enabled=not quiet) as bar:
        counts = repair(rep, spec, read, mask, writer.write, batch, bar)
        return writer.commit(), counts


@dataclass
class Job:
    """One study to repair: its slice layout, how to open its input and gaps, where it goes."""
    spec: SinogramSpec
    open: Callable[[], tuple[Callable[[int, int], np.ndarray], MaskFn | None, Callable[[], None]]]  # read, mask, close
    output: Path
    fmt: str


def study_layout(ds, info) -> SinogramSpec:
    """A layout-only spec of a converted study (windows and checks need the slice layout, never a
    data path): TOF bins, segments and axial counts from the manifest."""
    return SinogramSpec(ds.root, np.dtype(info.dtype), 0, info.tof_bins, info.segments, info.axial_counts,
                        *info.slice_shape, header_path=ds.root / "manifest.json")


def dataset_jobs(args: argparse.Namespace, rep: Repairer) -> list[Job]:
    """Every study (or --studies / the checkpoint's --split) of a converted dataset, repaired from
    its stored ``input`` (paired) or ``target``, gaps from its stored ``mask`` or --dead-blocks;
    each written as ``OUTPUT/<study>_repaired.h5``."""
    from hpc.data.index import config_split
    from hpc.io.shards import Dataset, ShardArray

    if args.format == "source":
        raise InputError(f"{args.inputs[0]}: a converted dataset is written as HDF5 (--format h5)")
    ds, d = Dataset.open(args.inputs[0]), rep.cfg.data
    if Path(args.output).resolve() == ds.root.resolve():
        raise OutputError(f"{args.output}: write the repaired studies next to the dataset, not into it")
    ids = [s.id for s in ds.studies]
    if args.studies:
        chosen = [v.strip() for v in args.studies.split(",") if v.strip()]
        missing = sorted(set(chosen) - set(ids))
        if missing:
            raise InputError(f"{ds.root}: no study {', '.join(missing)} (have {', '.join(ids)})")
    elif args.split:
        chosen = config_split(ids, d, args.split)
    else:
        chosen = ids
    jobs, geometry = [], {}  # --dead-blocks masks, one per slice layout
    for info in map(ds.study, chosen):
        layout = study_layout(ds, info)
        check_compatible(rep, layout)
        if not info.has_mask and not args.dead_blocks and rep.cfg.model.inpaint:
            raise InputError(f"{ds.root}: study {info.id} has no stored gap mask; give --dead-blocks IDS")
        key = (layout.tof_bins, layout.segments, layout.axial_counts, layout.slice_shape)
        if args.dead_blocks and key not in geometry:
            geometry[key] = build_mask(args, rep, layout, None)  # checked before anything is written

        blocks = geometry.get(key)

        def opener(info=info, blocks=blocks):
            src = ShardArray(info, "input" if info.has_input else "target")
            if blocks is not None:
                mask, stored = blocks, None
            elif info.has_mask:
                stored = ShardArray(info, "mask")
                mask = lambda a, b: (stored.read(a, b) > 0).astype(np.uint8)  # noqa: E731
            else:
                mask, stored = None, None

            def close():
                src.close()
                if stored is not None:
                    stored.close()

            return src.read, mask, close

        jobs.append(Job(layout, opener, Path(args.output) / f"{info.id}_repaired.h5", "h5"))
    return jobs


def file_jobs(args: argparse.Namespace, rep: Repairer) -> list[Job]:
    """One INPUT -> the file -o names; several -> OUTPUT/<input's name> each (--mask: one per input)."""
    masks = args.mask or []
    if masks and len(masks) != len(args.inputs):
        raise InputError(f"--mask: {len(masks)} mask(s) for {len(args.inputs)} input(s); give one per input")
    jobs = []
    for i, path in enumerate(args.inputs):
        spec = open_input(path, args.shape, args.dtype, args.endian, args.offset)
        check_compatible(rep, spec)
        mask_path = masks[i] if masks else None
        mask = build_mask(args, rep, spec, mask_path)  # checks every input before anything is written
        out = Path(args.output) if len(args.inputs) == 1 else Path(args.output) / Path(path).name

        def opener(spec=spec, mask=mask):
            reader = SinogramReader(spec)
            return reader.read, mask, reader.close

        jobs.append(Job(spec, opener, out, args.format or "source"))
    seen: dict[Path, str] = {}
    for job in jobs:
        if job.output in seen:
            raise InputError(f"{seen[job.output]} and {job.spec.source} both write {job.output}; "
                             "give inputs distinct file names")
        seen[job.output] = str(job.spec.source)
    return jobs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="Interfile header(s) (STIR .hs, Siemens .s.hdr), raw file(s), or a converted dataset dir")
    p.add_argument("--checkpoint", required=True, help="checkpoint .pt written by hpc train")
    p.add_argument("-o", "--output", required=True,
                   help="output header (or raw file / .h5); a directory for several inputs or a dataset")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="source (default for files) or h5 (what a dataset's studies are always written as)")
    gaps = p.add_mutually_exclusive_group()
    gaps.add_argument("--mask", metavar="FILE", nargs="+",
                      help="gap mask(s) (1 = measured), same layout as INPUT; one per input")
    gaps.add_argument("--dead-blocks", metavar="IDS", help="comma-separated dead block ids (needs a scanner)")
    p.add_argument("--scanner", default="", help="geometry preset for --dead-blocks (default: the checkpoint's)")
    ds = p.add_argument_group("a converted dataset as INPUT (default: every study)")
    ds.add_argument("--studies", default="", help="comma-separated study ids")
    ds.add_argument("--split", choices=("train", "val", "test"), help="the checkpoint's own split of the studies")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave outputs that already exist (they are complete: outputs appear atomically)")
    p.add_argument("--batch", type=int, default=16, help="slices per forward pass (bounds memory)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    raw = p.add_argument_group("raw files (no header); --mask raw files share them")
    raw.add_argument("--shape", help="T,S,V,X (TOF bins, sinograms, views, bins) or S,V,X")
    raw.add_argument("--dtype", default="", help="numpy dtype of the input, e.g. uint16")
    raw.add_argument("--mask-dtype", default="uint8", help="numpy dtype of a raw mask")
    raw.add_argument("--endian", choices=("little", "big"), default="little")
    raw.add_argument("--offset", type=int, default=0)


def build_mask(args: argparse.Namespace, rep: Repairer, spec: SinogramSpec, mask_path: str | None) -> MaskFn | None:
    if mask_path:
        return file_mask(spec, open_input(mask_path, args.shape, args.mask_dtype, args.endian, 0))
    if args.dead_blocks:
        try:
            blocks = [int(v) for v in args.dead_blocks.split(",") if v.strip()]
        except ValueError:
            raise InputError(f"--dead-blocks: expected comma-separated integers, got {args.dead_blocks!r}") from None
        scanner = args.scanner or rep.scanner
        if not scanner:
            raise InputError(f"--dead-blocks: {rep.path} records no scanner; give --scanner NAME")
        return dead_block_mask(spec, scanner, blocks)
    if rep.cfg.model.inpaint:
        raise InputError(f"{rep.path}: an inpainting model needs the gaps: give --mask FILE or --dead-blocks IDS")
    return None


def rank_device(name: str) -> tuple[int, int, torch.device]:
    """(rank, world, device) under torchrun / srun / mpirun (ranks split the studies; no
    collectives are needed), or (0, 1, device) alone. Each rank takes the GPU LOCAL_RANK."""
    from hpc.launch.env import setup_torch_env

    setup_torch_env()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return rank, world, device


def run(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    rank, world, device = rank_device(args.device)
    rep = load_repairer(args.checkpoint, device)
    is_dataset = len(args.inputs) == 1 and Path(args.inputs[0]).is_dir()
    if (args.studies or args.split) and not is_dataset:
        raise InputError("--studies/--split: INPUT must be a converted dataset directory")
    jobs = dataset_jobs(args, rep) if is_dataset else file_jobs(args, rep)
    mine = jobs[rank::world]  # whole studies per rank: every output has one writer
    if world > 1 and rank == 0 and len(jobs) < world:
        print(f"hpc predict: {len(jobs)} studies for {world} ranks: {world - len(jobs)} rank(s) idle",
              file=sys.stderr, flush=True)
    for job in mine:
        if args.skip_existing and job.output.exists():
            print(f"kept {job.output} (exists)", flush=True)
            continue
        read, mask, close = job.open()
        try:
            out, counts = predict_study(rep, job.spec, read, job.output, job.fmt, mask, args.batch, args.quiet)
        finally:
            close()
        print(f"wrote {out}: {counts.summary()}", file=sys.stdout, flush=True)
    return 0
