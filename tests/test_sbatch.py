"""`hpc sbatch`: the rendered templates (golden files), their errors, and the plain template's
preemption path run on the real test cluster."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from helpers import run_hpc

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"  # regenerate: UPDATE_GOLDEN=1 pytest tests/test_sbatch.py
WORKDIR = "/scratch/proj/hpc"  # fixed so the goldens do not depend on where the tests run

CASES = {
    "dgx": ["--nodes", "4", "--gpus-per-node", "8", "--cpus-per-task", "12", "--partition", "batch",
            "--account", "pet", "--time", "240", "--mem-gb", "900", "--stage-to", "/raid/pet",
            "--venv", "/scratch/proj/hpc/.venv", "optim.lr=3e-4", "data.path=/scratch/proj/pet"],
    "pyxis": ["--nodes", "2", "--gpus-per-node", "8", "--qos", "high", "--image",
              "/scratch/images/hpc+24.10.sqsh", "--mounts", "/scratch:/scratch", "model.name=unet"],
    "singularity": ["--gpus-per-node", "4", "--constraint", "a100", "--image", "hpc.sif",
                    "--signal-delay", "300", "loss.msssim=0.5"],
    "plain": ["--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "30", "--venv", "/opt/venv",
              "--max-requeues", "3", "log.name=two words"],
}


@pytest.fixture
def config(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  run_dir: runs/big\n")
    return tmp_path / "c.yaml"


@pytest.mark.parametrize("template", sorted(CASES))
def test_rendered_template_matches_golden(template, config):
    r = run_hpc("sbatch", "-t", template, "--print", "--config", config.name, "--workdir", WORKDIR,
                *CASES[template], check=True, cwd=config.parent)
    golden = GOLDEN / f"{template}.sbatch"
    if UPDATE:
        golden.write_text(r.stdout)
    assert r.stdout == golden.read_text()
    subprocess.run(["bash", "-n"], input=r.stdout, text=True, check=True)  # valid bash


def test_only_given_options_become_sbatch_lines(config):
    r = run_hpc("sbatch", "-t", "plain", "--print", "--config", str(config), "--workdir", WORKDIR,
                "--gpus-per-node", "2", check=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=2" in lines and "#SBATCH --gpus-per-node=2" in lines
    assert not [ln for ln in lines if ln.split("=")[0] in {"#SBATCH --partition", "#SBATCH --mem"}]


def test_container_templates_need_an_image(config):
    r = run_hpc("sbatch", "-t", "pyxis", "--print", "--config", str(config), "--workdir", WORKDIR)
    assert r.returncode == 2 and "--image is required" in r.stderr


def test_whitespace_in_an_sbatch_value_is_refused(config):
    r = run_hpc("sbatch", "-t", "plain", "--print", "--config", str(config), "--workdir", WORKDIR,
                "--partition", "a b")
    assert r.returncode == 2 and "--partition='a b'" in r.stderr


@pytest.mark.slurm
def test_plain_template_requeues_on_usr2_and_resumes(slurm, tmp_path_factory, tmp_path):
    """The rendered plain template on the real cluster: USR2 to the batch shell -> tasks checkpoint
    and exit 75 -> `scontrol requeue` -> the next attempt resumes. The trainer here is a stand-in
    `hpc` in a throwaway venv (a counter that saves itself on USR2), so that this test is about the
    script's signal path alone; tests/test_submit.py runs the real trainer."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f"export PATH={venv}/bin:$PATH\n")
    fake = venv / "bin" / "hpc"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        state={tmp_path}/step.$SLURM_PROCID
        step=$(cat $state 2>/dev/null || echo 0)
        echo "rank $SLURM_PROCID attempt ${{SLURM_RESTART_COUNT:-0}} from $step args $*"
        stop=0; trap 'stop=1' USR2
        while (( step < 40 )); do
            sleep 0.25; step=$((step + 1))
            if (( stop )); then echo $step > $state; exit 75; fi
        done
        echo $step > $state
        """))
    fake.chmod(0o755)
    from cluster.tiny_data import make_dataset

    dataset = make_dataset(tmp_path_factory.getbasetemp() / "launch-data")  # sbatch checks data.path
    (tmp_path / "c.yaml").write_text(f"data:\n  path: {dataset}\ntrain:\n  run_dir: runs/rq\n")
    r = run_hpc("sbatch", "-t", "plain", "--config", "c.yaml", "--venv", str(venv),
                "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "5", "optim.lr=0.01",
                check=True, env=slurm.env, cwd=tmp_path)
    job = r.stdout.split()[2].rstrip(":")
    log_file = tmp_path / "runs" / "slurm" / f"rq-{job}.out"
    deadline = time.monotonic() + 60
    while not log_file.exists() or log_file.read_text().count("attempt 0 from 0") < 2:
        assert time.monotonic() < deadline, slurm.states(job)
        time.sleep(0.2)
    time.sleep(1)  # a few steps in
    slurm.run(["scancel", "--batch", "--signal=USR2", job])  # what --signal=B:USR2@N delivers
    assert slurm.wait(job, timeout=90) == "COMPLETED"
    log = log_file.read_text()
    assert "requeueing job" in log and "attempt 1 from" in log, log
    assert "args train --config c.yaml train.run_dir=runs/rq optim.lr=0.01" in log
    # resumed where it stopped: exactly 40 steps per rank in total, none lost or repeated
    assert [(tmp_path / f"step.{r}").read_text().strip() for r in (0, 1)] == ["40", "40"]


@pytest.mark.slurm
@pytest.mark.slow
def test_plain_template_trains_a_two_task_job_to_completion(slurm, tmp_path_factory, tmp_path):
    """The plain template rendered for the test cluster, with this venv and the real trainer."""
    from cluster.tiny_data import make_dataset, train_overrides

    dataset = make_dataset(tmp_path_factory.getbasetemp() / "launch-data")
    tree = {}
    for item in train_overrides(dataset, 64):  # the same settings as a config file
        key, value = item.split("=", 1)
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = yaml.safe_load(value)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    r = run_hpc("sbatch", "-t", "plain", "--config", "c.yaml", "--tasks-per-node", "2",
                "--cpus-per-task", "1", "--time", "5", "train.run_dir=runs/plain",
                check=True, env=slurm.env, cwd=tmp_path)
    job = r.stdout.split()[2].rstrip(":")
    state = slurm.wait(job, timeout=300)
    assert state == "COMPLETED", (tmp_path / "runs" / "slurm" / f"plain-{job}.out").read_text()
    run_dir = tmp_path / "runs" / "plain"
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert max(rec.get("step", 0) for rec in records) == 64
    assert list((run_dir / "checkpoints").glob("step-*.pt"))
