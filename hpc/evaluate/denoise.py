"""`hpc evaluate --task denoise`: the package's second task scored the fair way (docs/EVALUATION.md,
"Denoising"). A low-dose scan (``hpc simulate --low-dose F``: each count of the full scan kept with
probability F) is denoised by a trained network (``corrupt.dose=F`` or ``corrupt.paired`` checkpoints)
and by the physicist's denoisers of hpc.baselines.denoise (``scaled``, ``gauss``, ``reproject``); every
output is an estimate of the FULL-dose expected counts, written as `hpc predict` writes files.

References: ``true``, the noise-free expected counts; ``meas``, the part of the full scan the
low-dose one did not keep, scaled, ``(full - low) / (1 - F)``: measured data with the right mean that
is independent of the input (the full scan itself contains the input's counts, and scoring against
it would reward copying the input's noise). The free parameters (gauss's width, reproject's
iterations) are chosen on >= 3 validation studies by NMSE against ``meas`` (what a user has), never on
the scored ones. Images: the direct planes of every version reconstructed with one OSEM; NMSE and lesion
bias against the noise-free image. Verdicts: each method's ratio to the best physics denoiser with a
paired bootstrap 95 % interval over studies (hpc.evaluate.protocol.compare).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from hpc.baselines.denoise import LowDose
from hpc.distributed.device import resolve_device
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
from hpc.evaluate.protocol import as_written, compare
from hpc.evaluate.report import energies, flatten, fmt, log_wandb, markdown_table, protocol_text, with_panels
from hpc.evaluate.scoring import ImageScore, SinoScore, lesion_rois
from hpc.evaluate.studies import Study, low_dose_studies
from hpc.io.atomic import atomic_write_text
from hpc.physics.projector import default_grid
from hpc.progress import Progress
from hpc.registry import DENOISERS
from hpc.repair.denoise import check_denoiser, denoiser_defaults, denoiser_value, network_input
from hpc.repair.inference import Repairer, check_compatible, load_repairer, stack_bounds

NETWORK = "unet"
CRITERION = "nmse_all_meas"  # chooses: NMSE over all bins against the independent remainder, pooled
METRICS = ("nmse_all_true", "nmse_all_meas", "img_nmse_true")  # compared on the held-out studies
COLUMNS = (("nmse_all_true", "NMSE (true)"), ("nmse_all_meas", "NMSE (meas)"), ("psnr_all_true", "PSNR dB (true)"),
           ("ssim_all_true", "SSIM (true)"), ("img_nmse_true", "img NMSE (true)"), ("img_ssim_true", "img SSIM (true)"),
           ("lesion_bias_true", "lesion bias (true)"), ("lesion_absbias_true", "lesion |bias| (true)"))
CHUNK = 16


def _network(rep: Repairer, st: Study, lo: int, data: dict, valid: np.ndarray, planes: np.ndarray, dose: float,
             batch: int) -> np.ndarray:
    """(n, V, X) full-dose estimate of the stack planes ``planes``: every bin through the network, fed
    the scale it was trained on."""
    out = network_output(rep, st, lo, data, None, valid, planes, batch, lambda x: network_input(rep, x, dose))
    return np.where(valid[planes], out, 0.0)


def _outputs(rep: Repairer | None, st: Study, lo: int, data: dict, d: LowDose, planes: np.ndarray,
             runs: dict, times: dict, batch: int) -> dict[str, np.ndarray]:
    """Every method's output for ``planes`` as a file of the study's type holds it (floored at 0)."""
    calls = {NETWORK: lambda: _network(rep, st, lo, data, d.valid, planes, d.dose, batch)} if rep else {}
    for label, (name, params) in runs.items():
        calls[label] = lambda name=name, params=params: DENOISERS.get(name)(d, planes, **params)
    out = {}
    for label, call in calls.items():
        t0 = time.perf_counter()
        out[label] = as_written(np.maximum(np.asarray(call(), np.float64), 0.0), st.layout.dtype)
        times[label] = times.get(label, 0.0) + time.perf_counter() - t0
    return out


def _score_images(sc, st: Study, res: StudyResult, data: dict, valid: np.ndarray, outs: dict, z: np.ndarray
                  ) -> dict[str, np.ndarray]:
    """Score every version's reconstruction; returns them (n, ny, nx) by name ("ref:true", "ref:full": the
    full-dose scan's, and the methods') for the panel."""
    grid = default_grid(sc)
    imgs = {"ref:true": reconstruct(sc, data["expected"], valid, data)}
    rois, support = lesion_rois(st.lesions, z, grid), grid.fov_mask(sc.fov_radius_mm)
    for name, sino in {"full": data["target"], **outs}.items():
        img = imgs["ref:full" if name == "full" else name] = reconstruct(sc, sino, valid, data)
        res.image.setdefault(name, {}).setdefault("true", ImageScore()).update(img, imgs["ref:true"], support, rois)
    res.image_planes += len(z)
    return imgs


def _panel(data: dict, planes: np.ndarray, lo: int, dose: float, outs: dict, imgs: dict | None) -> dict:
    """hpc.evaluate.report.save_panel's dict for the middle plane of ``planes``: the low-dose input on the
    full-dose scale, the full-dose scan, the noise-free counts, each method (and their images)."""
    k = len(planes) // 2
    p = planes[k]
    return {"slice": lo + int(p), "input": data["input"][p] / dose, "target": data["target"][p],
            "expected": data["expected"][p], "mask": None, "methods": {n: o[k] for n, o in outs.items()},
            "images": None if imgs is None else {n: im[k] for n, im in imgs.items()},
            "labels": (f"low dose / {dose:g}", "full dose"), "why": "the middle of the first scored stack"}


def denoise_study(rep: Repairer | None, st: Study, dose: float, runs: dict, slices: int, images: bool,
                  batch: int = 8, bar: Progress | None = None) -> StudyResult:
    """Score every method (``runs``: label -> (denoiser, parameters); the network when ``rep``) on the
    study's selected slices, stack by stack (TOF bin, segment), CHUNK planes at a time."""
    sc = geometry(rep, st.layout)
    res, scored, readers = StudyResult(), pick_slices(st.layout.num_slices, slices), st.open()
    planned = {}
    for name, params in runs.values():  # every candidate of an iterative denoiser from one run
        planned.setdefault(name, []).append(params)
    try:
        lo_all, hi_all = stack_bounds(st.layout)
        for lo, hi in sorted(set(zip(lo_all.tolist(), hi_all.tolist(), strict=True))):
            sel = scored[(scored >= lo) & (scored < hi)] - lo
            if sel.size == 0:
                continue
            data = {role: r.read(lo, hi).astype(np.float64) for role, r in readers.items()}
            valid = valid_lors(sc, data, data["input"].shape)
            d = LowDose(data["input"], dose, valid, data.get("mult"), data.get("randoms"), sc, planned)
            rest = (data["target"] - data["input"]) / (1 - dose)  # independent of the input (module doc)
            z = image_planes(sc, st, lo, hi, images)
            for a in range(0, len(sel), CHUNK):
                planes = sel[a:a + CHUNK]
                outs = _outputs(rep, st, lo, data, d, planes, runs, res.times, batch)
                for name, out in outs.items():
                    for ref, arr in (("true", data["expected"]), ("meas", rest)):
                        score = res.sino.setdefault(name, {}).setdefault(ref, SinoScore())
                        score.update(out, arr[planes], np.ones(out.shape), valid[planes])
                imgs = None if z is None else _score_images(sc, st, res, {k: v[planes] for k, v in data.items()},
                                                            valid[planes], outs, z[planes])
                if res.panel is None or (imgs is not None and res.panel["images"] is None):
                    res.panel = _panel(data, planes, lo, dose, outs, imgs)  # a stack with images if any
                res.slices += len(planes)
                if bar is not None:
                    bar.update(len(planes))
    finally:
        for r in readers.values():
            r.close()
    return res


