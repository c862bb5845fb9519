"""Repair sinograms with a trained checkpoint or a physics / interpolation method; the output is
written in the source's own format.

--method unet (default) runs the checkpoint's network; --method hybrid runs a data.fill=reproject
network on the fill its validation tuned (the OSEM iteration count it chose for reproject); any
registered baseline (reproject, axial3d, ...) needs no checkpoint: its free parameters are
--method-param NAME=VALUE (default: the value a --checkpoint's validation chose, else its own);
geometry-aware ones use --scanner (else the header's `originating system`) and model --mult /
--randoms when given. Every method keeps the measured bins byte-identical.

For the network, slices are windowed exactly as the training loader windows them (2k+1 neighbouring slices of the
same TOF bin and segment, edges replicated or reflected), gap pixels are zeroed (or pre-filled) in
every channel as training corrupted them, then normalized/padded with the checkpoint's
preprocessing, repaired in batches and mapped back exactly (crop, denormalize): hpc.repair.inference and
hpc.repair.files, the library this command line drives. With a gap mask (--mask FILE, or --dead-blocks
with the scanner geometry) only gap pixels are replaced: every measured value is copied bytewise
from the input. Predictions written into integer files are rounded and clipped, and the counts are
reported. Memory is bounded by --batch slices (a baseline: one segment's stack of planes, or the
study for a whole-study one); the network uses the GPU when present, baselines the CPU.

examples:
  hpc predict --checkpoint runs/demo/checkpoints/best.pt s1_gaps.s.hdr --mask s1_mask.s.hdr -o s1_fixed.s.hdr
  hpc predict --method reproject --method-param iters=8 scan.s.hdr --mask gaps.s.hdr -o fixed.s.hdr \\
      --mult mult.s.hdr --randoms randoms.s.hdr     # physics: OSEM from the measured LORs, reprojected
  hpc predict --method reproject --checkpoint best.pt scan.s.hdr --mask gaps.s.hdr -o fixed.s.hdr  # tuned iters
  hpc predict --method hybrid --checkpoint best.pt scan.s.hdr --mask gaps.s.hdr -o fixed.s.hdr
  hpc predict --method axial3d scan.hs --dead-blocks 3,17 --scanner mmr -o scan_fixed.hs
  hpc predict --dose 0.25 --method reproject --method-param iters=2 low.hs --mult m.hs --randoms r.hs -o full.hs
  hpc predict --dose 0.25 --checkpoint denoiser.pt low.hs -o full.hs     # a corrupt.dose=0.25 network
  hpc predict --dose 0.25 --method gauss --method-param sigma=1.5 data/low -o den/   # den/<study>_denoised.h5
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
import sys
from pathlib import Path

import torch

from hpc.distributed.device import DEVICES, resolve_device
from hpc.distributed.launcher import setup_torch_env, torch_ranks
from hpc.errors import InputError
from hpc.io.atomic import sweep_stale
from hpc.io.dirlock import missing_dirs, remove_empty
from hpc.io.spec import parse_raw_shape
from hpc.registry import BASELINES, DENOISERS
from hpc.repair.denoise import resolve_denoise
from hpc.repair.files import RawLayout, dataset_jobs, file_jobs, output_files, predict_study
from hpc.repair.inference import load_repairer
from hpc.repair.methods import UNET, check_method_name, param_help, resolve_method

FORMATS = ("source", "h5")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="Interfile header(s) (STIR .hs, Siemens .s.hdr), raw file(s), or a converted dataset dir")
    p.add_argument("--checkpoint", help="checkpoint .pt written by hpc train (needed by unet and hybrid; with a "
                                        "baseline: the parameters its validation chose)")
    baselines = "; ".join(f"{n}" + (f" ({param_help(n)})" if param_help(n) else "") for n in BASELINES.names())
    p.add_argument("--method", default=UNET, metavar="METHOD",
                   help=f"unet (default): the checkpoint's network; hybrid: a data.fill=reproject network on the fill "
                        f"its validation tuned; or a registered baseline, no checkpoint: {baselines}")
    p.add_argument("--dose", type=float, default=0.0, metavar="F",
                   help="denoise instead of repair: INPUT is a low-dose scan holding a fraction F of a full scan's "
                        "counts; the output estimates the full-dose counts. --method unet (a checkpoint trained "
                        f"with corrupt.dose or corrupt.paired) or {', '.join(DENOISERS.names())} (no checkpoint; "
                        "--mult / --randoms: the full-dose factors; a converted dataset's: its stored ones, its "
                        "paired `input` as the low-dose scan); no --mask (docs/EVALUATION.md, \"Denoising\")")
    p.add_argument("--method-param", action="append", default=[], metavar="NAME=VALUE",
                   help="a baseline's free parameter, e.g. iters=8 (repeatable; checked against the baseline)")
    p.add_argument("-o", "--output", required=True,
                   help="output header (or raw file / .h5); a directory for several inputs or a dataset")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="source (default for files) or h5 (what a dataset's studies are always written as)")
    gaps = p.add_mutually_exclusive_group()
    gaps.add_argument("--mask", metavar="FILE", nargs="+",
                      help="gap mask(s) (1 = measured), same layout as INPUT; one per input")
    gaps.add_argument("--dead-blocks", metavar="IDS", help="comma-separated dead block ids (needs a scanner)")
    p.add_argument("--scanner", default="",
                   help="geometry preset for --dead-blocks and geometry-aware baselines (default: a network's "
                        "checkpoint's; a baseline: the header's `originating system`, else the checkpoint's)")
    p.add_argument("--mult", metavar="FILE", nargs="+", default=[],
                   help="multiplicative factors (efficiency x attenuation), one per INPUT: modelled by reproject "
                        "and data.fill=reproject models")
    p.add_argument("--randoms", metavar="FILE", nargs="+", default=[],
                   help="expected randoms, one per INPUT: modelled by reproject and data.fill=reproject models")
    ds = p.add_argument_group("a converted dataset as INPUT (default: every study)")
    ds.add_argument("--studies", default="", help="comma-separated study ids")
    ds.add_argument("--split", choices=("train", "val", "test"), help="the checkpoint's own split of the studies")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave outputs that already exist (they are complete: outputs appear atomically)")
    p.add_argument("--batch", type=int, default=16, help="slices per forward pass (bounds memory)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    raw = p.add_argument_group("raw files (no header); --mask raw files share them")
    raw.add_argument("--shape", help="T,S,V,X (TOF bins, sinograms, views, bins) or S,V,X")
    raw.add_argument("--dtype", default="", help="numpy dtype of the input, e.g. uint16")
    raw.add_argument("--mask-dtype", default="uint8", help="numpy dtype of a raw mask")
    raw.add_argument("--endian", choices=("little", "big"), default="little")
    raw.add_argument("--offset", type=int, default=0)


def rank_device(name: str) -> tuple[int, int, torch.device]:
    """(rank, world, device) under torchrun / srun / mpirun (ranks split the studies; no
    collectives are needed), or (0, 1, device) alone. Each rank takes the GPU LOCAL_RANK."""
    setup_torch_env()
    rank, world, local = torch_ranks()
    return rank, world, resolve_device(name, local, what="--device")


def _ints(flag: str, text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def _raw_layout(args: argparse.Namespace) -> RawLayout | None:
    """--shape/--dtype/... of headerless inputs (None: the inputs have Interfile headers)."""
    if not args.shape:
        return None
    dims = parse_raw_shape(args.shape, args.dtype, str(args.inputs[0]), "T,S,V,X")
    return RawLayout(dims, args.dtype, args.mask_dtype, args.endian, args.offset)


def _jobs(args: argparse.Namespace, rep) -> list:
    """The command line's studies as hpc.repair.files Jobs (a dataset directory, or files)."""
    blocks = _ints("--dead-blocks", args.dead_blocks) if args.dead_blocks else None
    is_dataset = len(args.inputs) == 1 and Path(args.inputs[0]).is_dir()
    if (args.studies or args.split) and not is_dataset:
        raise InputError("--studies/--split: INPUT must be a converted dataset directory")
    if not is_dataset:
        return file_jobs(rep, args.inputs, args.output, args.mask, args.format or "source", _raw_layout(args),
                         blocks, args.scanner, {"mult": args.mult, "randoms": args.randoms})
    if args.format == "source":
        raise InputError(f"{args.inputs[0]}: a converted dataset is written as HDF5 (--format h5)")
    studies = [v.strip() for v in args.studies.split(",") if v.strip()] if args.studies else None
    return dataset_jobs(rep, args.inputs[0], args.output, studies, args.split, blocks, args.scanner)


