"""bench/gpu_check.sh without a GPU: valid bash, its help, and every stage run at toy sizes on the
CPU (--cpu-smoke) into the one JSON file the GPU run writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_script_is_valid_bash_and_documents_its_stages():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    r = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    for stage in ("tests", "step", "loader", "train", "--wheels", "--cpu-smoke"):
        assert stage in r.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage_into_one_json(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "-o", str(tmp_path / "out")], capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    stages = result["stages"]
    assert set(stages) == {"tests", "step", "loader", "train"}
    assert stages["tests"]["rc"] == 0 and stages["tests"]["junit"]["tests"] >= 4  # collected, skipped on CPU
    assert stages["step"]["rc"] == 0 and stages["step"]["rows"]["rows"][0]["preset"] == "badblock"
    rows = stages["loader"]["rows"]
    assert stages["loader"]["rc"] == 0 and {"backend", "workers", "slices_per_s", "vs_sequential"} <= set(rows[0])
    assert "step_samples_per_s" in rows[0] and "ratio" in rows[0]
    # the smoke trains a fixed 16 samples (the GPU run is stopped by its 2-minute limit instead)
    assert stages["train"]["rc"] == 0 and stages["train"]["samples"] == 16
    assert result["machine"]["gpu"] == "none"