def choose(names: list[str], given: dict, tune: list[tuple[Study, float]], slices: int) -> dict:
    """The fair protocol's choices (report.protocol_text's ``tuning``): every free parameter given,
    else the candidate with the lowest pooled CRITERION on the ``tune`` studies."""
    variants = tuning.candidates(names, given, DENOISERS) if tune else {}
    pooled: dict[str, list[float]] = {}
    for st, dose in tune:
        for label, refs in denoise_study(None, st, dose, variants, slices, False).sino.items():
            s = refs["meas"].sums
            pooled.setdefault(label, [0.0, 0.0])[0] += s["sse_all"]
            pooled[label][1] += s["energy_all"]
    scores = {k: s / e if e > 0 else float("nan") for k, (s, e) in pooled.items()}
    params: dict[str, dict] = {}
    for name in names:
        mine = {k: p for k, (n, p) in variants.items() if n == name}
        best = min(mine, key=lambda k: scores[k]) if mine else None
        for key, value in given.get(name, {}).items():
            params.setdefault(name, {})[key] = {"value": value, "source": "given", "scores": {}}
        for key in DENOISERS.meta(name).get("tune") or {}:
            if key in given.get(name, {}):
                continue
            if best is None:  # nothing to tune on (--allow-few-tune-studies with none): the default
                value = denoiser_defaults(name)[key]
                params.setdefault(name, {})[key] = {"value": value, "source": "default", "scores": {}}
            else:
                cand = {str(p[key]): scores[k] for k, p in mine.items()}
                params.setdefault(name, {})[key] = {"value": mine[best][key], "source": "tuned", "scores": cand}
    return {"studies": [st.id for st, _ in tune], "criterion": CRITERION, "scores": scores, "params": params,
            "network": {}}


