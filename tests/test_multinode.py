"""Distributed training across two real Slurm nodes (tests/cluster/harness.py --nodes 2: node1 and
node2 are network + UTS namespaces on a private bridge, each with its own slurmd and hostname).

Each test puts one rank on each node, so MASTER_ADDR resolution, the gloo/c10d connections and
Slurm's step launch all cross a node boundary: `srun -N2` DDP gives the union-batch gradients,
`torchrun --nnodes 2 --rdzv-backend c10d` under srun does too, `hpc submit --nodes 2` trains to the
end, a 2-node job preempted with USR2 checkpoints, requeues and resumes to the exact step count, and
`hpc predict` splits studies over the two nodes."""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from dist_worker import HERE as DIST_WORKER
from dist_worker import check_grads
from helpers import ROOT, hpc_cmd, run_hpc

pytestmark = [pytest.mark.slurm, pytest.mark.multinode]
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
ONE_PER_NODE = ["-N2", "--ntasks-per-node=1", "--cpus-per-task=1"]


def job_env(cluster) -> dict[str, str]:
    """The cluster's env without torch's or a launcher's variables from the calling shell."""
    env = {k: v for k, v in cluster.env.items() if k not in TORCH_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    return env | {"SLURM_CONF": str(cluster.conf), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from cluster.tiny_data import make_dataset

    return make_dataset(tmp_path_factory.getbasetemp() / "launch-data")


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def test_srun_two_nodes_ddp_matches_union_batch(slurm2, tmp_path):
    out = tmp_path / "grads.pt"
    r = slurm2.srun([*ONE_PER_NODE, "bash", "-c", f'echo "$SLURM_PROCID $(hostname)" >> {tmp_path}/hosts; '
                     f'exec {sys.executable} {DIST_WORKER} grads {out}'],
                    timeout=240, env=job_env(slurm2), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    check_grads(out, "srun")
    assert sorted((tmp_path / "hosts").read_text().splitlines()) == ["0 node1", "1 node2"]


def test_torchrun_c10d_rendezvous_across_two_nodes_under_srun(slurm2, tmp_path):
    """One torchrun agent per node (srun), rendezvous with the c10d backend on node1: the elastic
    agents agree on ranks, and DDP gives the union-batch gradients."""
    out = tmp_path / "grads.pt"
    port = 29000 + int(time.time()) % 1000
    agent = (f"exec {sys.executable} -m torch.distributed.run --nnodes 2 --nproc_per_node 1 "
             f"--rdzv-backend c10d --rdzv-endpoint node1:{port} --rdzv-id $SLURM_JOB_ID "
             f"{DIST_WORKER} grads {out}")
    r = slurm2.srun([*ONE_PER_NODE, "bash", "-c", agent], timeout=300, env=job_env(slurm2), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    check_grads(out, "torch")


@pytest.mark.slow
def test_hpc_submit_two_nodes_trains_to_completion(slurm2, dataset, tmp_path):
    from cluster.tiny_data import train_overrides

    r = run_hpc("submit", "--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "5",
                "--wait", "train.run_dir=runs/two", *train_overrides(dataset, 48), cwd=tmp_path,
                env=job_env(slurm2), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.split()[2]
    assert "(slurm: 2 node(s) x 1 task(s))" in r.stdout and f"job {job} finished: step 48" in r.stdout
    assert max(rec.get("step", 0) for rec in _records(tmp_path / "runs" / "two")) == 48
    # Where the ranks ran, from the tasks' own logs (submitit prints each task's hostname and rank).
    # Not sacct's NodeList: its completion record was once written as "node1" for a job that ran
    # on both nodes (CI of 2026-12-07), the accounting view of a 2-node job that was completing.
    logs = sorted((tmp_path / "runs" / "slurm").glob(f"{job}_*_log.out"))
    envs = {m for p in logs for m in re.findall(r"hostname=(node\d), local_rank=0\(1\), node=(\d)\(2\), "
                                                  r"global_rank=(\d)\(2\)", p.read_text())}
    assert envs == {("node1", "0", "0"), ("node2", "1", "1")}, [p.read_text()[-2000:] for p in logs]


@pytest.mark.slow
def test_two_node_job_preempted_checkpoints_requeues_and_resumes_to_the_exact_count(slurm2, dataset, tmp_path):
    from cluster.tiny_data import train_overrides

    samples = 1024
    r = run_hpc("submit", "--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "5",
                "--signal-delay", "30", "train.run_dir=runs/pre", *train_overrides(dataset, samples),
                cwd=tmp_path, env=job_env(slurm2), check=True)
    job = r.stdout.split()[2]
    run_dir = tmp_path / "runs" / "pre"
    deadline = time.monotonic() + 120
    while not _records(run_dir):
        assert time.monotonic() < deadline, f"job {job} wrote no metrics: {slurm2.states(job)}"
        time.sleep(0.3)
    slurm2.run(["scancel", "--signal=USR2", job])  # what Slurm sends the tasks before the limit
    assert slurm2.wait(job, timeout=240) == "COMPLETED"
    log = (tmp_path / "runs" / "slurm" / f"{job}_0_log.out").read_text()
    assert log.count("Starting with JobEnvironment") == 2, log  # two attempts: requeued once
    recs = _records(run_dir)
    assert max(rec.get("step", 0) for rec in recs) == samples
    seen = [rec["step"] for rec in recs if rec["kind"] == "train"]
    assert seen == sorted(seen) and len(seen) == len(set(seen))  # none repeated, none lost


def test_hpc_predict_ranks_on_two_nodes_split_the_studies(slurm2, tmp_path):
    """srun -N2: each node's rank repairs every other study; the outputs equal a 1-process run."""
    from helpers import convert_studies, make_checkpoint, studies

    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt)
    ds = convert_studies(tmp_path, studies(tmp_path, 3))
    run_hpc("predict", "--checkpoint", ckpt, ds, "-o", tmp_path / "one", "--quiet", check=True)
    r = slurm2.srun([*ONE_PER_NODE, "bash", "-c", 'exec "$@" 2>&1 | sed "s/^/$(hostname): /"', "sh",
                     *hpc_cmd("predict", "--checkpoint", ckpt, ds, "-o", tmp_path / "two", "--quiet",
                              "--device", "cpu")], timeout=300, env=job_env(slurm2), cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wrote = sorted(ln.split(":")[0] for ln in r.stdout.splitlines() if "wrote " in ln)
    assert wrote == ["node1", "node1", "node2"], r.stdout  # rank 0 studies 0 and 2, rank 1 study 1
    one, two = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 3
    for a, b in zip(one, two, strict=True):
        with h5py.File(a) as fa, h5py.File(b) as fb:
            np.testing.assert_array_equal(fa["repaired"][:], fb["repaired"][:])


def _config_file(path: Path, overrides: list[str]) -> Path:
    """A config YAML holding `section.key=value` overrides (what a user's config file would)."""
    import yaml

    tree: dict = {}
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.slow
def test_a_cut_link_ends_the_attempt_within_the_timeout_and_the_job_requeues(slurm2, dataset, tmp_path):
    """node2's link goes down mid-training for dist.timeout_s + 5 s (a network partition that heals,
    as after a switch reboot). The ranks' next collective gets no answer: within dist.timeout_s each
    prints one line naming the timeout and exits 75, the plain template's requeue policy applies
    (`scontrol requeue`, at most launch.max_requeues times), and the next attempt resumes from the
    newest checkpoint to the exact final count. Nothing hangs."""
    from cluster.tiny_data import train_overrides

    timeout_s, samples = 15, 2048
    _config_file(tmp_path / "c.yaml", [*train_overrides(dataset, samples), "checkpoint.every=128", "log.every=32",
                                       f"dist.timeout_s={timeout_s}"])
    r = run_hpc("sbatch", "-t", "plain", "--config", "c.yaml", "--nodes", "2", "--tasks-per-node", "1",
                "--cpus-per-task", "1", "--time", "10", "train.run_dir=runs/cut", check=True, env=job_env(slurm2),
                cwd=tmp_path)
    job = r.stdout.split()[2].rstrip(":")
    run_dir, log_file = tmp_path / "runs" / "cut", tmp_path / "runs" / "slurm" / f"cut-{job}.out"
    deadline = time.monotonic() + 180
    while not list((run_dir / "checkpoints").glob("step-*.pt")) or max(
            (rec["step"] for rec in _records(run_dir) if rec["kind"] == "train"), default=0) < 256:
        assert time.monotonic() < deadline, f"job {job} is not training: {slurm2.states(job)}"
        time.sleep(0.3)
    down = time.monotonic()
    slurm2.link("node2", up=False)
    try:
        seen = None
        while time.monotonic() < down + timeout_s + 5:
            if seen is None and "hpc train: error: rank 0" in log_file.read_text():
                seen = time.monotonic() - down
            time.sleep(0.2)
    finally:
        slurm2.link("node2", up=True)
    assert slurm2.wait(job, timeout=300) == "COMPLETED", log_file.read_text()[-3000:]
    log = log_file.read_text()
    assert seen is not None and seen < timeout_s + 10, (seen, log[-3000:])  # not a hang: the timeout ended it
    errors = [ln for ln in log.splitlines() if "hpc train: error: rank" in ln]
    assert {ln.split("rank ")[1].split()[0] for ln in errors} == {"0", "1"}, log[-3000:]
    assert all(f"dist.timeout_s={timeout_s}" in ln for ln in errors), errors
    assert "requeueing job" in log and "attempt 1" in log
    recs = _records(run_dir)
    assert max(rec["step"] for rec in recs) == samples
    resumed = next(ln for ln in log.splitlines() if "resum" in ln.lower())
    assert "step" in resumed, resumed
