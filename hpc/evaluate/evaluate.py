"""Score a checkpoint as a PET physicist would: against the measured counts and the noise-free
expected counts, in the gaps and overall, next to the baselines, and in reconstructed images.

Methods (docs/EVALUATION.md): the UNet (repairing the gaps exactly as `hpc predict` does), and the
baselines of hpc.baselines.interp: `reproject` (OSEM from the measured LORs only, forward-projected into
the gaps; multiplicative factors and randoms modelled when the study has them), `axial3d` (3-D
interpolation across the planes of a segment), `biharmonic` (2-D inpainting) and `linear` (radial).
Every method keeps the measured pixels and leaves virtual-crystal LORs at 0.

Studies: --study INPUT TARGET MASK [expected=F randoms=F mult=F] (files), --simulation DIR (an `hpc
simulate` directory: its held-out "test" studies by default, with their noise-free truth and known
lesions), or --dataset DIR (the checkpoint's split of a converted dataset, truth datasets if stored).

Sinogram metrics (hpc.evaluate.scoring): NMSE, PSNR, SSIM, pooled over every scored pixel of a study and of
all studies, in the gaps and over all valid pixels, against the measured target (`meas`) and the
expected counts (`true`). Image metrics, when the scanner geometry is known: the direct planes of
every version (full data, gapped, each method's repair, noise-free) reconstructed with the same
OSEM; image NMSE, SSIM and lesion bias against the full-data (`full`) and noise-free (`true`)
reconstructions. Per study and pooled, in DIR/report.md and DIR/metrics.json; PNG panels
(sinograms, errors, reconstructed images) in DIR/panels/; with --wandb also to W&B.

Fair protocol (hpc.evaluate.tuning): the baselines' free parameters (registered `tune` candidates)
are chosen on >= 3 validation studies (--tune-on / --tune-study), never on the scored ones, or
given (--param reproject.iters=8); every output is scored as `hpc predict` writes it (rounded to
the file's type); per NMSE metric each method's ratio to the best baseline gets a paired bootstrap
95 % interval and a wins / ties / loses verdict, and the `hpc predict` command of the winner is printed.

examples:
  hpc evaluate --checkpoint runs/demo/checkpoints/best.pt --simulation demo/sim --tune-on s012,s013,s014 -o eval/
  hpc evaluate --checkpoint best.pt --study s4_gaps.s.hdr s4.s.hdr s4_mask.s.hdr expected=s4_expected.s.hdr -o eval/
  hpc evaluate --checkpoint best.pt --dataset data/sim-ds --split test --baselines linear,axial3d -o eval/
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpc.baselines.reproject import DEFAULT_ITERS
from hpc.baselines.stack import Stack
from hpc.distributed.device import DEVICES, resolve_device
from hpc.errors import InputError
from hpc.evaluate import tuning
from hpc.evaluate.common import (
    StudyResult,
    check_output_dir,
    geometry,
    image_planes,
    network_output,
    pick_slices,
    pool,
    reconstruct,
    valid_lors,
    warm_projectors,
)
from hpc.evaluate.protocol import as_written
from hpc.evaluate.report import log_wandb, protocol_text, sino_table, with_panels, write_report
from hpc.evaluate.scoring import ImageScore, SinoScore, lesion_rois
from hpc.evaluate.studies import (
    Study,
    dataset_studies,
    open_study,
    parse_study_args,
    simulation_studies,
    tune_studies,
)
from hpc.physics import recon as R
from hpc.physics.projector import default_grid
from hpc.progress import Progress
from hpc.registry import BASELINES, DENOISERS, FILLS
from hpc.repair.inference import (
    Repairer,
    check_compatible,
    load_repairer,
    spec_layout,
    stack_bounds,
)

UNET = "unet"
DEFAULT_REPROJECT_ITERS = DEFAULT_ITERS  # when neither --reproject-iters nor the checkpoint's validation chose one


@dataclass
class Options:
    baselines: list[str]
    slices: int = 0  # evenly spaced slices per study (0 = all)
    batch: int = 8
    reproject_iters: int = 0  # given (--reproject-iters), else chosen (hpc.evaluate.tuning); 0: not given
    images: bool = True
    quiet: bool = False
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # baseline -> free parameters (resolved)
    # label -> (baseline, parameters): what runs instead of ``baselines`` (tuning's candidates), None: baselines
    variants: dict[str, tuple[str, dict[str, Any]]] | None = None
    network: bool = True  # the checkpoint's network runs too
    tune_on: list[Study] = field(default_factory=list)  # validation studies the free parameters are chosen on
    given: dict[str, dict[str, Any]] = field(default_factory=dict)  # --param / --reproject-iters: not tuned
    allow_few: bool = False  # tune on fewer than tuning.MIN_TUNE_STUDIES studies


# ---------------------------------------------------------------- methods
def _unet(rep: Repairer, st: Study, lo: int, data: dict, stack: Stack, planes: np.ndarray, batch: int) -> np.ndarray:
    """Model output (n, V, X) for stack planes ``planes`` (context windows as the loader builds them),
    with the lines of response as `hpc predict` and training give them: without them the fill treats
    the virtual crystals' empty bins as measured zeros (the mMR's one per block)."""
    return network_output(rep, st, lo, data, stack.w, stack.valid, planes, batch)


def method_runs(sc, opts: Options) -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (registered baseline, its free parameters): ``opts.variants``, else ``opts.baselines``
    with ``opts.params``; those that need the scanner geometry left out where it is unknown."""
    runs = opts.variants if opts.variants is not None else {b: (b, opts.params.get(b, {})) for b in opts.baselines}
    return {k: v for k, v in runs.items() if sc is not None or not BASELINES.meta(v[0]).get("needs_scanner")}


