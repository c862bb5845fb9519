"""hpc evaluate's outputs: the markdown tables, metrics.json, PNG panels and the W&B run.

Metric keys are ``<metric>_<reference>``: sinogram ``nmse_gap``, ``psnr_gap``, ``ssim_gap``, ``nmse_all``,
``psnr_all``, ``ssim_all`` against ``meas`` (the measured target) and ``true`` (the noise-free expected
counts); image ``img_nmse``, ``img_ssim``, ``lesion_bias``, ``lesion_absbias`` against ``full`` (the
full-data reconstruction) and ``true`` (the noise-free reconstruction). docs/EVALUATION.md defines them.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hpc.config import LogConfig, to_dict
from hpc.evaluate.scoring import IMAGE_ITERS, IMAGE_METRICS, IMAGE_SUBSETS, SINO_METRICS
from hpc.io.atomic import atomic_path, atomic_write_text
from hpc.physics.recon import REPROJECT_SUBSETS

SINO_COLUMNS = (("nmse_gap_meas", "NMSE gaps (meas)"), ("nmse_gap_true", "NMSE gaps (true)"),
                ("nmse_all_meas", "NMSE all (meas)"), ("nmse_all_true", "NMSE all (true)"),
                ("psnr_gap_meas", "PSNR gaps dB (meas)"), ("psnr_gap_true", "PSNR gaps dB (true)"),
                ("ssim_gap_meas", "SSIM gaps (meas)"), ("ssim_gap_true", "SSIM gaps (true)"))
IMAGE_COLUMNS = (("img_nmse_full", "img NMSE (full)"), ("img_nmse_true", "img NMSE (true)"),
                 ("img_ssim_full", "img SSIM (full)"), ("img_ssim_true", "img SSIM (true)"),
                 ("lesion_bias_full", "lesion bias (full)"), ("lesion_bias_true", "lesion bias (true)"),
                 ("lesion_absbias_true", "lesion |bias| (true)"))


def fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def flatten(results: dict) -> tuple[dict, dict, dict]:
    """StudyResults -> plain dicts: sinogram metrics, image metrics, seconds per study."""
    sino = {s: {m: {f"{k}_{ref}": v for ref, sc in refs.items() for k, v in sc.compute().items()}
                for m, refs in r.sino.items()} for s, r in results.items()}
    image = {s: {m: {f"{k}_{ref}": v for ref, sc in refs.items() for k, v in sc.compute().items()}
                 for m, refs in r.image.items()} for s, r in results.items() if r.image}
    times = {s: dict(r.times) for s, r in results.items()}
    return sino, image, times


def scored(results: dict) -> dict:
    """{study | "overall": {"slices": scored, "image_planes": reconstructed}}: what --slices and
    --no-images left to do."""
    return {s: {"slices": r.slices, "image_planes": r.image_planes} for s, r in results.items()}


def energies(results: dict) -> dict:
    """{study | "overall": {"gap_true": sum of the reference's squares, ...}}: the denominators of the
    sinogram NMSEs, the same for every method, so that a metric's squared errors (nmse x energy) and
    the paired bootstrap of hpc.evaluate.protocol can be recomputed from metrics.json alone (e.g. a new
    network against baselines scored in an earlier run on the same studies: bench/science.py)."""
    out = {}
    for sid, r in results.items():
        refs = next(iter(r.sino.values()), {})
        out[sid] = {f"{region}_{ref}": score.sums[f"energy_{region}"]
                    for ref, score in refs.items() for region in ("gap", "all")}
    return out


def markdown_table(rows: dict, columns, times: dict | None = None) -> str:
    head = "| study | method | " + " | ".join(c for _, c in columns) + (" | s / study |" if times else " |")
    lines = [head, "|---|---|" + "---:|" * (len(columns) + (1 if times else 0))]
    for study, methods in rows.items():
        for method, vals in methods.items():
            cells = [fmt(vals.get(k)) for k, _ in columns]
            if times:
                cells.append(fmt(times.get(study, {}).get(method)))
            lines.append(f"| {study} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sino_table(sino: dict, times: dict | None = None) -> str:
    """Markdown: one row per (study, method), sinogram metrics and the method's seconds per study."""
    return markdown_table(sino, SINO_COLUMNS, times)


def image_table(image: dict) -> str:
    return markdown_table(image, IMAGE_COLUMNS)


def _edge(c: dict) -> str:
    """A warning when a tuned number is the largest of several candidates: the optimum may lie beyond."""
    try:
        values = [float(k) for k in c["scores"]]
    except ValueError:
        return ""
    at_edge = c["source"] == "tuned" and len(values) > 2 and float(c["value"]) == max(values)
    return " (the largest candidate: the optimum may lie beyond; give larger values with --param)" if at_edge else ""


def _scores(c: dict, criterion: str) -> str:
    """`` [criterion candidate: score; ...]`` of a choice's validation scores, "" when none."""
    cands = "; ".join(f"{k}: {fmt(v)}" for k, v in c["scores"].items())
    return f" [{criterion} {cands}]" if cands else ""


def _params(tuning: dict) -> list[str]:
    """One line per free parameter: value, where it came from, the candidates' validation scores."""
    lines = []
    for name, params in tuning["params"].items():
        for key, c in params.items():
            how = {"tuned": f"tuned on {len(tuning['studies'])} validation studies ({', '.join(tuning['studies'])})",
                   "given": "given, not tuned", "checkpoint": "the checkpoint's validation chose it",
                   "default": "the default (nothing chose it)"}[c["source"]]
            lines.append(f"{name}.{key} = {c['value']}: {how}" + _scores(c, tuning["criterion"]) + _edge(c))
    for key, c in tuning.get("network", {}).items():
        how = {"tuned": f"tuned on {len(tuning['studies'])} validation studies", "given": "given, not tuned",
               "trained": "as trained (data.fill_iters), not tuned"}[c["source"]]
        lines.append(f"unet.{key} = {c['value']}: {how}" + _scores(c, tuning["criterion"]))
    if "unet" in tuning["scores"]:
        lines.append(f"unet (as trained, not tuned): {tuning['criterion']} {fmt(tuning['scores']['unet'])} on the "
                     "validation studies")
    return lines


def protocol_text(protocol: dict) -> str:
    """The fair protocol's part of the console output and report: parameters, verdicts, the command."""
    lines = ["parameters:"] + [f"  {line}" for line in _params(protocol["tuning"])]
    lines.append("held-out verdicts (ratio to the best baseline, paired bootstrap 95 % interval over studies):")
    for metric, c in protocol["comparison"].items():
        lines.append(f"  {metric}: best {c['best']}, reference {c['reference']} ({c['studies']} studies)")
        for m, v in c["methods"].items():
            if m != c["reference"]:
                lines.append(f"    {m:<11} {fmt(v['nmse'])}  x{fmt(v['ratio'])} [{fmt(v['low'])}, {fmt(v['high'])}]"
                             f" {v['verdict']}")
    rec = protocol["recommend"]
    if rec["command"]:
        lines.append(f"use: {rec['command']}")
    return "\n".join(lines) + "\n"


def write_report(rep, results: dict, panels: list[str], out_dir: Path, opts, setup_s: float = 0.0,
                 protocol: dict | None = None) -> dict:

    sino, image, times = flatten(results)
    recon = {"iterations": IMAGE_ITERS, "subsets": IMAGE_SUBSETS, "planes": "direct (segment 0)"}
    text = (f"# Evaluation of {rep.path}\n\nmodel {rep.cfg.model.name}. Every method keeps the measured pixels; "
            f"virtual-crystal LORs are excluded. `meas`: against the measured target; `true`: against the "
            f"noise-free expected counts. Pooled over pixels (docs/EVALUATION.md). reproject: OSEM "
            f"{opts.reproject_iters} iterations x {REPROJECT_SUBSETS} subsets; s / study: wall time of each "
            f"method on the evaluated slices (the projector's system matrices were built once before, in "
            f"{setup_s:.2f} s).\n\n## Sinograms\n\n" + sino_table(sino, times))
    if image:
        text += (f"\n## Reconstructed images\n\nDirect planes, OSEM {IMAGE_ITERS} iterations x {IMAGE_SUBSETS} "
                 f"subsets for every version; `full`: against the full-data reconstruction, `true`: against the "
                 f"noise-free one; lesion bias: mean relative ROI-mean error over the known lesions. `gapped`: "
                 f"the damaged data reconstructed as it is (gaps as zero counts); `full`: the data without dead "
                 f"blocks (its distance from `true` is the noise floor).\n\n" + image_table(image))
    if protocol:
        text += "\n## Fair protocol (docs/EVALUATION.md)\n\n```\n" + protocol_text(protocol) + "```\n"
    text += "\n" + "".join(f"![{Path(p).stem}](panels/{Path(p).name})\n" for p in panels)
    summary = {"checkpoint": str(rep.path), "reproject_iters": opts.reproject_iters, "setup_s": setup_s,
               "reproject_subsets": REPROJECT_SUBSETS, "image_recon": recon, "results": sino, "images": image,
               "times": times, "scored": scored(results), "energy": energies(results),
               "options": {"slices": opts.slices, "images": opts.images, "baselines": list(opts.baselines)},
               **(protocol or {})}
    atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2, allow_nan=True))
    report = atomic_write_text(out_dir / "report.md", text)  # last: its presence means the evaluation is complete
    return {**summary, "panels": panels, "report": str(report)}


