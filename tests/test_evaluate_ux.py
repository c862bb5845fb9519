"""`hpc evaluate` keeps its word (issue 26.5, 26.7, 27): --slices bounds the image domain too
(counted in metrics.json and on the console), --no-images says what it skips, the W&B run is named,
grouped and configured after the training run that made the checkpoint (read back from its offline
file), and -o inside the input dataset or simulation, or --slices < 0, is one line and exit 2.
A real training run (W&B offline) on an `hpc simulate --scanner test` study makes the checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import TINY, hpc_cmd


def run_hpc(*args, check: bool = False) -> subprocess.CompletedProcess:
    """The real CLI without this process's WANDB_* variables (the command's options decide)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run(hpc_cmd(*args), capture_output=True, text=True, env=env, timeout=600)
    if check and r.returncode:
        raise AssertionError(f"hpc {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """sim: 3 studies on the `test` scanner (4 direct planes of 12 x 12), the last a held-out test
    study; ds: the first two converted with their gap masks; run: a tiny training on them."""
    root = tmp_path_factory.mktemp("ev")
    sim, ds, run = root / "sim", root / "ds", root / "run"
    run_hpc("simulate", "-o", sim, "--studies", "3", "--test-studies", "1", "--scanner", "test", "--counts", "2e5",
            "--dead-blocks", "1", "--seed", "3", check=True)
    run_hpc("convert", sim / "s000.s.hdr", sim / "s001.s.hdr", "--mask", sim / "s000_mask.s.hdr",
            sim / "s001_mask.s.hdr", "-o", ds, "--quiet", check=True)
    run_hpc("train", "--config", TINY, f"data.path={ds}", f"train.run_dir={run}", "data.train_studies=[s000]",
            "data.val_studies=[s001]", "data.batch_size=2", "train.samples=8", "train.val_every=8",
            "log.wandb=offline", "log.project=hpc-ux", "log.group=evalgrp", "log.name=mine", check=True)
    return {"sim": sim, "ds": ds, "run": run, "ckpt": run / "checkpoints" / "step-00000008.pt"}


def test_slices_bound_the_image_domain_and_no_images_says_what_it_skips(trained, tmp_path):
    out = tmp_path / "ev"
    r = run_hpc("evaluate", "--checkpoint", trained["ckpt"], "--simulation", trained["sim"], "-o", out,
                "--slices", "2", "--baselines", "linear", "--quiet", check=True)
    m = json.loads((out / "metrics.json").read_text())
    assert m["scored"]["s002"] == {"slices": 2, "image_planes": 2}  # not the study's 4 direct planes
    assert "scored: 2 slices of 1 studies; images: 2 direct planes reconstructed for each version" in r.stdout
    assert m["images"]["s002"]["unet"]["img_nmse_full"] > 0
    r = run_hpc("evaluate", "--checkpoint", trained["ckpt"], "--simulation", trained["sim"], "-o", tmp_path / "n",
                "--slices", "2", "--baselines", "linear", "--no-images", "--quiet", check=True)
    assert "images: not evaluated (--no-images)" in r.stdout
    assert json.loads((tmp_path / "n" / "metrics.json").read_text())["scored"]["overall"]["image_planes"] == 0
    assert "no OSEM reconstruction" in run_hpc("evaluate", "--help", check=True).stdout


def test_wandb_run_is_named_grouped_and_linked_to_the_training_run(trained, tmp_path):
    from test_logger import written_records

    out = tmp_path / "ev"
    run_hpc("evaluate", "--checkpoint", trained["ckpt"], "--simulation", trained["sim"], "-o", out, "--slices", "1",
            "--baselines", "linear", "--no-images", "--wandb", "offline", "--quiet", check=True)
    (path,) = out.glob("wandb/offline-run-*/run-*.wandb")
    run = next(r.run for r in written_records(path) if r.WhichOneof("record_type") == "run")
    assert (run.project, run.run_group, run.job_type, run.display_name) == ("hpc-ux", "evalgrp", "evaluate",
                                                                            "mine-eval")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["train_run_id"] == (trained["run"] / "wandb_id").read_text().strip()
    assert config["checkpoint"] == str(trained["ckpt"]) and config["slices"] == 1 and config["images"] is False
    assert config["train"]["log"]["name"] == "mine"  # the training run's resolved config


def test_output_inside_the_input_or_negative_slices_is_one_line(trained, tmp_path):
    common = ["--checkpoint", trained["ckpt"], "--baselines", "linear", "--quiet"]
    for src, out in (("--dataset", trained["ds"]), ("--dataset", trained["ds"] / "eval"),
                     ("--simulation", trained["sim"] / "eval")):
        r = run_hpc("evaluate", *common, src, trained["ds"] if src == "--dataset" else trained["sim"],
                    "--split", "all", "-o", out) if src == "--dataset" else \
            run_hpc("evaluate", *common, src, trained["sim"], "-o", out)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().endswith("write the evaluation elsewhere (-o)") and len(r.stderr.splitlines()) == 1
    assert not (trained["ds"] / "eval").exists() and not (trained["ds"] / "report.md").exists()
    assert not (trained["sim"] / "eval").exists()
    r = run_hpc("evaluate", *common, "--simulation", trained["sim"], "-o", tmp_path / "x", "--slices", "-1")
    assert r.returncode == 2 and "--slices >= 0" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "x").exists()