def run_methods(rep: Repairer, sc, st: Study, lo: int, data: dict, stack: Stack, planes: np.ndarray,
                opts: Options, times: dict[str, float], whole: dict | None = None) -> dict[str, np.ndarray]:
    """Every method's repair (n, V, X) of the stack planes ``planes``, as `hpc predict` writes it
    (hpc.evaluate.protocol.as_written, the study's file type): the network and the registered
    baselines (``method_runs``; ``whole``: the whole_study ones' repairs by slice, computed before);
    adds each method's wall time."""
    y, w, valid = data["input"][planes], stack.w, stack.valid
    floor = (lambda a: np.maximum(a, 0.0)) if rep.pre.nonneg else (lambda a: a)
    runs: dict[str, Callable[[], np.ndarray]] = {}
    if opts.network:
        runs[UNET] = lambda: R.repair_with(torch.from_numpy(y), torch.from_numpy(w[planes]),
                                           torch.from_numpy(_unet(rep, st, lo, data, stack, planes, opts.batch)),
                                           torch.from_numpy(valid[planes])).numpy()
    for label, (name, params) in method_runs(sc, opts).items():
        if whole is not None and label in whole:
            runs[label] = lambda label=label: np.stack([whole[label][lo + int(p)] for p in planes])
        else:
            runs[label] = lambda name=name, params=params: BASELINES.get(name)(stack, planes, **params)
    out = {}
    for name, run_one in runs.items():
        t0 = time.perf_counter()
        out[name] = as_written(floor(np.asarray(run_one(), np.float64)), st.layout.dtype)
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
    return out


def whole_study_repairs(sc, st: Study, readers: dict, scored: np.ndarray, opts: Options,
                        times: dict[str, float]) -> dict[str, dict[int, np.ndarray]]:
    """The whole_study baselines' repairs {label: {slice: (V, X)}} of the ``scored`` slices: each
    sees the whole study as one stack in canonical order, with its layout (as `hpc predict` runs it)."""
    runs = {k: v for k, v in method_runs(sc, opts).items() if BASELINES.meta(v[0]).get("whole_study")}
    if not runs:
        return {}
    _, stack = _read_stack(readers, st, sc, 0, st.layout.num_slices)
    stack.layout = spec_layout(st.layout, sc.name if sc is not None else "")
    for name, params in runs.values():  # the tuning candidates: one OSEM path can serve them all
        stack.planned.setdefault(name, []).append(params)
    out = {}
    for label, (name, params) in runs.items():
        t0 = time.perf_counter()
        got = np.asarray(BASELINES.get(name)(stack, scored, **params), np.float64)
        times[label] = times.get(label, 0.0) + time.perf_counter() - t0
        out[label] = dict(zip(scored.tolist(), got, strict=True))
    return out


# ---------------------------------------------------------------- one study


