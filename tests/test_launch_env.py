"""Launcher env -> torch env: Slurm node lists, srun variables, submitit's JobEnvironment, and a
real `mpirun -np 2` (mpi4py broadcast of rank 0's host and port)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, mpirun_cmd
from hpc.errors import ConfigError
from hpc.launch import env as E

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST",
               "SLURM_JOB_ID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for var in LAUNCH_VARS + E.TORCH_VARS:
        # set first so that monkeypatch records the original state and removes what
        # setup_torch_env() exports (later tests' subprocesses must not inherit RANK=...)
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("PATH", "/usr/bin/nonexistent")  # no scontrol: exercise the parser
    return monkeypatch


def torch_env() -> tuple:
    return tuple(os.environ.get(v) for v in E.TORCH_VARS)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node7", ["node7"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[9-10],b2,c[008]", ["a9", "a10", "b2", "c008"]),
    ("dgx-[1-2]", ["dgx-1", "dgx-2"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert E.expand_nodelist(nodelist) == hosts


def test_bad_nodelist_names_the_variable():
    with pytest.raises(ConfigError, match=r"SLURM_JOB_NODELIST='n\[a-b\]'"):
        E.expand_nodelist("n[a-b]")


def test_plain_process_sets_nothing(clean_env):
    assert E.setup_torch_env() == "none"
    assert torch_env() == (None,) * 5


def test_torchrun_variables_win(clean_env):
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_NTASKS", "4")
    for k, v in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="29500").items():
        clean_env.setenv(k, v)
    assert E.setup_torch_env() == "torch"
    assert torch_env() == ("1", "2", "1", "h", "29500")


def test_srun_variables(clean_env):
    env = dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1",
               SLURM_JOB_NODELIST="dgx[03-04]", SLURM_JOB_ID="123456")
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert E.setup_torch_env() == "srun"
    assert torch_env() == ("5", "8", "1", "dgx03", str(E.job_port("123456")))
    assert E.PORT_BASE <= E.job_port("123456") < E.PORT_BASE + E.PORT_SPAN


def test_submitit_local_job_environment(clean_env):
    """submitit's real JobEnvironment, as its local executor sets it up for task 1 of 2."""
    env = dict(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="4242", SUBMITIT_LOCAL_NTASKS="2",
               SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_GLOBALID="1",
               SUBMITIT_LOCAL_LOCALID="1")
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert E.setup_torch_env() == "submitit"
    rank, world, local, addr, port = torch_env()
    assert (rank, world, local, port) == ("1", "2", "1", str(E.job_port("4242")))
    assert addr  # submitit's own host list (this machine)


WRITE_ENV = ("import json, os, sys; from hpc.launch.env import setup_torch_env, TORCH_VARS; "
             "name = setup_torch_env(); row = [name] + [os.environ[v] for v in TORCH_VARS]; "
             "open(os.path.join(sys.argv[1], os.environ['RANK']), 'w').write(json.dumps(row))")


@pytest.mark.mpi
def test_mpirun_two_ranks_agree_on_master(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    r = subprocess.run([*mpirun_cmd(2), sys.executable, "-c", WRITE_ENV, str(tmp_path)], capture_output=True,
                       text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = [json.loads((tmp_path / str(rank)).read_text()) for rank in (0, 1)]
    assert [row[:4] for row in rows] == [["mpi", "0", "2", "0"], ["mpi", "1", "2", "1"]]
    assert rows[0][4:] == rows[1][4:]  # same MASTER_ADDR and MASTER_PORT on both ranks
    assert int(rows[0][5]) > 0
