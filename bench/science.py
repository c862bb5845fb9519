"""What more training buys: the network's held-out in-gap NMSE against the samples it has seen,
next to the tuned physics baselines, all under the fair protocol (issue 23's scaling curve).

One simulated dataset (the demo's, or `hpc demo --preset realistic`'s), then for each budget a fresh
training of `samples` samples (cosine schedule over the run, one validation at its end), scored by
`hpc evaluate` with every free parameter tuned on the 3 validation studies. Writes a JSON of every
point (the UNet's NMSE, its ratio to the best baseline with the paired bootstrap 95 % interval, the
baselines' NMSE) and a PNG: NMSE against samples (log), the baselines as horizontal lines, the
network's interval as error bars.

    python bench/science.py --samples 600,1200,2400,4800,9600 -o /tmp/science --json docs/results/science-demo.json \
        --png docs/images/science-demo.png

The realistic preset's baselines cost an hour per evaluation on a CPU core (reproject3d: ~6 min per
study); they do not change with the network, so a curve can reuse the data and the baselines of an
earlier `hpc demo --preset realistic` run of the same seed: ``--data RUN --baselines-from
RUN/eval/metrics.json``. Each point then scores the network (and linear, whose NMSE must equal the
earlier run's to the digit: the same studies) and compares it with the earlier per-study NMSEs, the
paired bootstrap over squared errors = NMSE x the studies' reference energies.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from hpc.demo import PLANS, evaluate_held_out, simulate_and_convert, study_split, train_model
from hpc.distributed.device import resolve_device
from hpc.evaluate.evaluate import Options, evaluate
from hpc.evaluate.protocol import compare
from hpc.evaluate.studies import simulation_studies
from hpc.repair.inference import load_repairer, strip_wrappers
from hpc.train import checkpoint as ck

METRIC = "nmse_gap_true"


def point(out: Path, plan, seed: int, data: tuple, samples: int, prior: dict | None, raw: bool = False) -> dict:
    """Train for ``samples`` and score it with the fair protocol: one point of the curve. ``raw``: a
    run with train.ema also scores its raw weights (the same training) against the same baselines."""
    dataset, held_out, train_ids, val_ids = data
    budget = (f"train.samples={samples}", f"train.val_every={samples}", f"optim.restart_samples={samples}",
              f"log.every={max(samples // 4, 1)}", "log.wandb=disabled")
    plan = dataclasses.replace(plan, overrides=plan.overrides + budget)
    t0 = time.perf_counter()
    result = train_model(out, plan, seed, dataset, train_ids, val_ids)
    seconds = time.perf_counter() - t0
    ckpt = result["best_checkpoint"] if Path(result["best_checkpoint"]).is_file() else result["checkpoint"]
    sim = dataset.parent / "sim"
    if prior is None:
        _, summary, _ = evaluate_held_out(out, plan, sim, held_out, ckpt, val_ids)
        comp = summary["comparison"][METRIC]
    else:
        rep = load_repairer(ckpt, resolve_device("auto"))
        opts = Options(["linear"], plan.eval_slices, images=False, quiet=True,
                       tune_on=simulation_studies(sim, val_ids))
        summary = evaluate(rep, simulation_studies(sim, [s["id"] for s in held_out]), out / "eval", opts)
        comp = against(summary, prior)
    result = {"samples": samples, "train_seconds": round(seconds, 1),
              "nmse": {m: row["nmse"] for m, row in comp["methods"].items()}, "reference": comp["reference"],
              "unet_ratio": comp["methods"]["unet"], "tuning": summary["tuning"]["params"]}
    if raw:
        base = prior or json.loads((out / "eval" / "metrics.json").read_text())
        result["raw_ratio"] = raw_weights(out, plan, sim, held_out, val_ids, ckpt, base)
    return result


def raw_weights(out: Path, plan, sim: Path, held_out: list[dict], val_ids: list[str], ckpt: str, prior: dict) -> dict:
    """The ratio of a train.ema run's raw weights (what it trained, not the average it validated) to
    the baselines of ``prior``: the average's A/B on one training, paired over the same studies."""
    state = ck.load(ckpt)
    if not state.get("ema"):
        raise SystemExit(f"science: {ckpt} has no moving average (--also-raw needs --set train.ema=D)")
    rep = load_repairer(ckpt, resolve_device("auto"))
    rep.model.load_state_dict(strip_wrappers(state["model"]))
    opts = Options(["linear"], plan.eval_slices, images=False, quiet=True, tune_on=simulation_studies(sim, val_ids))
    summary = evaluate(rep, simulation_studies(sim, [s["id"] for s in held_out]), out / "eval-raw", opts)
    return against(summary, prior)["methods"]["unet"]