def score_images(sc, st: Study, res: StudyResult, data: dict, valid: np.ndarray, repaired: dict,
                 z: np.ndarray) -> dict:
    """Reconstruct every version of the planes at axial positions ``z`` (``data``, ``valid`` and
    ``repaired`` hold just those planes), score them; returns the images (for the panel)."""

    grid = default_grid(sc)
    versions = {"gapped": data["input"] * (data["mask"] >= 1), **repaired}
    refs = {"full": reconstruct(sc, data["target"], valid, data)}
    if "expected" in data:
        refs["true"] = reconstruct(sc, data["expected"], valid, data)
    images = {name: reconstruct(sc, s, valid, data) for name, s in versions.items()}
    rois = lesion_rois(st.lesions, z, grid)
    support = grid.fov_mask(sc.fov_radius_mm)
    scored = {"full": refs["full"], **images}  # full: what the scanner would give without dead blocks
    for name, img in scored.items():
        for ref, ref_img in refs.items():
            if not (name == "full" and ref == "full"):
                res.image.setdefault(name, {}).setdefault(ref, ImageScore()).update(img, ref_img, support, rois)
    res.image_planes += len(z)
    return {**images, **{f"ref:{k}": v for k, v in refs.items()}}


CHUNK = 16  # planes repaired, scored and reconstructed at a time: memory follows it, not the stack's size


def _read_stack(readers: dict, st: Study, sc, lo: int, hi: int) -> tuple[dict, Stack]:
    """A stack's data (float64, by role) and the Stack the baselines see (gap values zeroed)."""
    data = {role: r.read(lo, hi).astype(np.float64) for role, r in readers.items()}
    _finite_mask(data["mask"], readers["mask"], st, lo)
    w = np.clip(data["mask"], 0, 1)
    data["input"] = np.where(w > 0, data["input"], 0.0)  # gap values never enter a method
    valid = valid_lors(sc, data, w.shape)
    return data, Stack(data["input"], w, valid, data.get("mult"), data.get("randoms"), sc)


def _score_chunk(rep: Repairer, sc, st: Study, res: StudyResult, lo: int, data: dict, stack: Stack,
                 planes: np.ndarray, z: np.ndarray | None, opts: Options, whole: dict | None = None) -> None:
    """Repair the stack planes ``planes`` with every method, score them (sinograms, and images
    when ``z`` gives their axial positions) and keep the panel of the slice with the most gaps."""
    repaired = run_methods(rep, sc, st, lo, data, stack, planes, opts, res.times, whole)
    w, valid = stack.w[planes], stack.valid[planes]
    for name, out in repaired.items():
        for ref in ("target", "expected"):
            if ref in data:
                score = res.sino.setdefault(name, {}).setdefault("meas" if ref == "target" else "true", SinoScore())
                score.update(out, data[ref][planes], w, valid)
    images = None
    if z is not None:
        sub = {k: v[planes] for k, v in data.items()}
        images = score_images(sc, st, res, sub, valid, repaired, z[planes])
    gaps = ((w < 1) & valid).sum(axis=(1, 2))
    k = int(gaps.argmax())
    rank = (images is not None, int(gaps[k]))  # the image stack's panel wins, then the most gap pixels
    if rank > res.panel_rank:
        res.panel, res.panel_rank = _panel(data, stack, planes, k, lo, repaired, images), rank
    res.slices += len(planes)


def evaluate_study(rep: Repairer, st: Study, opts: Options, bar: Progress | None = None) -> StudyResult:
    """Score the study's selected slices (``opts.slices``) in chunks of CHUNK planes: only those are
    repaired and, where they are direct planes, reconstructed."""
    sc = geometry(rep, st.layout)
    res = StudyResult()
    scored = pick_slices(st.layout.num_slices, opts.slices)
    readers = st.open()
    try:
        whole = whole_study_repairs(sc, st, readers, scored, opts, res.times)
        lo_all, hi_all = stack_bounds(st.layout)
        for lo, hi in sorted(set(zip(lo_all.tolist(), hi_all.tolist(), strict=True))):
            sel = scored[(scored >= lo) & (scored < hi)] - lo
            if sel.size == 0:
                continue
            z = image_planes(sc, st, lo, hi, opts.images)
            data, stack = _read_stack(readers, st, sc, lo, hi)
            for a in range(0, len(sel), CHUNK):
                _score_chunk(rep, sc, st, res, lo, data, stack, sel[a:a + CHUNK], z, opts, whole)
                if bar is not None:
                    bar.update(len(sel[a:a + CHUNK]))
            del data, stack
    finally:
        for r in readers.values():
            r.close()
    return res


