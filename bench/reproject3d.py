"""Seconds per study and peak memory of the 3-D reproject (hpc.physics.recon3d) vs the 2-D one
(hpc.physics.recon) on an mMR 8-ring span-11 slab (21 planes x 252 views x 344 bins).

    OMP_NUM_THREADS=1 python bench/reproject3d.py [--iters 4] [--device cpu] [--runs 3d,2d,2d-coarse]

The study is synthetic: an ellipsoid-ish volume projected with the 3-D projector (blur on), random
multiplicative factors, 10 % randoms, Poisson counts, two dead transaxial blocks (gaps in every plane).
Each method runs in its own process (clean peak RSS; CUDA peak allocated memory on a GPU):

    3d         reproject3d, default volume (142 x 142 pixels of 4.17 mm, 15 half-ring z voxels), blur
    3d-noblur  the same without the blur model (the data have it: a model mismatch, faster convergence)
    2d         the 2-D reproject, its default grid (344 x 344 pixels of 2.09 mm; matrix build timed apart)
    2d-coarse  the 2-D reproject on the 3-D volume's transaxial grid (172 x 172)

and also reports the in-gap NMSE against the noise-free counts (``--path 1,2,4,8``: at each of these
iteration counts, from one run; the time is then the whole path's). 4 OSEM subsets everywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from hpc.physics import geometry as G
from hpc.physics import projdata as PD
from hpc.physics import recon as R
from hpc.physics import recon3d as R3
from hpc.physics.projector3d import Projector3D, default_volume


def slab() -> PD.Layout:
    sc = dataclasses.replace(G.get_scanner("mmr"), rings=8, max_ring_diff=7)
    return PD.cti_layout(sc, span=11, max_ring_diff=7)


def study(layout: PD.Layout, device: str) -> dict[str, torch.Tensor]:
    """Noise-free truth, counts, weight (gaps 0), mult, randoms: (P, V, X) float32 each."""
    vol = default_volume(layout)
    xc, yc = vol.grid.centres()
    x, y = np.meshgrid(xc, yc)
    z = np.arange(vol.nz)[:, None, None] / vol.nz
    img = (((x / 150) ** 2 + (y / 110) ** 2 < 1) * 1.0 + ((x - 40) ** 2 + (y + 30) ** 2 < 30 ** 2) * (2 + 2 * z)
           + ((x + 60) ** 2 + (y - 20) ** 2 < (20 + 20 * z) ** 2) * 3.0)
    g = torch.Generator().manual_seed(0)
    mult = (0.05 + 0.1 * torch.rand(layout.planes, layout.views, layout.bins, generator=g)).to(device)
    trues = mult * Projector3D(layout, vol, blur=True, device=device).forward(torch.as_tensor(img, dtype=torch.float32))
    scale = 2e8 / float(trues.sum())  # ~2e8 counts in the slab
    trues = trues * scale
    randoms = torch.full_like(trues, 0.1 * float(trues.mean()))
    truth = trues + randoms
    counts = torch.poisson(truth.cpu(), generator=g).to(device)
    blocks = G.transaxial_block_masks(layout.scanner)  # (T, 2, V, X)
    dead = torch.as_tensor((blocks[5] | blocks[31]).any(0))  # two dead blocks
    w = (~dead).float().expand_as(truth).to(device)
    return {"truth": truth, "y": counts, "w": w, "mult": mult * scale, "randoms": randoms}


def run(method: str, iters: int, device: str, path: tuple[int, ...] = ()) -> dict:
    layout = slab()
    d = study(layout, device)
    sc = layout.scanner
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    t0, build = time.perf_counter(), 0.0
    if method.startswith("3d"):
        outs = R3.reproject3d_path(layout, d["y"], d["w"], path or (iters,), 4, mult=d["mult"], add=d["randoms"],
                                   blur=method == "3d")
    else:
        grid = default_volume(layout).grid if method == "2d-coarse" else None
        t1 = time.perf_counter()
        R.subset_projectors(sc, grid or R.default_grid(sc), 4, False, torch.device(device))  # cached matrices
        R.cached_projector(sc, grid or R.default_grid(sc), False, 0, 1, device)
        build = time.perf_counter() - t1
        outs = R.reproject_path(sc, d["y"], d["w"], path or (iters,), 4, mult=d["mult"], add=d["randoms"], grid=grid)
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    gap = d["w"] == 0
    truth = d["truth"][gap].double()
    nmse = {it: float(((out[gap].double() - truth) ** 2).sum() / (truth ** 2).sum()) for it, out in outs.items()}
    peak = (torch.cuda.max_memory_allocated() / 1e9 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    return {"method": method, "iters": iters, "seconds": secs - build, "build_s": build, "peak_gb": peak,
            "rss_before_gb": base, "gap_nmse": nmse, "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", default="3d,2d-coarse,2d")
    ap.add_argument("--path", default="", help="iteration counts to score from one run, e.g. 1,2,4,8")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run(a.one, a.iters, a.device, tuple(int(i) for i in a.path.split(",") if i))))
        return
    rows = []
    for m in a.runs.split(","):
        got = subprocess.run([sys.executable, __file__, "--one", m, "--iters", str(a.iters), "--device", a.device,
                              "--path", a.path],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(got.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nmMR 8 rings, span 11 ({slab().planes} planes x 252 x 344), {a.iters} iterations x 4 subsets, {a.device}")
    print(f"{'method':<10} {'s/study':>8} {'build s':>8} {'peak GB':>8}  gap NMSE by iterations")
    for r in rows:
        nmse = ", ".join(f"{it}: {v:.5f}" for it, v in r["gap_nmse"].items())
        print(f"{r['method']:<10} {r['seconds']:>8.1f} {r['build_s']:>8.1f} {r['peak_gb']:>8.2f}  {nmse}")


if __name__ == "__main__":
    main()