def run(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    if not args.dose:
        check_method_name(args.method, bool(args.checkpoint))
    rank, world, device = rank_device(args.device)
    ckpt = load_repairer(args.checkpoint, device) if args.checkpoint else None
    rep = (resolve_denoise(args.method, args.method_param, ckpt, args.dose, args.scanner) if args.dose
           else resolve_method(args.method, args.method_param, ckpt, args.scanner))
    jobs = _jobs(args, rep)
    mine = jobs[rank::world]  # whole studies per rank: every output has one writer
    if world > 1 and rank == 0 and len(jobs) < world:
        print(f"hpc predict: {len(jobs)} studies for {world} ranks: {world - len(jobs)} rank(s) idle",
              file=sys.stderr, flush=True)
    outputs = [p for job in mine for p in output_files(job)]
    for p in outputs:  # what a killed predict left (its writer is gone: hpc.io.atomic.sweep_stale)
        sweep_stale(p.parent, p.name)
    created = missing_dirs([p.parent for p in outputs])
    try:
        _repair_jobs(args, rep, mine)
    except BaseException:
        remove_empty(created)  # a failed start leaves no empty output directory
        raise
    return 0


def _repair_jobs(args: argparse.Namespace, rep, mine: list) -> None:
    for job in mine:
        if args.skip_existing and job.output.exists():
            print(f"kept {job.output} (exists)", flush=True)
            continue
        read, mask, close = job.open()
        aux = {k: f() for k, f in job.aux.items()}  # mult / randoms readers (reproject, data.fill=reproject)
        try:
            out, counts = predict_study(rep, job.spec, read, job.output, job.fmt, mask, args.batch, args.quiet,
                                        {k: r.read for k, r in aux.items()})
        finally:
            close()
            for r in aux.values():
                r.close()
        print(f"wrote {out}: {counts.summary()}", file=sys.stdout, flush=True)
