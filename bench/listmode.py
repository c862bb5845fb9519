"""Histogramming PETLINK list mode vs reading the same bytes with ``cat`` (issue 25 asks for >= 0.5x).

    python bench/listmode.py --gb 1.5 --out listmode.json                       # numpy, 1 and 2 workers
    python bench/listmode.py --gb 1.5 --runs numpy:1,cpu:1,cuda:1 --out gpu.json    # torch kernels too

Writes a synthetic mMR list-mode file (hpc.simulate.listmode.write_random_listmode: span-1 addresses
uniform over the sinogram, 14 % delayeds, a time mark every 370 events as in a clinical 15-minute
scan), then, interleaved and repeated: ``cat FILE > /dev/null`` and hpc.io.lmhistogram.histogram
into the mMR's span-11 layout (prompts + delayeds), each once with the file in the page cache
("warm") and once after evicting it (``posix_fadvise(DONTNEED)`` on this file only: "cold"). The
page-cache state before each run is measured (resident bytes, util-linux ``fincore`` when present).
Speed relative to cat = cat time / histogram time. ``--runs`` lists DEVICE:WORKERS pairs: ``numba``
(hpc.io.lmnumba, compiled, WORKERS threads; compiled once before the timed runs, that time reported
as ``numba_compile_s``), ``numpy`` (np.add.at, WORKERS processes), ``cpu`` / ``cuda``
(hpc.io.lmtorch: torch index_add_, one process).
Also times the accumulation step alone on one in-memory chunk (np.add.at, np.bincount + add, torch
index_add_ on each available device) to show where the time goes. Every histogram is checked
against the generator's totals; the JSON is rewritten after every run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from hpc.io import listmode as L
from hpc.io.lmhistogram import histogram
from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.simulate.listmode import write_random_listmode


def evict(path: Path) -> None:
    """Drop this file's pages from the page cache (other files are untouched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident(path: Path) -> int | None:
    """Bytes of ``path`` in the page cache (util-linux fincore), None when unknown."""
    if not shutil.which("fincore"):
        return None
    r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                       capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.returncode == 0 and r.stdout.strip() else None