def save_panel(p: dict | None, study: str, path: Path) -> Path:
    """Columns: gapped input, target, noise-free, each method. Rows: sinograms; |error| against the
    noise-free counts (else the target); reconstructed images (when made). Optional keys of ``p``:
    ``labels`` for the first two columns (default gapped, target) and ``why`` the slice was chosen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if p is None:
        raise ValueError(f"{study}: nothing was scored")
    ref = p["expected"] if p["expected"] is not None else p["target"]
    first, second = p.get("labels", ("gapped", "target"))
    cols = [(first, p["input"]), (second, p["target"])]
    cols += [("noise-free", p["expected"])] if p["expected"] is not None else []
    cols += list(p["methods"].items())
    imgs = p["images"] or {}
    img_key = {first: "gapped", second: "ref:full", "noise-free": "ref:true"}
    rows = 3 if imgs else 2
    vmax = float(max(ref.max(), 1e-12))
    errs = {n: np.abs(a - ref) for n, a in cols if n not in (second, "noise-free")}
    emax = float(max(max((e.max() for e in errs.values()), default=0.0), 1e-12))
    imax = float(max(imgs.get("ref:full", np.zeros(1)).max(), 1e-12))
    fig, axes = plt.subplots(rows, len(cols), figsize=(2.1 * len(cols), 2.2 * rows + 0.5), squeeze=False)
    for j, (name, arr) in enumerate(cols):
        panels = [(arr, vmax, "viridis", name), (errs.get(name), emax, "magma", f"|{name} - ref|")]
        if imgs:
            panels.append((imgs.get(img_key.get(name, name)), imax, "gray", f"recon {name}"))
        for i, (a, top, cmap, title) in enumerate(panels):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if a is None:
                ax.axis("off")
                continue
            ax.imshow(a, cmap=cmap, vmin=0, vmax=top, aspect="auto" if i < 2 else "equal", interpolation="nearest",
                      origin="upper" if i < 2 else "lower")
            ax.set_title(title, fontsize=7)
    fig.suptitle(f"{study}, slice {p['slice']} ({p.get('why', 'most gap pixels')}); errors against the "
                 f"{'noise-free' if p['expected'] is not None else 'target'} counts", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05, hspace=0.25)
    with atomic_path(path) as tmp:  # creates panels/ when needed
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path


def with_panels(results: dict, out_dir: Path, finish: Callable[[list[str]], dict]) -> dict:
    """Save each scored study's panel (``results``: study -> StudyResult) into ``out_dir``/panels, then
    ``finish(panels)`` (pool, write the report). Outputs only once every study is scored, and none
    left behind if this fails: a bad study never leaves panels without a report."""
    panels = []
    try:
        for sid in list(results):
            panels.append(str(save_panel(results[sid].panel, sid, out_dir / "panels" / f"{sid}.png")))
        return finish(panels)
    except BaseException:
        for p in panels:
            Path(p).unlink(missing_ok=True)
        raise


def training_run(rep) -> dict:
    """What identifies the run that trained the checkpoint: its run dir (the checkpoint's
    ``checkpoints/`` parent when it lies in one, else train.run_dir), W&B id, project, group, name."""
    ckpt = Path(rep.path).resolve()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else Path(rep.cfg.train.run_dir)
    id_file = run_dir / "wandb_id"
    try:
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
    except OSError:
        run_id = ""
    log = rep.cfg.log
    return {"run_dir": str(run_dir), "wandb_id": run_id, "project": log.project, "entity": log.entity,
            "group": log.group, "name": log.name or run_dir.name}


def log_wandb(summary: dict, mode: str, out_dir: Path, rep, project: str = "") -> str:
    """Log the tables and panels as one W&B run of job type "evaluate", linked to the training
    run: the same project (unless ``project``) and group (the training run's group, else its W&B
    id, so a run and its evaluations sit together), named after it, with the evaluation's options,
    the checkpoint and the training run's id and config as its config. Returns the run directory."""
    import wandb

    # a physics-only denoising evaluation (no checkpoint) is a run of its own in the default project
    train = training_run(rep) if rep is not None else {"wandb_id": "", "run_dir": "", "project": LogConfig().project,
                                                       "entity": "", "group": "", "name": out_dir.name}
    task = summary.get("task", "repair")
    config = {"task": task, "checkpoint": summary["checkpoint"], "train_run_id": train["wandb_id"],
              "train_run_dir": train["run_dir"], "reproject_iters": summary.get("reproject_iters"),
              "doses": summary.get("doses"), **summary.get("options", {}),
              "tuning": summary.get("tuning", {}).get("params"), "train": to_dict(rep.cfg) if rep else None}
    suffix = "-eval" if task == "repair" else f"-eval-{task}"
    run = wandb.init(project=project or train["project"], entity=train["entity"] or None, job_type="evaluate",
                     group=train["group"] or train["wandb_id"] or None, name=f"{train['name']}{suffix}", mode=mode,
                     dir=str(out_dir), config=config, reinit="finish_previous",
                     settings=wandb.Settings(console="off", silent=True))
    keys = [f"{m}_{r}" for m in SINO_METRICS for r in ("meas", "true")]
    table = wandb.Table(columns=["study", "method", *keys, "seconds"])
    for study, methods in summary["results"].items():
        for method, vals in methods.items():
            table.add_data(study, method, *[vals.get(k) for k in keys], summary["times"].get(study, {}).get(method))
    logged = {"metrics": table, "panels": [wandb.Image(p, caption=Path(p).stem) for p in summary["panels"]]}
    if summary["images"]:
        ikeys = [f"{m}_{r}" for m in IMAGE_METRICS for r in ("full", "true")
                 if any(f"{m}_{r}" in v for ms in summary["images"].values() for v in ms.values())]
        itable = wandb.Table(columns=["study", "method", *ikeys])
        for study, methods in summary["images"].items():
            for method, vals in methods.items():
                itable.add_data(study, method, *[vals.get(k) for k in ikeys])
        logged["images"] = itable
    run.log(logged)
    run.summary.update({f"{m}/{k}": v for m, vals in summary["results"]["overall"].items() for k, v in vals.items()})
    run.finish()
    return str(Path(run.dir).parent)
