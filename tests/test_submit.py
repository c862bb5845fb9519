"""`hpc submit` on the real Slurm test cluster: the submitit requeue hand-over, the CLI's errors,
and (with the real trainer) a 2-task DDP job and a preempted job that resumes to the exact step
count."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from hpc.config import Config
from hpc.errors import EXIT_REQUEUE
from hpc.launch.submit import make_executor, requeue_on_exit75

from helpers import run_hpc

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # jobs cannot import tests/


class Counter(submitit.helpers.Checkpointable):
    """A stand-in for the trainer with the same signal contract (USR2 -> save -> exit 75), so this
    test is about the launch layer's hand-over to submitit alone."""

    def __init__(self, state_dir: str, steps: int):
        self.state_dir, self.steps = Path(state_dir), steps

    def __call__(self) -> int:
        return requeue_on_exit75(self.count)

    def count(self) -> int:
        rank = os.environ["SLURM_PROCID"]
        state = self.state_dir / f"step.{rank}"
        step = int(state.read_text()) if state.exists() else 0
        with open(self.state_dir / f"attempts.{rank}", "a") as f:
            f.write(f"{os.environ.get('SLURM_RESTART_COUNT', '0')} {step}\n")
        stop = []
        signal.signal(signal.SIGUSR2, lambda *_: stop.append(1))
        while step < self.steps:
            time.sleep(0.1)
            step += 1
            if stop:
                state.write_text(str(step))
                sys.exit(EXIT_REQUEUE)
        state.write_text(str(step))
        return step


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


@pytest.mark.slurm
def test_exit75_hands_over_to_submitit_which_requeues_and_resumes(slurm, tmp_path):
    cfg = Config()
    cfg.launch.log_dir, cfg.launch.tasks_per_node, cfg.launch.cpus_per_task = str(tmp_path / "logs"), 2, 1
    cfg.launch.time_min, cfg.launch.signal_delay_s = 5, 30
    job = make_executor(cfg, "counter").submit(Counter(str(tmp_path), steps=60))
    _wait_for(tmp_path / "attempts.1")
    time.sleep(1)
    job._interrupt(timeout=True)  # USR2 to the tasks, as Slurm sends it before the time limit
    assert job.results() == [60, 60]
    for rank in (0, 1):
        attempts = [ln.split() for ln in (tmp_path / f"attempts.{rank}").read_text().splitlines()]
        assert [a[0] for a in attempts] == ["0", "1"]  # requeued once by submitit
        assert 0 < int(attempts[1][1]) < 60  # the second attempt resumed mid-way
    assert slurm.wait(job.job_id, timeout=30) == "COMPLETED"


@pytest.mark.parametrize("flags, message", [
    (["--cluster", "nowhere"], "launch.cluster='nowhere': expected one of slurm | local | debug"),
    (["--cluster", "local", "--nodes", "2"], "launch.nodes=2: must be 1 with launch.cluster=local"),
])
def test_bad_launch_settings_are_one_line_errors(tmp_path, flags, message):
    (tmp_path / "c.yaml").write_text("train:\n  samples: 8\n")
    r = run_hpc("submit", "--config", "c.yaml", *flags, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slurm
def test_failing_job_with_wait_exits_1_with_the_error_line(slurm, dataset, tmp_path):
    """A job that passes the submit-time checks and fails in the job (a batch larger than the split)."""
    from cluster.tiny_data import train_overrides

    r = run_hpc("submit", "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "5", "--wait",
                *train_overrides(dataset, 8), "data.batch_size=1000", "train.run_dir=runs/bad", cwd=tmp_path,
                env=slurm.env, timeout=120)
    assert r.returncode == 1
    assert "failed: hpc.errors.ConfigError: split 'train': too few slices for data.batch_size=1000" in r.stderr


def test_unknown_override_is_refused_before_submitting(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  samples: 8\n")
    r = run_hpc("submit", "--config", "c.yaml", "--cluster", "local", "optim.lrr=1", cwd=tmp_path)
    assert r.returncode == 2 and "unknown key optim.lrr" in r.stderr
    assert not (tmp_path / "runs").exists()


# --- with the real trainer -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from cluster.tiny_data import make_dataset

    return make_dataset(tmp_path_factory.getbasetemp() / "launch-data")


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.slurm
@pytest.mark.slow
def test_two_task_ddp_job_trains_to_completion(slurm, dataset, tmp_path):
    from cluster.tiny_data import train_overrides

    r = run_hpc("submit", "--tasks-per-node", "2", "--cpus-per-task", "1",
                "--time", "5", "--wait", "train.run_dir=runs/ddp", *train_overrides(dataset, 64),
                cwd=tmp_path, env=slurm.env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.split()[2]
    assert "1 node(s) x 2 task(s)" in r.stdout and f"job {job} finished: step 64" in r.stdout
    run_dir = tmp_path / "runs" / "ddp"
    assert max(rec.get("step", 0) for rec in _records(run_dir)) == 64
    assert list((run_dir / "checkpoints").glob("step-*.pt"))
    assert slurm.wait(job, timeout=60) == "COMPLETED"
    # both ranks ran (one log per task) in one world of 2
    assert (tmp_path / "runs" / "slurm" / f"{job}_1_log.out").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes_to_the_exact_count(slurm, dataset, tmp_path):
    from cluster.tiny_data import train_overrides

    samples = 1024
    r = run_hpc("submit", "--tasks-per-node", "2", "--cpus-per-task", "1",
                "--time", "5", "--signal-delay", "30", "train.run_dir=runs/pre",
                *train_overrides(dataset, samples), cwd=tmp_path, env=slurm.env, check=True)
    job = r.stdout.split()[2]
    run_dir = tmp_path / "runs" / "pre"
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() or not _records(run_dir):
        assert time.monotonic() < deadline, f"job {job} wrote no metrics: {slurm.states(job)}"
        time.sleep(0.3)
    slurm.run(["scancel", "--signal=USR2", job])  # what Slurm sends the tasks before the limit
    assert slurm.wait(job, timeout=240) == "COMPLETED"
    log = (tmp_path / "runs" / "slurm" / f"{job}_0_log.out").read_text()
    assert log.count("Starting with JobEnvironment") == 2, log  # two attempts: requeued once
    recs = _records(run_dir)
    assert max(rec.get("step", 0) for rec in recs) == samples
    # no repeated or lost steps: the training records' sample counts never go back
    seen = [rec["step"] for rec in recs if rec["kind"] == "train"]
    assert seen == sorted(seen) and len(seen) == len(set(seen))


@pytest.mark.slow
def test_local_cluster_runs_the_same_job_without_slurm(dataset, tmp_path):
    """--cluster local: submitit's local executor, 2 tasks as local processes (a laptop)."""
    from cluster.tiny_data import train_overrides

    r = run_hpc("submit", "--cluster", "local", "--tasks-per-node", "2", "--wait",
                "train.run_dir=runs/loc", *train_overrides(dataset, 32), cwd=tmp_path,
                env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(local: 1 node(s) x 2 task(s))" in r.stdout and "finished: step 32" in r.stdout
    assert max(rec.get("step", 0) for rec in _records(tmp_path / "runs" / "loc")) == 32
