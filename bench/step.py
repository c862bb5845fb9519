"""Training-step throughput (samples/s) and model FLOP utilisation per model preset and precision.

One step = forward (inpainting wrapper included) + L1 loss + backward + AdamW update, on random
data of one slice size. FLOPs of forward + backward are counted once per preset with
torch.utils.flop_counter.FlopCounterMode on the meta device (convolutions scale with the batch);
MFU = counted FLOPs per second / the device's dense peak for the mode's math: `mfu` against the
datasheet (--peak-tflops or the table below), `mfu_measured` against a matrix product of the same
math timed on this device first (--measure-peak; an H100/H200 reaches ~790 of the sheet's 989
TFLOP/s in bf16). Modes:
  fp32  eager, NCHW, TF32 off         (the baseline)
  tf32  eager, NCHW, TF32 matmul/conv
  bf16  bf16 autocast + channels_last + torch.compile (+ TF32 for what stays fp32)

    python bench/step.py                                   # GPU: every preset, fp32 vs bf16,
                                                           # 168x400, largest batch that fits
    python bench/step.py --presets badblock --modes fp32,tf32,bf16 --json out.json
    python bench/step.py --device cpu --size 32x64 --batch 4 --base 8 --steps 3

--json is rewritten after every row, so a run stopped at a time limit keeps the rows it finished; a
row that fails (out of memory, cuDNN finding no engine near the memory limit) records its error
and the next row runs (exit status 1 at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from hpc.config import LossConfig, ModelConfig  # noqa: E402
from hpc.distributed.device import DEVICES, resolve_device  # noqa: E402
from hpc.train.losses import build_loss  # noqa: E402
from hpc.train.models import MODELS, build_model, required_multiple  # noqa: E402


@dataclass(frozen=True)
class Mode:
    autocast: torch.dtype | None
    channels_last: bool
    compile: bool
    tf32: bool
    peak_key: str  # which peak of the table applies


MODES = {
    "fp32": Mode(None, False, False, False, "fp32"),
    "tf32": Mode(None, False, False, True, "tf32"),
    "bf16": Mode(torch.bfloat16, True, True, True, "bf16"),
}
# Dense peak TFLOP/s from NVIDIA's datasheets (no sparsity); matched against the device name in order.
PEAK_TFLOPS = [
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0}),
    ("H100", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}),  # SXM
    ("H200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="badblock,unet,light", help="comma-separated model presets")
    ap.add_argument("--modes", default="", help="comma-separated of fp32,tf32,bf16 (default: fp32,bf16)")
    ap.add_argument("--size", default="168x400", help="slice VIEWSxBINS (rounded up to the model's multiple)")
    ap.add_argument("--context", type=int, default=2, help="context slices each side: 2k+1 channels")
    ap.add_argument("--base", type=int, default=64, help="model width (model.base)")
    ap.add_argument("--depth", type=int, default=2, help="unet depth")
    ap.add_argument("--batch", type=int, default=0, help="batch size; 0 = largest that fits (GPU)")
    ap.add_argument("--max-batch", type=int, default=1024, help="upper bound of the batch search")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation happens here)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--device", choices=DEVICES, default="auto", help="auto: the GPU when there is one")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="override the peak for every mode")
    ap.add_argument("--measure-peak", action="store_true",
                    help="also time a dense matrix product per mode on this device: mfu_measured")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    args.modes = args.modes or "fp32,bf16"
    for p in args.presets.split(","):
        if p not in MODELS:
            ap.error(f"--presets: unknown preset {p!r}; valid: {', '.join(MODELS)}")
    for m in args.modes.split(","):
        if m not in MODES:
            ap.error(f"--modes: unknown mode {m!r}; valid: {', '.join(MODES)}")
    try:
        args.views, args.bins = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size: expected VIEWSxBINS like 168x400, got {args.size!r}")
    args.device = resolve_device(args.device, what="--device")  # the trainer's own resolver
    if args.device.type == "cpu" and args.batch == 0:
        ap.error("--batch: give a batch size on the CPU (the search for the largest batch is GPU-only)")
    return args


def model_cfg(preset: str, args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(name=preset, base=args.base, depth=args.depth, inpaint=True)


def padded_size(cfg: ModelConfig, views: int, bins: int) -> tuple[int, int]:
    m = required_multiple(cfg)
    return -(-views // m) * m, -(-bins // m) * m


def flops_per_sample(cfg: ModelConfig, channels: int, size: tuple[int, int]) -> int:
    """Forward + backward FLOPs of one sample, counted on the meta device (no compute)."""
    model = build_model(cfg, channels).to("meta")
    x = torch.empty(1, channels, *size, device="meta")
    mask = torch.ones(1, 1, *size, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x, mask).abs().mean().backward()
    return counter.get_total_flops()


def make_step(cfg: ModelConfig, channels: int, mode: Mode, device: torch.device):
    """A closure running one training step on (x, mask, target)."""
    model = build_model(cfg, channels).to(device)
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = build_loss(LossConfig({"l1": 1.0}))
    fwd = torch.compile(model) if mode.compile else model

    def step(x: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=mode.autocast or torch.float32, enabled=mode.autocast is not None):
            pred = fwd(x, mask)
        loss, _ = loss_fn(pred, target, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def make_batch(batch: int, channels: int, size: tuple[int, int], mode: Mode, device: torch.device):
    fmt = torch.channels_last if mode.channels_last else torch.contiguous_format
    x = torch.rand(batch, channels, *size, device=device).contiguous(memory_format=fmt)
    mask = (torch.rand(batch, 1, *size, device=device) > 0.1).float()
    return x, mask, torch.rand(batch, 1, *size, device=device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def fits(cfg: ModelConfig, channels: int, size, mode: Mode, device: torch.device, batch: int) -> bool:
    """Whether two eager training steps of this batch fit in GPU memory."""
    eager = Mode(mode.autocast, mode.channels_last, False, mode.tf32, mode.peak_key)
    try:
        step = make_step(cfg, channels, eager, device)
        data = make_batch(batch, channels, size, eager, device)
        for _ in range(2):
            step(*data)
        sync(device)
        return True
    except RuntimeError as exc:  # torch.OutOfMemoryError is one; cuDNN near the limit raises a plain one
        if not out_of_memory(exc):
            raise
        return False
    finally:
        step = data = None  # drop references before emptying the cache
        torch.cuda.empty_cache()


def out_of_memory(exc: RuntimeError) -> bool:
    """Whether an error means 'this batch does not fit': torch's OOM, or cuDNN finding no engine
    (every algorithm needs more workspace than is left), which is a plain RuntimeError."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "unable to find an engine" in text or \
        "CUDNN_STATUS_ALLOC_FAILED" in text or "out of memory" in text


