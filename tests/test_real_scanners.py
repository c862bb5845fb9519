"""End to end at real size: an mMR span-11 study (252 views x 344 bins, virtual crystals, dead
blocks in compressed data) and an mCT TOF study (400 bins x 168 views = 336 mashed by 2 x 13 TOF
bins), each cut to a few central planes of segment 0 (`hpc simulate --planes`), are simulated, converted, a tiny model
trains on them with dead blocks for a few samples, and `hpc predict --dead-blocks` repairs them:
only the planes a dead block reaches go through the network, everything else is copied bytewise,
virtual-crystal LORs are written as 0, partly measured bins keep their counts."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from hpc.io.headers import read_header
from hpc.io.interfile import parse_header
from hpc.io.sinogram import SinogramReader
from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.simulate import layout as SL

from helpers import TINY, run_hpc

# Cuts that keep CI at about a minute (2 CPU cores): the central planes of segment 0 (the mMR's
# span-11 segment 0 sums 11 ring differences at half-ring steps; --planes, STIR headers), wide enough
# that a dead block reaches some of them but not all, one dead block, a 2-channel net.
MMR = SL.central_planes(P.cti_layout(G.SCANNERS["mmr"], max_segment=0), 41)
MCT = SL.central_planes(P.cti_layout(G.SCANNERS["mct"], max_segment=0), 15)
CASES = {  # scanner, simulate options, the layout they must give, dead block to repair (None: the simulated one)
    "mmr": (["--scanner", "Siemens mMR", "--planes", "41", "--dead-blocks", "1"], MMR, None),
    "mct": (["--scanner", "mct", "--planes", "15", "--format", "stir"], MCT,
            int(SL.reaching_blocks(MCT)[5])),  # reaches the middle plane, not the last ones
}
ENV = {"OMP_NUM_THREADS": "1"}  # two processes on two shared cores: one thread each is faster


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_real_size_study_converts_trains_and_predicts(tmp_path, name):
    opts, lay, block = CASES[name]
    sim, ds, run = tmp_path / "sim", tmp_path / "ds", tmp_path / "run"
    run_hpc("simulate", "-o", sim, "--studies", "1", "--counts", "clinical", "--randoms", "0", "--no-truth",
            "--seed", "3", *opts, check=True, env=ENV)
    study = json.loads((sim / "studies.json").read_text())["studies"][0]
    target = read_header(sim / study["files"]["target"])
    assert target.layout() == lay and target.scanner == lay.scanner.stir_name  # STIR's name and layout
    assert (target.tof_bins, target.planes, *target.slice_shape) == (lay.tof_bins, lay.planes, *lay.slice_shape)
    gapped = target
    if "gaps" in study["files"]:  # dead blocks in span-11 data: thinned counts + measured fractions
        gapped = read_header(sim / study["files"]["gaps"])
        mask = read_header(sim / study["files"]["mask"])
        with SinogramReader(mask) as m, SinogramReader(target) as t, SinogramReader(gapped) as g:
            n = lay.planes
            frac, full, thin = m.read(0, n), t.read(0, n), g.read(0, n)
        assert mask.dtype.kind == "f" and ((frac > 0) & (frac < 1)).any() and (frac == 0).any()
        assert np.array_equal(thin[frac == 1], full[frac == 1]) and (thin[frac == 0] == 0).all()
        assert (thin <= full).all()
    blocks = study["dead_blocks"] if block is None else [block]

    run_hpc("convert", sim / study["files"]["target"], "-o", ds, "--quiet", check=True, env=ENV)
    manifest = json.loads((ds / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["studies"][0]["segments"] == list(lay.segments)
    run_hpc("train", "--config", TINY, f"data.path={ds}", f"train.run_dir={run}", "data.split=[1.0,0.0,0.0]",
            "data.batch_size=2", "train.samples=4", "train.val_every=0", "checkpoint.every=0", "log.every=2",
            "corrupt.use_stored_mask=false", "corrupt.dead_blocks=2", "model.base=2", "model.depth=1",
            "data.pad_multiple=2", check=True, env=ENV)
    ckpt = sorted((run / "checkpoints").glob("step-*.pt"))[-1]

    out = tmp_path / ("fixed.s.hdr" if target.kind == "siemens" else "fixed.hs")
    r = run_hpc("predict", "--checkpoint", ckpt, gapped.header_path, "--dead-blocks", ",".join(map(str, blocks)),
                "-o", out, "--batch", "8", check=True, env=ENV)
    hit = P.DeadBlockTables(lay).hit_planes(blocks)
    frac = P.dead_fractions(lay, blocks, np.flatnonzero(hit))
    work = hit.copy()
    work[np.flatnonzero(hit)] = ((frac < 1) & lay.valid_bins).reshape(hit.sum(), -1).any(1)
    n_work = int(work.sum()) * lay.tof_bins
    assert f"({n_work} with gaps through the model)" in r.stdout and 0 < n_work < lay.num_slices
    fixed = read_header(out)
    src_keys, out_keys = parse_header(gapped.header_path).fields, parse_header(out).fields
    assert {k: v for k, v in src_keys.items() if k != "name of data file"} == \
        {k: v for k, v in out_keys.items() if k != "name of data file"}  # every source key kept
    slices = np.flatnonzero(np.tile(work, lay.tof_bins))
    with SinogramReader(gapped) as a, SinogramReader(fixed) as b:
        same = np.flatnonzero(~np.tile(work, lay.tof_bins))[::37]  # copied planes, bytewise (sampled)
        for s in same:
            assert np.array_equal(a.read(s, s + 1), b.read(s, s + 1))
        k = slices[len(slices) // 2]  # a repaired plane: measured kept, gaps filled, virtual LORs 0
        m = P.dead_fractions(lay, blocks, [k % lay.planes])[0]
        valid = lay.valid([k % lay.planes])[0]
        before, after = a.read(k, k + 1)[0], b.read(k, k + 1)[0]
        assert np.array_equal(after[(m == 1) & valid], before[(m == 1) & valid])
        assert (after[~valid] == 0).all() and (after[(m < 1) & valid] >= before[(m < 1) & valid]).all()
    assert re.search(r"\d+ pixels predicted", r.stdout)