def time_cat(path: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(f"cat '{path}' > /dev/null", shell=True, check=True)
    return time.perf_counter() - t0


def time_histogram(hdr: L.ListModeHeader, layout: P.Layout, device: str, workers: int, truth: dict) -> float:
    t0 = time.perf_counter()
    (h,) = histogram(hdr, layout=layout, workers=workers, device=device)
    dt = time.perf_counter() - t0
    got = (h.stats["prompts"] + h.stats["dropped_prompts"], h.stats["delayeds"] + h.stats["dropped_delayeds"])
    if got != (truth["prompts"], truth["delayeds"]):
        raise SystemExit(f"histogram totals {got} != generated {truth['prompts'], truth['delayeds']}")
    return dt


def kernels(layout: P.Layout, devices: list[str], events: int = 1 << 22) -> dict[str, float]:
    """Events/s of the accumulation step alone: one in-memory chunk of random keys into a span-11
    sized array (prompts + delayeds slots)."""
    size = 2 * layout.planes * layout.views * layout.bins
    key = np.random.default_rng(0).integers(0, size, events)
    acc = np.zeros(size, np.uint32)
    fns = {"numpy add.at": lambda: np.add.at(acc, key, np.uint32(1)),
           "numpy bincount+add": lambda: np.add(acc, np.bincount(key, minlength=size), out=acc, casting="unsafe")}
    for dev in devices:
        import torch  # only when torch kernels are asked for

        t_acc = torch.zeros(size, dtype=torch.int32, device=dev)
        t_key = torch.from_numpy(key).to(dev)
        ones = torch.ones(1, dtype=torch.int32, device=dev).expand(events)
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        fns[f"torch index_add_ {dev}"] = lambda a=t_acc, k=t_key, o=ones, s=sync: (a.index_add_(0, k, o), s())
    out = {}
    for name, fn in fns.items():
        fn()  # first touch of the pages
        t0 = time.perf_counter()
        fn()
        out[name] = events / (time.perf_counter() - t0)
    return out


def compile_numba(hdr: L.ListModeHeader, dst: P.Layout) -> float:
    """Seconds of the compiled kernel's first call on a few words (compiling, or loading the cache)."""
    from hpc.io.lmnumba import NumbaKernel

    t0 = time.perf_counter()
    kernel = NumbaKernel(hdr, L.bin_map(hdr.layout, dst), None, 1, 1 << 10)
    kernel.run(0, min(hdr.words, 1 << 10))
    kernel.close()
    return time.perf_counter() - t0


def one_run(hdr: L.ListModeHeader, dst: P.Layout, truth: dict, what: str, cache: str, rep: int) -> dict:
    path = hdr.data_path
    if cache == "cold":
        evict(path)
    else:
        time_cat(path)  # every page resident
    before = resident(path)
    if what == "cat":
        dt = time_cat(path)
    else:
        device, workers = what.split(":")
        dt = time_histogram(hdr, dst, device, int(workers), truth)
    return {"rep": rep, "cache": cache, "what": what, "s": dt, "GB_per_s": hdr.words * 4 / dt / 1e9,
            "resident_bytes_before": before, "load": os.getloadavg()[0]}


def summary(res: dict) -> dict:
    """Median seconds and x-cat per (cache, run), printed and returned."""
    table = {}
    print("\ncache  run          median s   GB/s   x cat (>= 0.5 wanted)")
    for cache in ("warm", "cold"):
        runs = [r for r in res["runs"] if r["cache"] == cache]
        if not runs:
            continue
        cat = float(np.median([r["s"] for r in runs if r["what"] == "cat"]))
        for what in dict.fromkeys(r["what"] for r in runs):
            s = float(np.median([r["s"] for r in runs if r["what"] == what]))
            table[f"{cache} {what}"] = {"median_s": s, "x_cat": cat / s}
            print(f"{cache:5}  {what:11}  {s:9.2f}  {res['bytes'] / s / 1e9:5.2f}   {cat / s:6.3f}")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.5, help="size of the generated file (GB, 1e9 bytes)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp"), help="where to write it")
    ap.add_argument("--runs", default="numba:1,numba:2,numpy:1",
                    help="DEVICE:WORKERS,... (devices numba, numpy, cpu, cuda)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the generated file")
    ap.add_argument("--out", type=Path, help="JSON results (rewritten after every run)")
    args = ap.parse_args()
    runs = args.runs.split(",")
    sc = G.get_scanner("mmr")
    src, dst = P.cti_layout(sc, 1, 60), P.cti_layout(sc)  # file: span 1; target: span 11
    events = int(args.gb * 1e9 / 4 / (1 + 1 / 370))
    t0 = time.perf_counter()
    header, truth = write_random_listmode(args.dir / "bench_listmode", src, events, np.random.default_rng(1))
    hdr = L.read_header(header)
    torch_devices = sorted({r.split(":")[0] for r in runs} - {"numpy", "numba"})
    compile_s = compile_numba(hdr, dst) if any(r.startswith("numba:") for r in runs) else None
    res = {"bytes": hdr.words * 4, "events": events, "generate_s": time.perf_counter() - t0, "cpus": os.cpu_count(),
           "machine": platform.node(), "load_before": os.getloadavg(),
           "kernels_events_per_s": kernels(dst, torch_devices), "numba_compile_s": compile_s, "runs": []}
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}), flush=True)
    try:
        for rep in range(args.repeats):
            for cache in ("warm", "cold"):
                for what in ["cat", *runs]:
                    res["runs"].append(one_run(hdr, dst, truth, what, cache, rep))
                    print(json.dumps(res["runs"][-1]), flush=True)
                    if args.out:
                        args.out.write_text(json.dumps(res, indent=1))
        res["summary"] = summary(res)
        if args.out:
            args.out.write_text(json.dumps(res, indent=1))
    finally:
        if not args.keep:
            for p in (hdr.data_path, header):
                p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
