"""Codecs for Poisson-count sinograms: stored size, compression and decode rate per core.

The measurement behind `hpc convert`'s default codec (docs/BENCHMARKS.md): slices of uint16
Poisson counts (the same generator as bench/convert.py, or a low-count variant) are stored as one
HDF5 chunk per slice with each codec; for each codec, in one run and on one core:
- stored / raw: bytes of the compressed chunks over the raw bytes;
- encode MB/s: raw MB compressed per second (numcodecs/zlib as `hpc convert` calls them; lzf
  through h5py's own filter, the only way to run it);
- decode MB/s: raw MB per second of a plain h5py read of the whole dataset (what the loader does,
  filter pipeline included), file in the page cache.

    python bench/codecs.py                       # 2,000 slices of 252x344, 1-40 counts per bin
    python bench/codecs.py --counts 0.5,4 --json codecs.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from hpc.io.chunks import ChunkCodec  # noqa: E402
from hpc.io.h5write import COMPRESSIONS, compression_kwargs  # noqa: E402

os.environ.setdefault("BLOSC_NTHREADS", "1")  # one core: per-core figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=2000)
    ap.add_argument("--slice", default="252,344", help="V,X")
    ap.add_argument("--counts", default="1,40", help="mean counts per bin drawn uniformly in [lo, hi] per radial bin")
    ap.add_argument("--codecs", default=",".join(COMPRESSIONS))
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings")
    ap.add_argument("--json", type=Path)
    return ap.parse_args(argv)


def poisson_slices(n: int, v: int, x: int, lo: float, hi: float) -> np.ndarray:
    """(n, V, X) uint16 counts: 64 distinct slices cycled (as bench/convert.py writes them)."""
    rng = np.random.default_rng(0)
    pool = rng.poisson(rng.uniform(lo, hi, (64, 1, x)), (64, v, x)).astype("<u2")
    return np.resize(pool, (n, v, x))


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(name: str, data: np.ndarray, path: Path, repeat: int) -> dict:
    raw_mb = data.nbytes / 1e6
    with h5py.File(path, "w") as f:
        d = f.create_dataset("target", data.shape, data.dtype, chunks=(1, *data.shape[1:]),
                             **compression_kwargs(name))
        codec = ChunkCodec.for_dataset(d)
        if codec is not None:  # the direct-chunk path: compress in Python, write the bytes
            encode = best(lambda: [codec.encode(s) for s in data], repeat)
            for k, s in enumerate(data):
                mask, chunk = codec.encode(s)
                d.id.write_direct_chunk((k, 0, 0), chunk, filter_mask=mask)
    if codec is None:  # lzf: only h5py's filter implements it
        def write():
            with h5py.File(path, "w") as f:
                f.create_dataset("target", data=data, chunks=(1, *data.shape[1:]), **compression_kwargs(name))
        encode = best(write, repeat)
    with h5py.File(path, "r") as f:
        d = f["target"]
        stored = sum(d.id.get_chunk_info(i).size for i in range(d.id.get_num_chunks()))
        decode = best(lambda: d[()], repeat)
        assert np.array_equal(d[()], data), name
    return {"codec": name, "stored_vs_raw": stored / data.nbytes, "encode_mb_s": raw_mb / encode,
            "decode_mb_s": raw_mb / decode, "decode_slices_s": len(data) / decode}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    v, x = (int(s) for s in args.slice.split(","))
    lo, hi = (float(s) for s in args.counts.split(","))
    data = poisson_slices(args.slices, v, x, lo, hi)
    print(f"{args.slices} slices of {v}x{x} uint16, Poisson means in [{lo}, {hi}], "
          f"{data.nbytes / 1e6:.0f} MB; one core; best of {args.repeat}; load {os.getloadavg()[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.codecs.split(","):
            rows.append(measure(name, data, Path(tmp) / f"{name}.h5", args.repeat))
    print("| codec | stored / raw | encode MB/s | decode MB/s | decode slices/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['codec']} | {r['stored_vs_raw']:.3f} | {r['encode_mb_s']:.0f} | {r['decode_mb_s']:.0f} | "
              f"{r['decode_slices_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
