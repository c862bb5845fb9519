"""DDP communication: all-reduce bandwidth and latency measured with gloo across processes on this
machine, the training step's backward time here, and a projected weak-scaling efficiency for 8 /
64 / 512 GPUs from stated NVLink and InfiniBand figures (docs/BENCHMARKS.md).

Measured (this machine, one run): for each message size, the mean time of an all-reduce among
--procs gloo processes (after warm-up), as algorithm bandwidth (bytes / time) and "bus bandwidth"
(x 2(n-1)/n, NCCL's convention: what each link carried); the backward pass of the preset at the
slice size on the CPU, and the all-reduce time of its gradients in DDP's buckets
(hpc.distributed.dist.bucket_mb_for) relative to that backward time.

Projected (stated figures, not measured): a ring all-reduce of the model's gradients takes
2(n-1)/n * bytes / busbw + 2(n-1) * latency; DDP overlaps all buckets but the last with the
backward pass. Step time on an H200 from the preset's FLOPs at --mfu of 989 TFLOP/s (bf16 dense).
Efficiency = compute / (compute + exposed communication). Within a node (8 GPUs) NVLink; beyond,
the per-GPU InfiniBand rail limits the ring.

    python bench/ddp.py                         # 2 gloo processes, badblock at 168x400, batch 32
    python bench/ddp.py --procs 2 --json ddp.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from hpc.config import ModelConfig  # noqa: E402
from hpc.distributed.dist import BUCKETS, bucket_mb_for  # noqa: E402
from hpc.train.models import build_model  # noqa: E402

H200_BF16_FLOPS = 989e12  # dense bf16, NVIDIA H200 SXM datasheet
NVLINK_BUSBW = 360e9  # B/s: NCCL all-reduce bus bandwidth within an 8-GPU NVLink-4 / NVSwitch node
IB_BUSBW = 45e9  # B/s per GPU: one 400 Gb/s NDR rail per GPU (~50 GB/s, ~90 % reached by NCCL)
NVLINK_LAT, IB_LAT = 3e-6, 8e-6  # s per ring step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2, help="gloo processes (all on this machine)")
    ap.add_argument("--sizes-kb", default="4,64,1024,8192,32768", help="message sizes in KiB")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--model", default="badblock")
    ap.add_argument("--base", type=int, default=64)
    ap.add_argument("--size", default="168x400", help="slice VIEWSxBINS")
    ap.add_argument("--batch", type=int, default=32, help="per GPU, for the projection (CPU timing uses --cpu-batch)")
    ap.add_argument("--cpu-batch", type=int, default=2)
    ap.add_argument("--context", type=int, default=2)
    ap.add_argument("--mfu", type=float, default=0.45)
    ap.add_argument("--json", type=Path)
    return ap.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for kb in (int(k) for k in args.sizes_kb.split(",")):
        t = torch.ones(kb * 256)  # float32: kb KiB
        for _ in range(3):
            tdist.all_reduce(t)
        tdist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            tdist.all_reduce(t)
        secs = (time.perf_counter() - t0) / args.iters
        rows.append({"kib": kb, "seconds": secs, "algbw_gb_s": kb * 1024 / secs / 1e9,
                     "busbw_gb_s": kb * 1024 / secs / 1e9 * 2 * (world - 1) / world})
    grads = _gradient_allreduce(args, world)
    if rank == 0:
        out.put({"allreduce": rows, "grad_allreduce_s": grads})
    tdist.barrier()
    tdist.destroy_process_group()


def _model(args: argparse.Namespace) -> torch.nn.Module:
    return build_model(ModelConfig(name=args.model, base=args.base, inpaint=False), 2 * args.context + 1)


def _gradient_allreduce(args: argparse.Namespace, world: int) -> float:
    """Seconds to all-reduce the model's gradients in DDP's bucket sizes (buckets back to back)."""
    model = _model(args)
    numels = [p.numel() for p in model.parameters()]
    cap = bucket_mb_for(model) * 2**20 / 4  # float32 elements per bucket
    buckets, cur = [], 0
    for n in numels:
        cur += n
        if cur >= cap:
            buckets.append(cur)
            cur = 0
    buckets += [cur] if cur else []
    tensors = [torch.ones(n) for n in buckets]
    for t in tensors:
        tdist.all_reduce(t)
    tdist.barrier()
    t0 = time.perf_counter()
    for _ in range(3):
        for t in tensors:
            tdist.all_reduce(t)
    return (time.perf_counter() - t0) / 3


def backward_seconds(args: argparse.Namespace) -> tuple[float, float]:
    """(forward + backward seconds, backward seconds) of one CPU step at --cpu-batch."""
    v, x = (int(s) for s in args.size.split("x"))
    model = _model(args)
    xb = torch.rand(args.cpu_batch, 2 * args.context + 1, v, x)
    m = torch.ones(args.cpu_batch, 1, v, x)
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        loss = model(xb, m).mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if i:
            times.append((t2 - t0, t2 - t1))
    return min(times)


def flops_per_sample(args: argparse.Namespace) -> float:
    """Forward + backward FLOPs of one sample: 3 x 2 x MACs of every conv (hooks count them)."""
    v, x = (int(s) for s in args.size.split("x"))
    model, macs = _model(args), [0]

    def hook(mod, inp, out):
        k = mod.weight.numel() // mod.out_channels if isinstance(mod, torch.nn.Conv2d) else mod.weight.numel() \
            // mod.in_channels
        macs[0] += out.numel() * k

    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            mod.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.rand(1, 2 * args.context + 1, v, x), torch.ones(1, 1, v, x))
    return 3 * 2 * macs[0]


def project(args: argparse.Namespace, grad_bytes: float) -> list[dict]:
    step = args.batch * flops_per_sample(args) / (args.mfu * H200_BF16_FLOPS)  # s per step per GPU
    backward = step * 2 / 3
    rows = []
    for n in (8, 64, 512):
        if n <= 8:
            comm = 2 * (n - 1) / n * grad_bytes / NVLINK_BUSBW + 2 * (n - 1) * NVLINK_LAT
        else:  # hierarchical: NVLink inside the node, one IB rail per GPU between nodes
            nodes = n // 8
            comm = (2 * 7 / 8 * grad_bytes / NVLINK_BUSBW + 2 * 7 * NVLINK_LAT
                    + 2 * (nodes - 1) / nodes * grad_bytes / 8 / IB_BUSBW + 2 * (nodes - 1) * IB_LAT)
        exposed = max(comm / BUCKETS, comm - backward)  # the last bucket never overlaps
        rows.append({"gpus": n, "step_s": step, "allreduce_s": comm, "exposed_s": exposed,
                     "efficiency": step / (step + exposed)})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.procs, port, args, queue)) for r in range(args.procs)]
    for p in procs:
        p.start()
    measured = queue.get()
    for p in procs:
        p.join()
    model = _model(args)
    grad_bytes = sum(p.numel() * 4 for p in model.parameters())
    step_s, backward_s = backward_seconds(args)
    result = {"machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", "procs": args.procs, **measured,
              "model": args.model, "grad_mb": grad_bytes / 2**20, "bucket_mb": bucket_mb_for(model),
              "cpu_backward_s": backward_s, "cpu_step_s": step_s,
              "grad_allreduce_vs_backward": measured["grad_allreduce_s"] / backward_s}
    result["projection_fp32"] = project(args, grad_bytes)
    result["projection_bf16_grads"] = project(args, grad_bytes / 2)
    print(f"gloo all-reduce among {args.procs} processes on this machine ({result['machine']}):")
    print("| KiB | time ms | algbw GB/s | busbw GB/s |\n|---|---|---|---|")
    for r in measured["allreduce"]:
        print(f"| {r['kib']} | {r['seconds'] * 1e3:.3f} | {r['algbw_gb_s']:.2f} | {r['busbw_gb_s']:.2f} |")
    print(f"\n{args.model}: {result['grad_mb']:.1f} MB of fp32 gradients in {result['bucket_mb']:.1f} MB buckets; "
          f"CPU backward {backward_s:.3f} s (batch {args.cpu_batch}), gradient all-reduce "
          f"{measured['grad_allreduce_s']:.3f} s = {result['grad_allreduce_vs_backward']:.3f}x the backward")
    for key in ("projection_fp32", "projection_bf16_grads"):
        print(f"\nprojected on H200s ({key}, batch {args.batch}/GPU, {args.mfu:.0%} MFU; stated link figures):")
        print("| GPUs | step ms | all-reduce ms | exposed ms | efficiency |\n|---|---|---|---|---|")
        for r in result[key]:
            print(f"| {r['gpus']} | {r['step_s'] * 1e3:.1f} | {r['allreduce_s'] * 1e3:.2f} "
                  f"| {r['exposed_s'] * 1e3:.2f} | {r['efficiency']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
