"""The real single-node Slurm test cluster (tests/cluster/harness.py): what every launch test and
.ci/run rely on — it starts, runs batch and multi-task jobs, keeps accounting, has fake GPUs and
requeues quickly."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm
HARNESS = Path(__file__).parent / "cluster" / "harness.py"


def test_node_is_idle_and_configured(slurm):
    r = slurm.run(["sinfo", "-h", "-n", slurm.node, "-o", "%T %c %G"])
    state, cpus, gres = r.stdout.split()
    assert state in {"idle", "mixed", "allocated"}
    assert int(cpus) == slurm.cpus and gres == f"gpu:{slurm.gpus}"


def test_srun_two_tasks_get_distinct_ranks(slurm):
    r = slurm.srun(["-n", "2", "bash", "-c", "echo $SLURM_PROCID $SLURM_NTASKS $SLURM_LOCALID"])
    assert r.returncode == 0, r.stderr
    rows = sorted(tuple(map(int, ln.split())) for ln in r.stdout.splitlines())
    assert rows == [(0, 2, 0), (1, 2, 1)]


def test_sbatch_job_completes_and_is_accounted(slurm, tmp_path):
    out = tmp_path / "job.out"
    job = slurm.sbatch(f"#!/bin/bash\n#SBATCH -n 2 -o {out}\nsrun hostname\n")
    assert slurm.wait(job, timeout=60) == "COMPLETED"
    assert out.read_text().split() == [slurm.node, slurm.node]
    # sacct answers from slurmdbd (which slurmctld updates asynchronously): submitit's job states
    # depend on it
    deadline = time.monotonic() + 30
    while (acct := slurm.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"]).stdout.split()) != ["COMPLETED"]:
        assert time.monotonic() < deadline, f"sacct still says {acct}"
        time.sleep(0.5)


def test_failing_job_is_reported_failed(slurm, tmp_path):
    job = slurm.sbatch("#!/bin/bash\nexit 3\n", "-o", str(tmp_path / "fail.out"))
    assert slurm.wait(job, timeout=60) == "FAILED"


def test_fake_gpus_are_allocated_as_gres(slurm):
    r = slurm.srun([f"--gres=gpu:{slurm.gpus}", "bash", "-c", "echo $CUDA_VISIBLE_DEVICES"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ",".join(str(i) for i in range(slurm.gpus))


@pytest.mark.slow
def test_requeued_job_runs_again_quickly(slurm, tmp_path):
    """scontrol requeue brings a job back within seconds (cred_expire=5, sched_interval=2): the
    preemption tests of `hpc submit` depend on it."""
    log = tmp_path / "attempts"
    script = (f"#!/bin/bash\n#SBATCH -o {tmp_path / 'rq.out'}\n"
              f"echo ${{SLURM_RESTART_COUNT:-0}} >> {log}\n"
              f"if [ ! -e {tmp_path / 'requeued'} ]; then touch {tmp_path / 'requeued'}; "
              "scontrol requeue $SLURM_JOB_ID; sleep 30; fi\n")
    job = slurm.sbatch(script)
    assert slurm.wait(job, timeout=90) == "COMPLETED"
    assert log.read_text().split() == ["0", "1"]


def test_cli_status_reports_the_running_cluster(slurm):
    r = subprocess.run([sys.executable, str(HARNESS), "status"], capture_output=True, text=True,
                       timeout=60, env={**slurm.env, "HPC_SLURM_DIR": str(slurm.root)})
    assert r.returncode == 0, r.stderr
    assert f"SLURM_CONF={slurm.conf}" in r.stdout and slurm.node in r.stdout


def test_stop_finds_daemons_of_an_interrupted_start_by_their_pid_files(tmp_path):
    """A start killed before it saved state.json leaves daemons that only their own pid files know;
    `stop` (and the next start) end them, and leave a process whose PID a file names but that is
    not that daemon alone. Real processes, no Slurm needed."""
    sys.path.insert(0, str(HARNESS.parent))
    import harness

    (tmp_path / "run").mkdir()
    fake = subprocess.Popen(["bash", "-c", "exec -a slurmctld sleep 300"])  # cmdline: "slurmctld 300"
    other = subprocess.Popen(["sleep", "300"])
    try:
        cmdline = Path(f"/proc/{fake.pid}/cmdline")
        deadline = time.monotonic() + 30
        while not cmdline.read_bytes().startswith(b"slurmctld") and time.monotonic() < deadline:
            time.sleep(0.01)  # bash has not exec'd yet (a loaded machine: the full suite once lost this race)
        (tmp_path / "run" / "slurmctld.pid").write_text(f"{fake.pid}\n")
        (tmp_path / "run" / "munged.pid").write_text(f"{other.pid}\n")  # a reused PID: not munged
        assert harness.stop_orphans(tmp_path) == ["slurmctld"]
        assert fake.wait(timeout=20) is not None and other.poll() is None
    finally:
        for p in (fake, other):
            p.kill()
            p.wait()
