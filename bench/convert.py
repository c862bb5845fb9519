"""`hpc convert` throughput as a ratio to `cp` of the same bytes, and its peak RSS, per input size.

For each size a raw uint16 sinogram file (Poisson counts, slices of --slice V,X) is written, then,
in the same run and on the same file system: `cp` of the file (+ fsync of the copy) and
`hpc convert` of it (child process; shards are fsynced too), each timed on a warm page cache (the
file was just written and copied). Peak RSS is the child's ru_maxrss (os.wait4), so it covers only
the conversion; it should not grow with the file size (slab-wise reads, pages released).

    python bench/convert.py                                # 1 GB and 4 GB in /tmp, blosc, 2 threads
    python bench/convert.py --size-gb 0.05 --compression none,lzf --dir /tmp/b
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", default="1,4", help="comma-separated input sizes in GB (1e9 bytes)")
    ap.add_argument("--slice", default="252,344", help="V,X of a slice (default: a Siemens mMR sinogram)")
    ap.add_argument("--compression", default="blosc", help="comma-separated: none,lzf,gzip,blosc,...")
    ap.add_argument("--workers", type=int, default=2, help="hpc convert --workers (compressing threads)")
    ap.add_argument("--repeat", type=int, default=2, help="cp and convert alternate this many times; best of each")
    ap.add_argument("--dir", default="/tmp/hpc-bench-convert", help="scratch dir (deleted afterwards)")
    return ap.parse_args(argv)


def make_raw(path: Path, n_slices: int, v: int, x: int) -> None:
    """Poisson counts, written slab by slab (a pool of 64 distinct slices, cycled)."""
    rng = np.random.default_rng(0)
    pool = rng.poisson(rng.uniform(1, 40, (64, 1, x)), (64, v, x)).astype("<u2")  # (64, V, X)
    with open(path, "wb") as fh:
        for k in range(0, n_slices, 64):
            fh.write(pool[: min(64, n_slices - k)].tobytes())


def time_cp(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    with open(dst, "rb") as fh:
        os.fsync(fh.fileno())
    return time.perf_counter() - t0


def time_convert(src: Path, out: Path, shape: str, compression: str, workers: int) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of `hpc convert` in a child process (its threads included)."""
    cmd = [sys.executable, "-m", "hpc", "convert", str(src), "--shape", shape, "--dtype", "uint16",
           "-o", str(out), "--compression", compression, "--workers", str(workers), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"hpc convert failed ({proc.returncode}): {' '.join(cmd)}")
    return seconds, usage.ru_maxrss / 1024  # Linux: KiB


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.platform()}, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    v, x = (int(s) for s in args.slice.split(","))
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    fs = subprocess.run(["df", "--output=fstype", str(root)], capture_output=True, text=True).stdout.split()[-1]
    print(f"machine: {machine()}; scratch {root} ({fs}); --workers {args.workers}\n")
    print(f"load average at start: {os.getloadavg()[0]:.2f}\n")
    print("| input | compression | cp+sync s | convert s | convert MB/s | throughput vs cp | peak RSS MB "
          "| stored / raw |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        for size_gb in (float(s) for s in args.size_gb.split(",")):
            n = max(1, int(size_gb * 1e9) // (v * x * 2))
            src = root / "input.raw"
            make_raw(src, n, v, x)
            nbytes = src.stat().st_size
            for comp in args.compression.split(","):
                cp_s = conv_s = float("inf")
                for _ in range(args.repeat):  # interleaved: both see the same load
                    cp_s = min(cp_s, time_cp(src, root / "copy.raw"))
                    (root / "copy.raw").unlink()
                    out = root / f"ds-{comp}"
                    secs, rss = time_convert(src, out, f"1,{n},{v},{x}", comp, args.workers)
                    conv_s = min(conv_s, secs)
                    shards = sum(p.stat().st_size for p in (out / "shards").glob("*.h5"))
                    shutil.rmtree(out)
                print(f"| {nbytes / 1e9:.2f} GB ({n} slices of {v}x{x}) | {comp} | {cp_s:.2f} | {conv_s:.2f} | "
                      f"{nbytes / 1e6 / conv_s:.0f} | {cp_s / conv_s:.2f} | {rss:.0f} | {shards / nbytes:.3f} |",
                      flush=True)
            src.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
