"""`hpc demo --quick` end to end: simulate -> convert -> train -> evaluate -> predict, real files."""
from __future__ import annotations

import json

from hpc.io.headers import read_header
from hpc.io.sinogram import SinogramReader

from helpers import run_hpc


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    # ~1 min alone; the timeout leaves room for a loaded machine (CI once took > 300 s beside a benchmark)
    r = run_hpc("demo", "--quick", "-o", out, "--seed", "1", timeout=900, env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "held-out in-gap NMSE (vs noise-free counts; vs measured)" in r.stdout
    assert "UNet vs linear interpolation inside the gaps" in r.stdout
    assert "wandb sync " in r.stdout
    summary = json.loads((out / "eval" / "metrics.json").read_text())
    results = summary["results"]
    tuned = summary["tuning"]  # the fair protocol: parameters chosen on 3 validation studies, none held out
    assert len(tuned["studies"]) == 3 and not set(tuned["studies"]) & set(results)
    iters = tuned["params"]["reproject"]["iters"]
    assert iters["source"] == "tuned" and iters["scores"]
    assert "nmse_gap_true" in summary["comparison"] and summary["recommend"]["command"].startswith("hpc predict")
    assert "held-out verdicts" in r.stdout
    methods = {"unet", "reproject", "reproject3d", "axial3d", "biharmonic", "linear"}
    assert set(results["overall"]) == methods
    assert all("nmse_gap_true" in v and "nmse_gap_meas" in v for v in results["overall"].values())
    images = json.loads((out / "eval" / "metrics.json").read_text())["images"]["overall"]
    assert set(images) == methods | {"full", "gapped"}
    assert (out / "eval" / "report.md").read_text().count("| overall |") == 6 + 8
    held_out = json.loads((out / "sim" / "studies.json").read_text())["studies"][-1]
    assert (out / "eval" / "panels" / f"{held_out['id']}.png").stat().st_size > 0
    src = read_header(out / "sim" / held_out["files"]["gaps"])
    fixed = read_header(out / "predict" / f"{held_out['id']}_repaired.hs")
    assert (fixed.kind, fixed.dtype, fixed.segments, fixed.axial_counts) == \
        (src.kind, src.dtype, src.segments, src.axial_counts)
    mask = read_header(out / "sim" / held_out["files"]["mask"])
    with SinogramReader(src) as a, SinogramReader(fixed) as b, SinogramReader(mask) as m:
        measured = m.read(0, src.num_slices) == 1
        assert (a.read(0, src.num_slices)[measured] == b.read(0, src.num_slices)[measured]).all()
    assert list((out / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    # the denoising task: a denoiser trained on thinnings, scored on the held-out twins with tuned physics
    dn = json.loads((out / "eval-denoise" / "metrics.json").read_text())
    assert dn["task"] == "denoise" and set(dn["results"]) == {held_out["id"], "overall"}
    assert set(dn["results"]["overall"]) == {"unet", "reproject", "gauss", "scaled"}
    assert dn["tuning"]["params"]["gauss"]["sigma"]["source"] == "tuned" and len(dn["tuning"]["studies"]) == 3
    assert "best denoiser on NMSE vs the noise-free counts" in r.stdout
    assert (out / "eval-denoise" / "panels" / f"{held_out['id']}.png").stat().st_size > 0
    (dn_run,) = (out / "eval-denoise" / "wandb").glob("offline-run-*")
    assert f"wandb sync {dn_run}" in r.stdout
    r = run_hpc("demo", "--quick", "-o", out)  # never writes into a used directory
    assert r.returncode == 2 and "not empty" in r.stderr