def evaluate_denoising(rep: Repairer | None, studies: list[tuple[Study, float]], tune: list[tuple[Study, float]],
                       out_dir: Path, names: list[str], given: dict, slices: int = 0, images: bool = True,
                       quiet: bool = False, batch: int = 8, allow_few: bool = False) -> dict:
    """Tune on ``tune``, score ``studies``; writes report.md and metrics.json into ``out_dir``."""
    check_output_dir(out_dir)
    tuning.check_studies([st.id for st, _ in tune], [st.id for st, _ in studies], allow_few)
    for sc in {geometry(rep, st.layout) for st, _ in studies + tune} - {None}:
        warm_projectors(sc)
    chosen = choose(names, given, tune, slices)
    runs = {n: (n, {k: c["value"] for k, c in chosen["params"].get(n, {}).items()}) for n in names}
    results = {}
    with Progress(sum(len(pick_slices(s.layout.num_slices, slices)) for s, _ in studies), "slices",
                  "evaluate denoise", enabled=not quiet) as bar:
        for st, dose in studies:
            if rep is not None:
                check_compatible(rep, st.layout)
            results[st.id] = denoise_study(rep, st, dose, runs, slices, images, batch, bar)
    comparison = {}
    for metric in METRICS:
        per_study = tuning.paired_errors(results, metric)
        if per_study and all(per_study.values()):
            comparison[metric] = compare(per_study, {NETWORK}, seed=0)
    doses = [d for _, d in studies]
    protocol = {"tuning": chosen, "comparison": comparison, "recommend": recommend(comparison, chosen, doses, rep)}

    def finish(panels: list[str]) -> dict:
        results["overall"] = pool(results)
        return write(rep, results, protocol, out_dir, doses, panels)

    return with_panels(results, out_dir, finish)


def recommend(comparison: dict, chosen: dict, doses: list[float], rep: Repairer | None) -> dict:
    """The method to use: the network where it wins on the first metric, else the best physics
    denoiser; and the `hpc predict --dose` command that runs it with the chosen parameters."""
    c = comparison.get(METRICS[0])
    if not c:
        return {"method": "", "command": ""}
    wins = c["methods"].get(NETWORK, {}).get("verdict") == "wins"
    method = NETWORK if wins else c["reference"]
    dose = f"--dose {doses[0]:g}" if len(set(doses)) == 1 else "--dose F"
    if method == NETWORK:
        return {"method": method, "command": f"hpc predict {dose} --checkpoint {rep.path} INPUT -o OUTPUT"}
    args = "".join(f" --method-param {k}={v['value']}" for k, v in chosen["params"].get(method, {}).items())
    return {"method": method,
            "command": f"hpc predict {dose} --method {method}{args} INPUT [--mult MULT --randoms RANDOMS] -o OUTPUT"}


