"""Score a checkpoint against the clean target, next to the interpolation used today.

Each --study names the gapped acquisition, its clean target and its gap mask (1 = measured), in any
format `hpc predict` reads; or --dataset takes the checkpoint's own test split of a converted dataset
(its `target`, stored `mask` and, if any, paired `input`). The UNet repairs the gaps exactly as
`hpc predict` does (measured pixels kept); the baselines fill the same gaps by linear interpolation
along the radial axis and by 2-D biharmonic inpainting. NMSE, PSNR and SSIM over the whole sinogram
and inside the gaps (definitions in hpc.metrics) are reported per study and overall in
DIR/report.md and DIR/metrics.json, with one PNG panel per study (input, UNet, baseline, target,
errors) in DIR/panels/. With --wandb offline|online the table and panels are also logged to W&B (job type "evaluate").

examples:
  hpc evaluate --checkpoint runs/demo/checkpoints/best.pt \\
      --study s4_gaps.s.hdr s4.s.hdr s4_mask.s.hdr --study s5_gaps.s.hdr s5.s.hdr s5_mask.s.hdr -o eval/
  hpc evaluate --checkpoint best.pt --study g.hs t.hs m.hs --slices 32 --baselines linear -o eval/
  hpc evaluate --checkpoint best.pt --dataset data/sim-ds --split test -o eval/
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch

from hpc.errors import InputError
from hpc.io.atomic import atomic_path, atomic_write_text
from hpc.io.shards import ShardArray
from hpc.io.sinogram import SinogramReader, SinogramSpec, read_header
from hpc.metrics import BASELINES, METRICS, MetricAccumulator, baseline_batch
from hpc.inference import Repairer, check_compatible, load_repairer, model_output, study_layout, windows
from hpc.predict import pick_device
from hpc.progress import Progress

UNET = "unet"
LABELS = {"nmse": "NMSE", "psnr": "PSNR dB", "ssim": "SSIM",
          "nmse_gap": "NMSE gaps", "psnr_gap": "PSNR gaps dB", "ssim_gap": "SSIM gaps"}


@dataclass
class Study:
    id: str
    layout: SinogramSpec  # slice layout of the gapped input: windows and compatibility checks
    open: Callable[[], tuple]  # -> (input, target, mask) readers: read(start, stop) -> (n, V, X), close()


def open_study(paths: list[str]) -> Study:
    """A gapped acquisition, its clean target and its gap mask, as files."""
    specs = [read_header(p) for p in paths]
    inp = specs[0]
    for other in specs[1:]:
        if (other.num_slices, other.slice_shape) != (inp.num_slices, inp.slice_shape):
            raise InputError(f"{other.source}: {other.num_slices}x{other.views}x{other.bins} does not match "
                             f"{inp.source} ({inp.num_slices}x{inp.views}x{inp.bins})")
    stem = Path(paths[1]).name.split(".")[0]
    return Study(stem, inp, lambda: tuple(SinogramReader(sp) for sp in specs))


def dataset_studies(rep: Repairer, root: str, split: str) -> list[Study]:
    """The checkpoint's own ``split`` of a converted dataset (studies with a stored gap mask); the
    input is the stored paired acquisition when there is one, else the target with its gaps zeroed."""
    from hpc.data.index import config_split
    from hpc.io.shards import Dataset

    ds, d = Dataset.open(root), rep.cfg.data
    ids = [s.id for s in ds.studies]
    chosen = ids if split == "all" else config_split(ids, d, split)
    if not chosen:
        raise InputError(f"{root}: the checkpoint's {split!r} split has no studies")
    out = []
    for info in (ds.study(i) for i in chosen):
        if not info.has_mask:
            raise InputError(f"{root}: study {info.id} has no stored gap mask (hpc convert --mask)")
        layout = study_layout(ds, info)
        names = ("input" if info.has_input else "target", "target", "mask")
        out.append(Study(info.id, layout, lambda info=info, names=names: tuple(ShardArray(info, n) for n in names)))
    return out


def pick_slices(n: int, limit: int) -> np.ndarray:
    """All slices, or ``limit`` evenly spaced ones (deterministic)."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


@dataclass
class Panel:
    """The slice shown for a study: (V, X) float arrays."""
    input: np.ndarray
    unet: np.ndarray
    baseline: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    gaps: int = -1


