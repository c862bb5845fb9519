"""bench/gpu_check.sh's bookkeeping: the machine record and the one JSON file with every figure.

    python bench/gpu_summary.py machine LOGS/machine.json        # imports torch (and DALI if there)
    python bench/gpu_summary.py summary --out OUT --logs LOGS --run RUN_DIR [--print] [--budget S]

``summary`` runs after every stage (standard library only: it takes no time), so OUT/gpu_check.json
always holds what has finished; --print adds the key figures as a short table on stdout.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path


def machine(path: Path) -> None:
    import torch

    info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpu": "none", "host": platform.node(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"gpu": p.name, "gpus": torch.cuda.device_count(), "gpu_mem_gib": round(p.total_memory / 2**30, 1),
                 "sms": p.multi_processor_count, "capability": f"{p.major}.{p.minor}"}
    found = (("dali", "nvidia-dali-cuda130", "nvidia.dali"), ("hdf5plugin", "hdf5plugin", "hdf5plugin"),
             ("numcodecs", "numcodecs", "numcodecs"))
    for key, dist, module in found:
        try:
            importlib.import_module(module)
            info[key] = importlib.metadata.version(dist)
        except Exception:  # absent (DALI is optional) or broken: the record says so
            info[key] = None
    path.write_text(json.dumps(info, indent=1))


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _status(rec: dict, ok_codes: tuple[int, ...] = (0,)) -> str:
    if rec.get("status") in ("skipped", "stopped"):  # no time left; interrupted by the node's limit
        return rec["status"]
    rc = rec.get("rc")
    return "ok" if rc in ok_codes else "timeout" if rc in (124, 137) else "failed"


def junit(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{c.get('classname', '')}::{c.get('name')}" for c in suite.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "not_passed": bad}


def train_record(run: Path) -> dict:
    """Samples seen, the median samples/s of the logged intervals after the first (which holds the
    start-up and compilation), the newest checkpoint."""
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    train = [r for r in map(json.loads, lines) if r.get("kind") == "train"]
    rates = sorted(r["samples_per_s"] for r in train[1:]) or [r["samples_per_s"] for r in train]
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*.pt")) if (run / "checkpoints").is_dir() else []
    return {"samples": max((r["step"] for r in train), default=0), "logged": len(train),
            "samples_per_s": rates[len(rates) // 2] if rates else None,
            "gpu_mem_gb": train[-1].get("gpu_mem_gb") if train else None, "checkpoint": ckpts[-1] if ckpts else None}


def figures(stages: dict) -> dict:
    """The handful of numbers docs/BENCHMARKS.md quotes, flat."""
    f = {}
    rows = {r["mode"]: r for r in stages.get("step", {}).get("rows", []) if "error" not in r}
    for mode, r in rows.items():
        f[f"step_{mode}_samples_per_s"] = r["samples_per_s"]
        f[f"mfu_{mode}_datasheet"] = r.get("mfu")
        f[f"mfu_{mode}_measured_peak"] = r.get("mfu_measured")
        f[f"matmul_{mode}_tflops"] = r.get("peak_measured_tflops")
    if "fp32" in rows and "bf16" in rows:
        f["bf16_speedup"] = rows["bf16"]["samples_per_s"] / rows["fp32"]["samples_per_s"]
    loader = [r for r in stages.get("loader", {}).get("rows", []) if "error" not in r]
    for backend in sorted({r["backend"] for r in loader}):
        best = max((r for r in loader if r["backend"] == backend), key=lambda r: r["slices_per_s"])
        f[f"loader_{backend}_slices_per_s"] = best["slices_per_s"]
        f[f"loader_{backend}_workers"] = best["workers"]
        f[f"loader_{backend}_ratio"] = best.get("ratio")
    for k, v in stages.get("listmode", {}).get("x_cat", {}).items():
        if not k.endswith(" cat"):  # "warm cuda:1" -> listmode_warm_cuda_x_cat
            f[f"listmode_{k.replace(' ', '_').split(':')[0]}_x_cat"] = v
    if stages.get("train", {}).get("samples_per_s") is not None:
        f["train_samples_per_s"] = stages["train"]["samples_per_s"]
    return {k: v for k, v in f.items() if v is not None}


def summary(args: argparse.Namespace) -> dict:
    logs, out = args.logs, args.out
    stages: dict[str, dict] = {}
    if (logs / "stages.jsonl").is_file():
        for line in (logs / "stages.jsonl").read_text().splitlines():
            rec = json.loads(line)
            stages[rec.pop("stage")] = rec
    for name, rec in stages.items():
        rec["status"] = _status(rec, (0, 75) if name.endswith("train") else (0,))
    for name in ("tests", "dali-tests"):
        if name in stages and (found := junit(logs / f"{name}.xml")) is not None:
            stages[name]["junit"] = found
    if "step" in stages and (found := _json(out / "step.json")):
        stages["step"]["rows"] = found["rows"]
    if "loader" in stages and (found := _json(out / "loader.json")) is not None:
        stages["loader"]["rows"] = found
    if "listmode" in stages and (found := _json(out / "listmode.json")) is not None:
        stages["listmode"]["x_cat"] = {k: v["x_cat"] for k, v in (found.get("summary") or {}).items()}
    if "train" in stages:
        stages["train"] |= train_record(args.run)
        if stages["train"]["status"] == "ok" and stages["train"]["checkpoint"] is None:
            stages["train"]["status"] = "failed"  # stopped without the checkpoint the signal must leave
    result = {"check": "bench/gpu_check.sh", "mode": args.mode, "budget_s": args.budget,
              "elapsed_s": round(time.time() - args.started, 1) if args.started else None,
              "complete": args.final, "machine": _json(logs / "machine.json"), "stages": stages,
              "figures": figures(stages)}
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "gpu_check.json")
    return result


def _detail(name: str, rec: dict) -> str:
    if "junit" in rec:
        j = rec["junit"]
        bad = f"; not passed: {', '.join(j['not_passed'])[:200]}" if j["not_passed"] else ""
        return f"{j['passed']} passed, {j['failures'] + j['errors']} failed, {j['skipped']} skipped{bad}"
    if "rows" in rec and name == "step":
        return "; ".join(f"{r['preset']} {r['mode']} failed: {r['error'][:60]}" if "error" in r else
                         f"{r['preset']} {r['mode']} b{r['batch']} {r['samples_per_s']:,.1f}/s"
                         + (f", MFU {100 * r['mfu']:.1f}% of sheet" if r.get("mfu") else "")
                         + (f", {100 * r['mfu_measured']:.1f}% of measured {r['peak_measured_tflops']:.3g}"
                            if r.get("mfu_measured") else "") for r in rec["rows"])
    if "rows" in rec:
        return "; ".join(f"{r['backend']} w{r['workers']} failed: {r['error'][:60]}" if "error" in r else
                         f"{r['backend']} w{r['workers']} {r['slices_per_s']:,.0f}/s"
                         + (f" (ratio {r['ratio']:.2f})" if r.get("ratio") else "") for r in rec["rows"])
    if "x_cat" in rec:
        return ", ".join(f"{k} {v:.3g}x cat" for k, v in rec["x_cat"].items() if not k.endswith(" cat"))
    if "samples" in rec:
        rate = f"{rec['samples_per_s']:,.1f} samples/s" if rec["samples_per_s"] else "no rate logged"
        return f"{rec['samples']} samples, {rate}, checkpoint {rec['checkpoint']}"
    return rec.get("reason", "")


def show(result: dict) -> None:
    m = result["machine"] or {}
    print(f"== gpu_check ({result['mode']}) on {m.get('gpu', '?')}, torch {m.get('torch', '?')}, python "
          f"{m.get('python', '?')}, DALI {m.get('dali') or 'absent'}: {result['elapsed_s']} s of {result['budget_s']}")
    print(f"{'stage':<11}{'status':<9}{'rc':>4}{'s':>7}{'limit':>7}  figures")
    for name, rec in result["stages"].items():
        rc = "-" if rec.get("rc") is None else rec["rc"]
        print(f"{name:<11}{rec['status']:<9}{rc:>4}{rec.get('seconds', 0):>7.1f}{rec.get('limit_s', 0):>7}  "
              f"{_detail(name, rec)}")
    for k, v in result["figures"].items():
        print(f"  {k} = {v:.4g}" if isinstance(v, float) else f"  {k} = {v}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    sub.add_parser("machine").add_argument("path", type=Path)
    s = sub.add_parser("summary")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--logs", type=Path, required=True)
    s.add_argument("--run", type=Path, required=True, help="the train stage's run dir")
    s.add_argument("--mode", default="gpu")
    s.add_argument("--budget", type=int, default=0)
    s.add_argument("--started", type=float, default=0.0, help="the check's start (epoch seconds)")
    s.add_argument("--final", action="store_true", help="the last call: every stage has run")
    s.add_argument("--print", action="store_true", help="key figures on stdout")
    args = ap.parse_args(argv)
    if args.verb == "machine":
        machine(args.path)
        return 0
    result = summary(args)
    if args.print:
        show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