def largest_batch(cfg: ModelConfig, channels: int, size, mode: Mode, device: torch.device, limit: int) -> int:
    """Doubling then bisection on the batch size (eager memory; compiled graphs use no more)."""
    lo, hi = 0, 1
    while hi <= limit and fits(cfg, channels, size, mode, device, hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > max(1, lo // 16):  # within ~6%: each probe costs two steps
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(cfg, channels, size, mode, device, mid) else (lo, mid)
    if lo == 0:
        raise SystemExit(f"{cfg.name}: even batch 1 does not fit on {device}")
    return lo


def peak_tflops(args: argparse.Namespace, device: torch.device, mode: Mode) -> float | None:
    if args.peak_tflops > 0:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks[mode.peak_key]
    return None


_MEASURED: dict[str, float] = {}  # peak_key -> TFLOP/s measured on this device


def matmul_tflops(device: torch.device, mode: Mode) -> float:
    """Dense matrix-product TFLOP/s of the mode's math on this device (bf16 operands for bf16, fp32
    with or without TF32 otherwise): random operands (zeros run faster than data), three warm-up
    products, the median of five timed groups of ten."""
    if mode.peak_key in _MEASURED:
        return _MEASURED[mode.peak_key]
    n = 8192 if device.type == "cuda" else 512  # the GPU's size fills it; the CPU's ends in seconds
    dtype = torch.bfloat16 if mode.peak_key == "bf16" else torch.float32
    set_tf32(mode.tf32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        times.append((time.perf_counter() - t0) / 10)
    _MEASURED[mode.peak_key] = 2 * n**3 / statistics.median(times) / 1e12
    return _MEASURED[mode.peak_key]


def bench_one(preset: str, mode_name: str, args: argparse.Namespace, device: torch.device) -> dict:
    cfg, mode = model_cfg(preset, args), MODES[mode_name]
    channels = 2 * args.context + 1
    size = padded_size(cfg, args.views, args.bins)
    set_tf32(mode.tf32)
    batch = args.batch or largest_batch(cfg, channels, size, mode, device, args.max_batch)
    step = make_step(cfg, channels, mode, device)
    data = make_batch(batch, channels, size, mode, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step(*data)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(*data)
    sync(device)
    seconds = (time.perf_counter() - t0) / args.steps
    flops = flops_per_sample(cfg, channels, size) * batch
    peak = peak_tflops(args, device, mode)
    achieved = flops / seconds / 1e12
    measured = matmul_tflops(device, mode) if args.measure_peak else None
    return {
        "preset": preset, "mode": mode_name, "size": f"{size[0]}x{size[1]}", "batch": batch,
        "step_ms": 1e3 * seconds, "samples_per_s": batch / seconds, "gflop_per_sample": flops / batch / 1e9,
        "tflops": achieved, "peak_tflops": peak, "mfu": achieved / peak if peak else None,
        "peak_measured_tflops": measured, "mfu_measured": achieved / measured if measured else None,
        "mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def table(rows: list[dict]) -> str:
    base = {r["preset"]: r["samples_per_s"] for r in rows if r["mode"] == "fp32" and "error" not in r}
    lines = ["| preset | mode | size | batch | samples/s | vs fp32 | step ms | GFLOP/sample | TFLOP/s | MFU "
             "| MFU (measured peak) | GPU mem GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['mode']} | failed: {r['error'][:80]} |")
            continue
        ratio = f"{r['samples_per_s'] / base[r['preset']]:.2f}x" if r["preset"] in base else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mfu_m = f"{100 * r['mfu_measured']:.1f}% of {r['peak_measured_tflops']:.4g}" \
            if r.get("mfu_measured") is not None else "n/a"
        mem = f"{r['mem_gb']:.1f}" if r["mem_gb"] is not None else "-"
        lines.append(f"| {r['preset']} | {r['mode']} | {r['size']} | {r['batch']} | {r['samples_per_s']:.4g} | "
                     f"{ratio} | {r['step_ms']:.1f} | {r['gflop_per_sample']:.4g} | {r['tflops']:.4g} | "
                     f"{mfu} | {mfu_m} | {mem} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    who = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# bench/step.py on {who}, torch {torch.__version__}", flush=True)
    rows = []
    for preset in args.presets.split(","):
        for mode_name in args.modes.split(","):
            try:
                rows.append(bench_one(preset, mode_name, args, device))
                print(f"{preset} {mode_name}: {rows[-1]['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
            except Exception as exc:  # OOM, cuDNN, a compile failure: this row's result; the others still count
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                rows.append({"preset": preset, "mode": mode_name, "error": f"{type(exc).__name__}: {first}"})
                print(f"{preset} {mode_name}: failed: {rows[-1]['error']}", file=sys.stderr, flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if args.json:
                write_json(args.json, {"device": who, "torch": torch.__version__, "rows": rows})
    print(table(rows))
    return 1 if any("error" in r for r in rows) else 0


def write_json(path: Path, data) -> None:
    """Replace ``path`` whole (a reader never sees half a file, even when a time limit hits)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