def _finite_mask(mask: np.ndarray, reader, st: Study, lo: int) -> None:
    """NaN/inf in a float mask file is an error naming the file and slice, never "measured"."""
    bad = np.flatnonzero(~np.isfinite(mask).reshape(len(mask), -1).all(axis=1))
    if bad.size:
        where = reader.spec.source if hasattr(reader, "spec") else f"study {st.id} mask"
        raise InputError(f"{where}: mask slice {lo + int(bad[0])} contains NaN or inf (a mask holds 1 = measured, "
                         "0 = gap)")


def _panel(data: dict, stack: Stack, planes: np.ndarray, k: int, lo: int, repaired: dict,
           images: dict | None) -> dict:
    """Plane ``planes[k]`` (``k`` indexes the chunk's repairs and images): its sinograms (and
    images) for the PNG panel."""
    p = int(planes[k])
    return {"slice": lo + p, "input": data["input"][p], "target": data["target"][p],
            "expected": data["expected"][p] if "expected" in data else None, "mask": stack.w[p],
            "methods": {n: o[k] for n, o in repaired.items()},
            "images": None if images is None else {n: im[k] for n, im in images.items()}}


def evaluate(rep: Repairer, studies: list[Study], out_dir: Path, opts: Options) -> dict:
    """Choose the free parameters (hpc.evaluate.tuning.choose_params), score every study with them; write
    report.md, metrics.json and panels/. Returns ``{"results": {study | "overall": {method:
    {metric_ref: value}}}, "images", "times", "tuning", "comparison", "recommend", "panels", "report"}``."""
    check_output_dir(out_dir)
    scanners = {geometry(rep, st.layout) for st in [*studies, *opts.tune_on]} - {None}
    setup = sum(warm_projectors(sc) for sc in scanners)
    rep, opts, chosen = tuning.choose_params(rep, studies, opts, evaluate_study)
    results = {}
    with Progress(sum(len(pick_slices(s.layout.num_slices, opts.slices)) for s in studies), "slices", "evaluate",
                  enabled=not opts.quiet) as bar:
        for st in studies:
            check_compatible(rep, st.layout)
            results[st.id] = evaluate_study(rep, st, opts, bar)
    comp = tuning.comparisons(results)
    aux = bool(FILLS.meta(rep.cfg.data.fill).get("aux"))
    method, command = tuning.predict_command(comp, chosen, str(rep.path), aux)
    protocol = {"tuning": chosen.to_dict(), "comparison": comp, "recommend": {"method": method, "command": command}}

    def finish(panels: list[str]) -> dict:
        results["overall"] = pool(results)
        return write_report(rep, results, panels, out_dir, opts, setup, protocol)

    return with_panels(results, out_dir, finish)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=("repair", "denoise"), default="repair",
                   help="repair: fill dead-block gaps (default); denoise: estimate the full-dose counts of an "
                        "`hpc simulate --low-dose F` directory's low-dose twins (hpc.evaluate.denoise; "
                        "--simulation, --tune-on, --param gauss.sigma=1.5; --checkpoint optional)")
    p.add_argument("--checkpoint", help="checkpoint .pt written by hpc train (required for --task repair)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--study", nargs="+", action="append", metavar="FILE",
                     help="INPUT TARGET MASK [expected=F randoms=F mult=F]: gapped acquisition, clean target, gap "
                          "mask (1 = measured), optional noise-free truth; repeat per study")
    src.add_argument("--simulation", metavar="DIR", help="an hpc simulate directory (default: its test studies)")
    src.add_argument("--dataset", metavar="DIR", help="converted dataset with stored gap masks (hpc convert --mask)")
    p.add_argument("--studies", default="", help="with --simulation: comma-separated study ids")
    p.add_argument("--split", choices=("test", "val", "train", "all"), default="test",
                   help="with --dataset: which of the checkpoint's study splits (default test)")
    p.add_argument("-o", "--output", required=True, help="directory for report.md, metrics.json, panels/")
    p.add_argument("--baselines", default="",
                   help=f"comma-separated, from: {', '.join(BASELINES.names())} (default all; --task denoise: "
                        f"from {', '.join(DENOISERS.names())})")
    p.add_argument("--reproject-iters", type=int, default=0,
                   help="OSEM iterations of reproject (default: the count the checkpoint's validation chose, "
                        f"else {DEFAULT_REPROJECT_ITERS})")
    p.add_argument("--param", action="append", default=[], metavar="BASELINE.NAME=VALUE",
                   help="a baseline's free parameter, used as given (not tuned), e.g. reproject.iters=8; repeatable")
    tune = p.add_argument_group("fair protocol: free parameters chosen on validation studies, never held-out ones")
    tune.add_argument("--tune-on", default="", metavar="STUDIES",
                      help="with --simulation: comma-separated study ids; with --dataset: a split of the checkpoint "
                           f"(val, train) or study ids; at least {tuning.MIN_TUNE_STUDIES}, none of them scored")
    tune.add_argument("--tune-study", nargs="+", action="append", metavar="FILE",
                      help="with --study: a validation study's INPUT TARGET MASK [role=F ...]; repeat per study")
    tune.add_argument("--allow-few-tune-studies", action="store_true",
                      help=f"accept fewer than {tuning.MIN_TUNE_STUDIES} tuning studies")
    p.add_argument("--no-images", action="store_true",
                   help="skip the image domain: no OSEM reconstruction of the scored direct planes (for each "
                        "method, the gapped data and the full-data and noise-free references), so no img_* or "
                        "lesion metrics and no image row in the panels; the sinogram metrics are unchanged")
    p.add_argument("--slices", type=int, default=0,
                   help="evenly spaced slices per study (0 = all): only these are repaired, scored and, where "
                        "they are direct planes, reconstructed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--wandb", choices=("disabled", "offline", "online"), default="disabled",
                   help="also log to W&B (WANDB_MODE overrides)")
    p.add_argument("--project", default="",
                   help="W&B project (default: the training run's log.project; without a checkpoint: hpc)")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:

    if args.task == "denoise":
        from hpc.evaluate import denoise  # it builds on this module (a module-level import is a cycle)

        return denoise.run(args)
    if not args.checkpoint:
        raise InputError("--checkpoint is required for --task repair (the network to score)")
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()] or list(BASELINES.names())
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise InputError(f"--baselines: unknown {unknown}; valid: {', '.join(BASELINES.names())}")
    if args.batch < 1 or args.reproject_iters < 0 or args.slices < 0:
        raise InputError(f"--batch must be >= 1, --reproject-iters >= 0 and --slices >= 0 (0 = all); got "
                         f"--batch {args.batch} --reproject-iters {args.reproject_iters} --slices {args.slices}")
    given = tuning.parse_param_items(args.param, baselines)
    check_output_dir(Path(args.output), [Path(p) for p in (args.dataset, args.simulation) if p])
    rep = load_repairer(args.checkpoint, resolve_device(args.device, what="--device"))
    if args.dataset:
        studies = dataset_studies(rep, args.dataset, args.split)
    elif args.simulation:
        studies = simulation_studies(args.simulation, [s for s in args.studies.split(",") if s])
    else:
        studies = [open_study(*parse_study_args(items)) for items in args.study]
    tune_on = tune_studies(rep, args.tune_on, args.tune_study, args.study, args.simulation, args.dataset)
    opts = Options(baselines, args.slices, args.batch, args.reproject_iters, not args.no_images, args.quiet,
                   tune_on=tune_on, given=given, allow_few=args.allow_few_tune_studies)
    out = Path(args.output)
    summary = evaluate(rep, studies, out, opts)
    print(sino_table(summary["results"], summary["times"]), end="")
    print(protocol_text(summary), end="")
    done = summary["scored"]["overall"]
    images = (f"{done['image_planes']} direct planes reconstructed for each version (--no-images skips this)"
              if opts.images else "not evaluated (--no-images)")
    print(f"scored: {done['slices']} slices of {len(studies)} studies; images: {images}")
    print(f"report: {summary['report']}\npanels: {', '.join(summary['panels'])}")
    mode = os.environ.get("WANDB_MODE", args.wandb)
    if mode != "disabled":
        print(f"W&B run: {log_wandb(summary, mode, out, rep, args.project)}")
    return 0
