"""Cost of the shards' per-chunk Fletcher-32 checksums: reads and writes with and without it.

For each compression, two shard-like HDF5 files of the same Poisson-count slices (chunks (1, V, X))
are written, one with HDF5's fletcher32 filter after the compression filter (what `hpc convert`
writes) and one without. Then, in one run and interleaved (A, B, A, B, ... so machine noise hits
both alike): random single-slice reads from the page cache (what the loader does), a sequential
read of every slice, and the write of the whole file. The figure is the ratio checksum / none of
the median time per repeat; the throughputs are only for orientation.

    python bench/fletcher32.py                                   # 512 slices of 252x344, none + lzf
    python bench/fletcher32.py --slices 256 --compression none,lzf,blosc --repeats 7
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hpc.io.h5write import compression_kwargs  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=512)
    ap.add_argument("--slice", default="252,344", help="V,X (default: a Siemens mMR sinogram)")
    ap.add_argument("--compression", default="none,lzf", help="comma-separated: none,lzf,gzip,blosc")
    ap.add_argument("--reads", type=int, default=2000, help="random single-slice reads per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="scratch dir (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    return ap.parse_args(argv)


def write(path: Path, data: np.ndarray, compression: str, fletcher32: bool) -> float:
    t0 = time.perf_counter()
    with h5py.File(path, "w", rdcc_nbytes=0) as f:
        d = f.create_dataset("target", data.shape, data.dtype, chunks=(1, *data.shape[1:]),
                             fletcher32=fletcher32, **compression_kwargs(compression))
        for k in range(0, len(data), 64):
            d[k:k + 64] = data[k:k + 64]
    return time.perf_counter() - t0


def random_reads(path: Path, order: np.ndarray) -> float:
    with h5py.File(path, "r") as f:
        d = f["target"]
        t0 = time.perf_counter()
        for k in order:
            d[int(k)]
        return time.perf_counter() - t0


def sequential(path: Path) -> float:
    with h5py.File(path, "r") as f:
        d = f["target"]
        t0 = time.perf_counter()
        for k in range(0, len(d), 16):
            d[k:k + 16]
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    v, x = (int(s) for s in args.slice.split(","))
    rng = np.random.default_rng(0)
    data = rng.poisson(rng.uniform(1, 40, (args.slices, 1, x)), (args.slices, v, x)).astype("<u2")
    order = rng.integers(0, args.slices, args.reads)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for comp in args.compression.split(","):
            paths = {fl: Path(tmp) / f"{comp}-{fl}.h5" for fl in (False, True)}
            times: dict[tuple[str, bool], list[float]] = {}
            for _ in range(args.repeats):
                for fl, path in paths.items():  # interleaved: noise hits both alike
                    times.setdefault(("write", fl), []).append(write(path, data, comp, fl))
                    times.setdefault(("random", fl), []).append(random_reads(path, order))
                    times.setdefault(("sequential", fl), []).append(sequential(path))
            for what, n in (("random", args.reads), ("sequential", args.slices), ("write", args.slices)):
                base, chk = (statistics.median(times[(what, fl)]) for fl in (False, True))
                rows.append({"compression": comp, "op": what, "slices_per_s_none": n / base,
                             "slices_per_s_fletcher32": n / chk, "ratio": chk / base})
    print(f"# {platform.node()}  h5py {h5py.__version__}  HDF5 {h5py.version.hdf5_version}  "
          f"{args.slices} slices of {v}x{x} uint16, median of {args.repeats}")
    print(f"{'compression':<12}{'op':<12}{'none /s':>12}{'fletcher32 /s':>15}{'time ratio':>12}")
    for r in rows:
        print(f"{r['compression']:<12}{r['op']:<12}{r['slices_per_s_none']:>12,.0f}"
              f"{r['slices_per_s_fletcher32']:>15,.0f}{r['ratio']:>12.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