def write(rep: Repairer | None, results: dict, protocol: dict, out_dir: Path, doses: list[float],
          panels: list[str]) -> dict:
    sino, image, times = flatten(results)
    rows = {s: {m: {**v, **image.get(s, {}).get(m, {})} for m, v in ms.items()} for s, ms in sino.items()}
    for s, ms in image.items():  # the full-dose scan's own image ("full"): the noise floor of one scan
        if "full" in ms:
            rows.setdefault(s, {})["full"] = ms["full"]
    table = markdown_table(rows, COLUMNS, times)
    text = (f"# Denoising evaluation{f' of {rep.path}' if rep else ''}\n\nLow-dose fraction(s) "
            f"{sorted(set(doses))}; every method estimates the full-dose expected counts. `true`: against the "
            "noise-free counts; `meas`: against the counts the low-dose scan did not keep, scaled (independent of "
            "the input). `full`: the full-dose scan reconstructed as measured (the noise floor of one full scan). "
            "Pooled over pixels (docs/EVALUATION.md, \"Denoising\").\n\n" + table
            + "\n## Fair protocol\n\n```\n" + protocol_text(protocol) + "```\n\n"
            + "".join(f"![{Path(p).stem}](panels/{Path(p).name})\n" for p in panels))
    summary = {"task": "denoise", "checkpoint": str(rep.path) if rep else "", "doses": doses, "results": sino,
               "images": image, "times": times, "energy": energies(results), **protocol}
    atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2, allow_nan=True))
    report = atomic_write_text(out_dir / "report.md", text)  # last: its presence means the evaluation is complete
    return {**summary, "report": str(report), "table": table, "panels": panels}


def parse_given(items: list[str], names: list[str]) -> dict:
    out: dict[str, dict] = {}
    for item in items:
        head, sep, value = item.partition("=")
        name, dot, key = head.strip().partition(".")
        tune = DENOISERS.meta(name).get("tune", {}) if name in DENOISERS else {}
        if not (sep and dot and name in names and key in tune):
            raise InputError(f"--param {item}: expected DENOISER.NAME=VALUE with DENOISER in {', '.join(names)} "
                             "(e.g. gauss.sigma=1.5, reproject.iters=4)")
        out.setdefault(name, {})[key] = denoiser_value(name, key, value, f"--param {item}")
    return out


def run(args: argparse.Namespace) -> int:
    """`hpc evaluate --task denoise`: --simulation DIR with low-dose twins, --tune-on >= 3 of its studies."""
    if not args.simulation:
        raise InputError("--task denoise scores an `hpc simulate --low-dose F` directory: give --simulation DIR")
    names = [b.strip() for b in args.baselines.split(",") if b.strip()] or list(DENOISERS.names())
    unknown = [b for b in names if b not in DENOISERS]
    if unknown:
        raise InputError(f"--baselines: unknown denoisers {unknown}; valid: {', '.join(DENOISERS.names())}")
    given = parse_given(args.param, names)
    check_output_dir(Path(args.output), [Path(args.simulation)])
    rep = load_repairer(args.checkpoint, resolve_device(args.device, what="--device")) if args.checkpoint else None
    if rep is not None:
        check_denoiser(rep)
    studies = low_dose_studies(args.simulation, [s for s in args.studies.split(",") if s])
    tune = low_dose_studies(args.simulation, [s.strip() for s in args.tune_on.split(",") if s.strip()]) \
        if args.tune_on else []
    summary = evaluate_denoising(rep, studies, tune, Path(args.output), names, given, args.slices,
                                 not args.no_images, args.quiet, args.batch, args.allow_few_tune_studies)
    print(summary["table"], end="")
    print(protocol_text(summary), end="")
    best = summary["recommend"]["method"]
    print(f"best on held-out NMSE vs the noise-free counts: {best or 'n/a'}")
    print(f"report: {summary['report']}\npanels: {', '.join(summary['panels'])}")
    mode = os.environ.get("WANDB_MODE", args.wandb)
    if mode != "disabled":
        print(f"W&B run: {log_wandb(summary, mode, Path(args.output), rep, args.project)}")
    return 0


def verdict_line(comparison: dict, metric: str = METRICS[0]) -> str:
    """One line: each method's ratio to the best physics denoiser on ``metric``."""
    c = comparison.get(metric)
    if not c:
        return ""
    return ", ".join(f"{m} x{fmt(v['ratio'])} [{fmt(v['low'])}, {fmt(v['high'])}] {v['verdict']}"
                     for m, v in c["methods"].items() if m != c["reference"])