def against(summary: dict, prior: dict) -> dict:
    """The network of ``summary`` compared (hpc.evaluate.protocol.compare) with the baselines of an
    earlier evaluation ``prior`` on the same held-out studies, checked by linear's NMSE."""
    per_study = {}
    for sid, energy in ((s, e[METRIC.replace("nmse_", "")]) for s, e in summary["energy"].items() if s != "overall"):
        now, then = summary["results"][sid], prior["results"][sid]
        if abs(now["linear"][METRIC] - then["linear"][METRIC]) > 1e-9 * then["linear"][METRIC]:
            raise SystemExit(f"science: {sid} is not the study the baselines were scored on "
                             f"(linear {now['linear'][METRIC]} vs {then['linear'][METRIC]})")
        per_study[sid] = {m: (v[METRIC] * energy, energy) for m, v in then.items() if m != "unet"}
        per_study[sid]["unet"] = (now["unet"][METRIC] * energy, energy)
    if set(per_study) != set(prior["results"]) - {"overall"}:
        raise SystemExit("science: the held-out studies differ from those of --baselines-from")
    return compare(per_study, {"unet"})


def plot(runs: list[dict], png: Path, title: str) -> None:
    """Each run's network as its ratio to the best tuned baseline (95 % interval as error bars)
    against samples; the other baselines as horizontal lines at their ratio; the issue's 0.90 goal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for run in runs:
        pts = run["points"]
        x = [p["samples"] for p in pts]
        r = [p["unet_ratio"] for p in pts]
        err = [[q["ratio"] - q["low"] for q in r], [q["high"] - q["ratio"] for q in r]]
        label = "UNet " + (", ".join(run.get("set") or []) or "(demo config)")
        ax.errorbar(x, [q["ratio"] for q in r], yerr=err, marker="o", capsize=3, label=label)
    last = runs[0]["points"][-1]
    ref = last["reference"]
    ax.axhline(1.0, color="k", linestyle="--", label=f"{ref} (tuned): the reference")
    for name in ("reproject3d", "reproject"):
        if name != ref and name in last["nmse"]:
            ax.axhline(last["nmse"][name] / last["nmse"][ref], color="gray", linestyle=":", label=f"{name} (tuned)")
    ax.axhline(0.90, color="tab:green", linestyle="-.", label="goal: 0.90")
    if max(q["unet_ratio"]["high"] for run in runs for q in run["points"]) > 3:
        ax.set_yscale("log")  # networks 10x from the physics line next to one near it
        if "linear" in last["nmse"]:  # the radial-interpolation fill those networks start from
            ax.axhline(last["nmse"]["linear"] / last["nmse"][ref], color="tab:red", linestyle=":",
                       label="linear (the radial fill)")
    ax.set_xscale("log")
    ax.set_xlabel("training samples seen")
    ax.set_ylabel(f"held-out in-gap NMSE (true) / {ref}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", default="600,1200,2400,4800,9600", help="training budgets, comma-separated")
    ap.add_argument("--preset", choices=sorted(PLANS), default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every training (e.g. model.base=16), repeatable")
    ap.add_argument("-o", "--output", type=Path, help="new directory for the runs")
    ap.add_argument("--data", type=Path, help="reuse the sim/ and dataset/ of this earlier `hpc demo` run "
                                              "(same --preset and --seed) instead of simulating")
    ap.add_argument("--baselines-from", type=Path, metavar="METRICS_JSON",
                    help="the baselines' held-out scores from an evaluation of --data's run (its eval/metrics.json): "
                         "the points score only the network (and linear, as a check)")
    ap.add_argument("--also-raw", action="store_true",
                    help="with --set train.ema=D: also score each training's raw weights (raw_ratio), "
                         "an A/B of the average on the same training")
    ap.add_argument("--json", type=Path, help="where the points go")
    ap.add_argument("--png", type=Path, required=True)
    ap.add_argument("--plot-only", nargs="+", type=Path, metavar="JSON",
                    help="no training: draw the curves of these JSON files (of earlier runs) into --png")
    a = ap.parse_args()
    if a.plot_only:
        runs = [json.loads(f.read_text()) for f in a.plot_only]
        plot(runs, a.png, f"{runs[0]['preset']} preset, seed {runs[0]['seed']}: held-out studies, parameters "
                          "tuned on validation")
        return 0
    if a.output is None or a.json is None:
        ap.error("-o and --json are needed unless --plot-only")
    if a.output.exists() and any(a.output.iterdir()):
        print(f"science: {a.output} exists and is not empty", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # as the demo: one thread is faster on shared cores and reproducible
    plan = dataclasses.replace(PLANS[a.preset], overrides=PLANS[a.preset].overrides + tuple(a.set))
    if a.baselines_from and not a.data:
        ap.error("--baselines-from needs --data (the run whose studies it scored)")
    data = study_split(a.data, plan) if a.data else simulate_and_convert(a.output, plan, a.seed)
    prior = json.loads(a.baselines_from.read_text()) if a.baselines_from else None
    points = []
    for n in (int(v) for v in a.samples.split(",")):
        points.append(point(a.output / f"n{n}", plan, a.seed, data, n, prior, a.also_raw))
        print(json.dumps(points[-1]), flush=True)
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"preset": a.preset, "seed": a.seed, "set": a.set, "metric": METRIC,
                                      "baselines_from": str(a.baselines_from or ""), "points": points},
                                     indent=1) + "\n")
    extra = f" ({', '.join(a.set)})" if a.set else ""
    plot([{"points": points, "set": a.set}], a.png,
         f"{a.preset} preset{extra}, seed {a.seed}: held-out, parameters tuned on validation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