def read_windows(reader, ids: np.ndarray) -> np.ndarray:
    """(B, C) slice ids -> (B, C, V, X), one contiguous read per window."""
    return np.stack([reader.read(int(w.min()), int(w.max()) + 1)[w - w.min()] for w in ids])


def score_study(rep: Repairer, st: Study, centres: np.ndarray, baselines: list[str], batch: int,
                accs: dict[str, MetricAccumulator], bar: Progress | None = None) -> Panel:
    """Update one accumulator per method with the study's ``centres``; return the panel slice
    (the evaluated slice with the most gap pixels)."""
    panel = None
    readers = st.open()
    ri, rt, rm = readers
    try:
        for a in range(0, len(centres), batch):
            c = centres[a:a + batch]
            ids = windows(rep, st.layout, c)  # (B, 2k+1)
            raw, m = read_windows(ri, ids), read_windows(rm, ids) > 0  # (B, 2k+1, V, X)
            k = ids.shape[1] // 2
            x = torch.from_numpy(raw[:, k:k + 1].astype(np.float64) * m[:, k:k + 1])  # (B, 1, V, X)
            mk = torch.from_numpy(m[:, k:k + 1].astype(np.float64))
            tgt = torch.from_numpy(np.stack([rt.read(int(i), int(i) + 1)[0] for i in c]).astype(np.float64))[:, None]
            pred = torch.from_numpy(model_output(rep, raw, m))[:, None]
            outs = {UNET: torch.where(mk > 0.5, x, pred)}  # measured pixels kept, as hpc predict does
            outs.update({name: baseline_batch(name, x, mk) for name in baselines})
            if rep.pre.nonneg:  # counts >= 0: model_output floors the UNet's output, so floor the baselines too
                outs.update({name: outs[name].clamp_min(0) for name in baselines})
            for name, out in outs.items():
                accs[name].update(out, tgt, mk)
            gaps = (mk == 0).flatten(1).sum(1)  # (B,)
            j = int(gaps.argmax())
            if panel is None or int(gaps[j]) > panel.gaps:
                shown = outs[baselines[0]] if baselines else x
                panel = Panel(*(t[j, 0].numpy() for t in (x, outs[UNET], shown, tgt, mk)), int(gaps[j]))
            if bar is not None:
                bar.update(len(c))
    finally:
        for r in readers:
            r.close()
    return panel


