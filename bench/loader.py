"""Loader throughput (slices/s) per backend and worker count, I/O amplification, and, on a GPU,
the loader's rate next to the training step's consumption rate for the same batch.

Writes a synthetic dataset (uint16 Poisson counts, shard format v1 via hpc.io.h5write) unless
--data names a converted one. Each configuration runs --epochs full epochs of the train split
(the first is a warm-up: worker start, page cache) with the full pipeline: reads, context windows,
dead-block corruption when the dataset records a scanner (--scanner), augmentation, normalization,
padding, copy to --device. The baseline is one sequential h5py pass over the same shards; the
floor is the rate of a loader that only decodes each slice once and writes its float32 context
stacks (``vs_floor``: how close the loader gets to what any loader with this output must spend).
"ratio" = loader slices/s / training-step samples/s (>= 1: the GPU never waits for data). The step
to compare with is the one training runs: give --step-json (bench/step.py's output) and the row of
--model in --step-mode (default bf16: autocast + channels_last + compile) is the divisor; without
it an eager fp32 step of the loader's batch is timed here (a slower step: a flattering ratio).
--json is rewritten after every row; a row that fails records its error and the next one runs.

    python bench/loader.py                                            # CPU, synthetic 64x128
    python bench/loader.py --device cuda --size 168x400 --workers 0,4,8 --model badblock --batch 32
    python bench/loader.py --data /raid/me/dataset --backends torch,dali --json loader.json
    python bench/loader.py --device cuda --size 168x400 --batch 32 --model badblock --step-json step.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from hpc.config import Config  # noqa: E402
from hpc.data import build_loader  # noqa: E402
from hpc.distributed.device import DEVICES, resolve_device  # noqa: E402
from hpc.io.atomic import atomic_write_text  # noqa: E402
from hpc.io.h5write import ShardWriter  # noqa: E402
from hpc.io.shards import Dataset  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="converted dataset (default: a synthetic one in a temp dir)")
    ap.add_argument("--size", default="64x128", help="synthetic slice VIEWSxBINS")
    ap.add_argument("--studies", type=int, default=4, help="synthetic studies")
    ap.add_argument("--slices", type=int, default=256, help="synthetic slices per study (one stack)")
    ap.add_argument("--compression", default="lzf", help="synthetic shards: none|lzf|gzip|blosc")
    ap.add_argument("--scanner", default="", help="corrupt.scanner for dead blocks ('' = none)")
    ap.add_argument("--backends", default="torch,dali")
    ap.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=2)
    ap.add_argument("--run-length", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4, help="epochs per configuration; the first is untimed")
    ap.add_argument("--device", choices=DEVICES, default="auto", help="auto: the GPU when there is one")
    ap.add_argument("--model", default="", help="also time a training step of this preset (badblock|unet|light)")
    ap.add_argument("--base", type=int, default=64, help="model width for --model")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps for --model")
    ap.add_argument("--step-json", type=Path, help="bench/step.py --json output: the step rate to divide by")
    ap.add_argument("--step-mode", default="bf16", help="the --step-json row's mode (fp32|tf32|bf16)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here (after every row)")
    args = ap.parse_args(argv)
    if args.step_json and not args.model:
        ap.error("--step-json: also give --model (the preset whose step rate divides)")
    return args


def step_from_json(path: Path, preset: str, mode: str, batch: int) -> dict:
    """The bench/step.py row of ``preset`` in ``mode``: {step_samples_per_s, step_source}. A missing
    row (the step run was stopped or failed there) leaves the rate None: no ratio rather than one
    against another step."""
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"bench/loader.py: --step-json {path}: {exc}") from None
    found = [r for r in rows if r.get("preset") == preset and r.get("mode") == mode and "samples_per_s" in r]
    if not found:
        print(f"bench/loader.py: --step-json {path}: no finished {preset} {mode} row: no ratio", file=sys.stderr)
        return {"step_samples_per_s": None, "step_source": f"no finished {preset} {mode} row in {path.name}"}
    r = found[0]
    note = "" if r["batch"] == batch else f" (loader batch {batch})"
    return {"step_samples_per_s": r["samples_per_s"],
            "step_source": f"bench/step.py {preset} {mode} batch {r['batch']}{note}"}


def synthetic(root: Path, studies: int, slices: int, views: int, bins: int, compression: str) -> Path:
    rng = np.random.default_rng(0)
    entries = []
    for s in range(studies):
        target = rng.poisson(30, size=(slices, views, bins)).astype(np.uint16)
        meta = {"tof": np.zeros(slices, np.int32), "segment": np.zeros(slices, np.int32),
                "axial": np.arange(slices, dtype=np.int32)}
        rel = f"shards/b{s}-0000.h5"
        arrays = {"target": (target.shape, target.dtype), **{k: (v.shape, v.dtype) for k, v in meta.items()}}
        (root / "shards").mkdir(parents=True, exist_ok=True)
        with ShardWriter(root / rel, arrays, compression, {"format": "hpc-sinogram", "format_version": 1}) as w:
            w.write(0, target=target, **meta)
            info = w.commit()
        entries.append({"id": f"b{s}", "source": "synthetic", "sha256": "", "num_slices": slices,
                        "slice_shape": [views, bins], "dtype": "uint16", "tof_bins": 1, "segments": [0],
                        "axial_counts": [slices], "has_input": False, "has_mask": False, "scanner": "",
                        "max": float(target.max()), "shards": [{"path": rel, "first_slice": 0,
                        "num_slices": slices, "sha256": info["sha256"], "bytes": info["bytes"]}]})
    manifest = {"format": "hpc-sinogram", "format_version": 1, "slice_shape": [views, bins], "dtype": "uint16",
                "scanner": "", "scale": max(e["max"] for e in entries), "num_slices": studies * slices,
                "studies": entries, "shards": [e["shards"][0]["path"] for e in entries]}
    atomic_write_text(root / "manifest.json", json.dumps(manifest))
    return root


def baseline(root: Path) -> float:
    """Slices/s of one sequential h5py pass (whole datasets), the I/O floor of the format."""
    ds = Dataset.open(root)
    t0, n = time.perf_counter(), 0
    for study in ds.studies:
        for shard in study.shards:
            with h5py.File(shard.path, "r") as f:
                n += len(f["target"][()])
    return n / (time.perf_counter() - t0)


def output_rate(root: Path, context: int, batch: int) -> float:
    """Slices/s of only writing the loader's output from memory: each sample's 2k+1 context slices
    cast to float32 into a (B, C, V, X) batch with plain numpy copies (no decode, augmentation or
    normalization): the memory traffic every loader with this output pays on top of the decode."""
    shard = Dataset.open(root).studies[0].shards[0]
    with h5py.File(shard.path, "r") as f:
        data = f["target"][()]  # (N, V, X), read before timing
    centres = np.random.default_rng(0).permutation(np.arange(context, len(data) - context))
    out = np.empty((batch, 2 * context + 1, *data.shape[1:]), np.float32)
    t0, n = time.perf_counter(), 0
    for lo in range(0, len(centres) - batch + 1, batch):
        for i, k in enumerate(centres[lo:lo + batch]):
            out[i] = data[k - context:k + context + 1]
        n += batch
    return n / (time.perf_counter() - t0)


def config(args: argparse.Namespace, root: Path, backend: str, workers: int) -> Config:
    cfg = Config()
    d = cfg.data
    d.path, d.backend, d.workers, d.batch_size = str(root), backend, workers, args.batch
    d.context, d.run_length, d.split, d.device = args.context, args.run_length, [1.0, 0.0, 0.0], args.device
    cfg.corrupt.scanner, cfg.corrupt.dead_blocks = args.scanner, 2 if args.scanner else 0
    cfg.model.name = args.model or "badblock"
    cfg.model.base = args.base
    return cfg


def time_loader(cfg: Config, epochs: int, root: Path) -> dict:
    """The loader's best epoch after the warm-up, each timed epoch followed by a sequential pass
    (interleaved: on a shared machine both see the same load); ``vs_sequential`` uses the best of
    each. ``floor``: the rate of a loader that only decodes each slice once (the sequential pass)
    and writes its output (``output_rate``), nothing else; ``vs_floor`` how close the loader is."""
    loader = build_loader(cfg, "train", 0, 1, resolve_device(cfg.data.device))
    rate, base, write = 0.0, 0.0, 0.0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch.index)
        if batch.input.is_cuda:
            torch.cuda.synchronize()
        if epoch > 0 or epochs == 1:
            rate = max(rate, n / (time.perf_counter() - t0))
            base = max(base, baseline(root))
            write = max(write, output_rate(root, cfg.data.context, cfg.data.batch_size))
    floor = 1.0 / (1.0 / base + 1.0 / write)
    return {"slices_per_s": rate, "sequential_slices_per_s": base, "vs_sequential": rate / base,
            "floor_slices_per_s": floor, "vs_floor": rate / floor,
            "amplification": loader.stats()["amplification"], "shape": list(batch.input.shape)}


def time_step(cfg: Config, shape: list[int], steps: int) -> float:
    """Training-step samples/s (forward, L1, backward, AdamW) on a batch of the loader's shape."""
    from hpc.train.models import build_model

    device = resolve_device(cfg.data.device)
    model = build_model(cfg.model, shape[1]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(shape, device=device)
    m = torch.ones(shape[0], 1, *shape[2:], device=device)
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = (model(x, m) - x[:, shape[1] // 2:shape[1] // 2 + 1]).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * shape[0] / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    views, bins = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or synthetic(Path(tmp) / "synthetic", args.studies, args.slices, views, bins,
                                      args.compression)
        base = baseline(root)
        print(f"dataset {root}: sequential h5py pass {base:,.0f} slices/s; device {resolve_device(args.device)}; "
              f"load average {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")
        step = step_from_json(args.step_json, args.model, args.step_mode, args.batch) if args.step_json else None
        rows: list[dict] = []
        for backend in args.backends.split(","):
            for workers in args.workers.split(","):
                rows.append(measure(args, root, backend, int(workers), step))
                if args.json:
                    write_json(args.json, rows)
    print_table(rows, bool(args.model))
    return 1 if any("error" in r for r in rows) else 0


def write_json(path: Path, rows: list[dict]) -> None:
    """Replace ``path`` whole (a reader never sees half a file, even when a time limit hits)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, path)


def measure(args: argparse.Namespace, root: Path, backend: str, workers: int, step: dict | None) -> dict:
    """One row; an exception (DALI missing, a worker dying, CUDA out of memory) becomes its error."""
    try:
        cfg = config(args, root, backend, workers)
        row = {"backend": backend, "workers": workers, **time_loader(cfg, args.epochs, root)}
        if args.model:
            row |= step or {"step_samples_per_s": time_step(cfg, row["shape"], args.steps),
                            "step_source": "eager fp32 step timed here"}
            rate = row["step_samples_per_s"]
            row["ratio"] = row["slices_per_s"] / rate if rate else None
    except Exception as exc:  # (any failure is this row's result, the next row runs)
        first = (str(exc).strip().splitlines() or [""])[0]
        row = {"backend": backend, "workers": workers, "error": f"{type(exc).__name__}: {first}"}
    done = row["error"] if "error" in row else f"{row['slices_per_s']:,.0f} slices/s"
    print(f"{backend} workers {workers}: {done}", file=sys.stderr, flush=True)
    return row


def print_table(rows: list[dict], model: bool) -> None:
    cols = ["backend", "workers", "slices_per_s", "vs_sequential", "floor_slices_per_s", "vs_floor", "amplification",
            "shape"] + (["step_samples_per_s", "ratio"] if model else [])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        if "error" in r:
            print(f"| {r['backend']} | {r['workers']} | failed: {r['error'][:100]} |")
            continue
        print("| " + " | ".join(f"{r[c]:,.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    sys.exit(main())