def save_panel(p: Panel, baseline: str, title: str, path: Path) -> Path:
    """One row: input, UNet, baseline, target, |UNet - target|, |baseline - target| (same colour scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vmax = float(max(p.target.max(), p.unet.max(), 1e-12))
    err_u, err_b = np.abs(p.unet - p.target), np.abs(p.baseline - p.target)
    emax = float(max(err_u.max(), err_b.max(), 1e-12))
    images = [("input (gaps = 0)", p.input, vmax, "viridis"), ("UNet", p.unet, vmax, "viridis"),
              (baseline, p.baseline, vmax, "viridis"), ("target", p.target, vmax, "viridis"),
              ("|UNet - target|", err_u, emax, "magma"), (f"|{baseline} - target|", err_b, emax, "magma")]
    fig, axes = plt.subplots(1, len(images), figsize=(3.0 * len(images), 3.2))
    for ax, (name, img, top, cmap) in zip(axes, images, strict=True):
        ax.imshow(img, cmap=cmap, vmin=0, vmax=top, aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.82, wspace=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path


def _fmt(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.4g}"


def report_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: one row per (study, method); ``results[study][method][metric]``."""
    lines = ["| study | method | " + " | ".join(LABELS[m] for m in METRICS) + " |",
             "|---|---|" + "---:|" * len(METRICS)]
    for study, methods in results.items():
        for method, vals in methods.items():
            lines.append(f"| {study} | {method} | " + " | ".join(_fmt(vals[m]) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def evaluate(rep: Repairer, studies: list[Study], out_dir: Path, baselines: list[str], slices: int = 0,
             batch: int = 8, quiet: bool = False) -> dict:
    """Score every study, write report.md, metrics.json and panels/; return the results dict
    ``{"results": {study|"overall": {method: metrics}}, "panels": [...], "report": path}``."""
    methods = [UNET, *baselines]
    overall: dict[str, torch.Tensor] = {}  # method -> summed accumulator states
    results, panels = {}, []
    plan = [(st, pick_slices(st.layout.num_slices, slices)) for st in studies]
    with Progress(sum(len(c) for _, c in plan), "slices", "evaluate", enabled=not quiet) as bar:
        for st, centres in plan:
            check_compatible(rep, st.layout)
            accs = {m: MetricAccumulator() for m in methods}
            panel = score_study(rep, st, centres, baselines, batch, accs, bar)
            results[st.id] = {m: MetricAccumulator.compute(a.state()) for m, a in accs.items()}
            for m, a in accs.items():  # sums add across studies: "overall" pools every slice
                overall[m] = overall.get(m, 0) + a.state()
            name = baselines[0] if baselines else "input"
            title = f"{st.id}: slice with the most gap pixels ({panel.gaps})"
            panels.append(str(save_panel(panel, name, title, out_dir / "panels" / f"{st.id}.png")))
    results["overall"] = {m: MetricAccumulator.compute(s) for m, s in overall.items()}
    text = (f"# Evaluation of {rep.path}\n\nmodel {rep.cfg.model.name}; gap pixels repaired by each method, "
            f"measured pixels kept. Metrics: hpc.metrics (NMSE lower is better).\n\n" + report_table(results)
            + "\n" + "".join(f"![{Path(p).stem}](panels/{Path(p).name})\n" for p in panels))
    report = atomic_write_text(out_dir / "report.md", text)
    atomic_write_text(out_dir / "metrics.json", json.dumps({"checkpoint": str(rep.path), "results": results},
                                                           indent=2, allow_nan=True))
    return {"results": results, "panels": panels, "report": str(report)}


def log_wandb(summary: dict, mode: str, project: str, out_dir: Path) -> str:
    """Log the table and panels as one W&B run (job type "evaluate"); returns the run directory."""
    import wandb

    run = wandb.init(project=project, job_type="evaluate", mode=mode, dir=str(out_dir), reinit="finish_previous",
                     settings=wandb.Settings(console="off", silent=True))
    table = wandb.Table(columns=["study", "method", *METRICS])
    for study, methods in summary["results"].items():
        for method, vals in methods.items():
            table.add_data(study, method, *[vals[m] for m in METRICS])
    run.log({"metrics": table, "panels": [wandb.Image(p, caption=Path(p).stem) for p in summary["panels"]]})
    run.summary.update({f"{m}/{k}": v for m, vals in summary["results"]["overall"].items() for k, v in vals.items()})
    run.finish()
    return str(Path(run.dir).parent)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint .pt written by hpc train")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--study", nargs=3, action="append", metavar=("INPUT", "TARGET", "MASK"),
                     help="gapped acquisition, clean target, gap mask (1 = measured); repeat per study")
    src.add_argument("--dataset", metavar="DIR", help="converted dataset with stored gap masks (hpc convert --mask)")
    p.add_argument("--split", choices=("test", "val", "train", "all"), default="test",
                   help="with --dataset: which of the checkpoint's study splits (default test)")
    p.add_argument("-o", "--output", required=True, help="directory for report.md, metrics.json, panels/")
    p.add_argument("--baselines", default="linear,biharmonic",
                   help=f"comma-separated, from: {', '.join(BASELINES)} (the first is drawn in the panels)")
    p.add_argument("--slices", type=int, default=0, help="evenly spaced slices per study (0 = all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--wandb", choices=("disabled", "offline", "online"), default="disabled",
                   help="also log to W&B (WANDB_MODE overrides)")
    p.add_argument("--project", default="hpc", help="W&B project")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise InputError(f"--baselines: unknown {unknown}; valid: {', '.join(BASELINES)}")
    if args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    rep = load_repairer(args.checkpoint, pick_device(args.device))
    studies = dataset_studies(rep, args.dataset, args.split) if args.dataset else \
        [open_study(paths) for paths in args.study]
    out = Path(args.output)
    summary = evaluate(rep, studies, out, baselines, args.slices, args.batch, args.quiet)
    print(report_table(summary["results"]), end="")
    print(f"report: {summary['report']}\npanels: {', '.join(summary['panels'])}")
    mode = os.environ.get("WANDB_MODE", args.wandb)
    if mode != "disabled":
        print(f"W&B run: {log_wandb(summary, mode, args.project, out)}")
    return 0
