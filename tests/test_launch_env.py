"""Launcher env -> torch env (hpc.distributed.launcher): which launcher (one precedence rule), srun
variables, submitit's JobEnvironment, the MPI detector, and a real `mpirun -np 2` (mpi4py broadcast
of rank 0's host and port). Node lists: tests/test_nodelist.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hpc.distributed import launcher as E
from hpc.errors import ConfigError

from helpers import ROOT, env_lines, mpirun_cmd

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST",
               "SLURM_JOB_ID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
               "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")


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


@pytest.mark.parametrize("env, launcher", [
    ({}, "none"),
    ({"RANK": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "OMPI_COMM_WORLD_RANK": "1",
      "OMPI_COMM_WORLD_SIZE": "2"}, "torch"),
    ({"SUBMITIT_EXECUTOR": "slurm", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, "submitit"),
    # mpirun inside an allocation: the ranks inherit their daemon's step (one task per node); MPI wins
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4"}, "mpi"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
    ({"SUBMITIT_EXECUTOR": "slurm", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "PMI_RANK": "1", "PMI_SIZE": "2"},
     "mpi"),
    # equal numbers too (rank 0 of `sbatch --wrap "mpirun -np 2"`; srun --mpi=pmi2): every rank picks MPI
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "PMI_RANK": "1", "PMI_SIZE": "2"}, "mpi"),
    ({"SLURM_PROCID": "1"}, "none"),  # half an srun step is none
    ({"PMI_RANK": "3", "PMI_SIZE": "4"}, "mpi"),
    ({"OMPI_COMM_WORLD_RANK": "", "OMPI_COMM_WORLD_SIZE": "2"}, "none"),
])
def test_detect_launcher_is_the_one_precedence_rule(env, launcher):
    assert E.detect_launcher(env) == launcher
    assert [name for name, _ in E.PRECEDENCE] == ["torch", "mpi", "submitit", "srun"]


def test_mpi_world_is_the_one_mpi_detector():
    assert E.mpi_world({}) is None
    assert E.mpi_world({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                        "OMPI_COMM_WORLD_LOCAL_RANK": "0"}) == (2, 4, 0)
    assert E.mpi_world({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}) == E.Ranks(1, 2, 1)
    with pytest.raises(ConfigError, match="PMI_SIZE='two' is not an integer"):
        E.mpi_world({"PMI_RANK": "1", "PMI_SIZE": "two"})


def test_torch_ranks_checked(clean_env):
    assert E.torch_ranks() == (0, 1, 0)
    assert E.torch_ranks({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2, 1)
    with pytest.raises(ConfigError, match=r"RANK=2 must be in \[0, WORLD_SIZE=2\)"):
        E.torch_ranks({"RANK": "2", "WORLD_SIZE": "2"})


def test_srun_with_an_infiniband_node_list(clean_env):
    """The first host of `dgx[01-02]-ib` (a list Slurm 22.05's scontrol refuses) is dgx01-ib."""
    for k, v in dict(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_STEP_NODELIST="dgx[01-02]-ib",
                     SLURM_JOB_NODELIST="other[1-4]").items():
        clean_env.setenv(k, v)
    assert E.setup_torch_env() == "srun"
    assert os.environ["MASTER_ADDR"] == "dgx01-ib"  # the step's own list wins over the job's


def test_bad_srun_variables_name_the_variable(clean_env):
    clean_env.setenv("SLURM_PROCID", "x")
    clean_env.setenv("SLURM_NTASKS", "2")
    with pytest.raises(ConfigError, match="SLURM_PROCID='x' is not an integer"):
        E.setup_torch_env()


WRITE_ENV = ("import json, os, sys; from hpc.distributed.launcher import setup_torch_env, TORCH_VARS; "
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


def imports(path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_layering():
    """No library module imports the launch package (the CLI's verb table names it as strings), and
    only hpc/distributed/dist.py imports torch.distributed."""
    for path in sorted((ROOT / "hpc").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        found = imports(path)
        if not rel.startswith("hpc/launch/"):
            assert not {n for n in found if n == "hpc.launch" or n.startswith("hpc.launch.")}, rel
        if rel != "hpc/distributed/dist.py":
            assert not {n for n in found if n.startswith("torch.distributed")}, rel


# --- `hpc env`: the one line a user runs first when a job hangs --------------------------------------
def _no_launcher_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in E.TORCH_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI", "SUBMITIT_"))}


def test_hpc_env_alone_and_under_torchrun():
    from helpers import hpc_cmd

    r = subprocess.run(hpc_cmd("env"), capture_output=True, text=True, env=_no_launcher_env(), timeout=60)
    assert r.returncode == 0 and r.stdout == \
        "RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=- MASTER_PORT=- LAUNCHER=none\n", r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "hpc", "env"], capture_output=True, text=True, env=_no_launcher_env(), timeout=120)
    rows = env_lines(r.stdout)
    assert r.returncode == 0 and [(x["RANK"], x["LOCAL_RANK"], x["WORLD_SIZE"], x["LAUNCHER"]) for x in rows] \
        == [("0", "0", "2", "torch"), ("1", "1", "2", "torch")], r.stderr[-2000:]
    assert len({(x["MASTER_ADDR"], x["MASTER_PORT"]) for x in rows}) == 1


def test_hpc_env_bad_variables_are_one_line():
    from helpers import hpc_cmd

    r = subprocess.run(hpc_cmd("env"), capture_output=True, text=True, env=_no_launcher_env() | {"RANK": "3",
                       "WORLD_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "1"}, timeout=60)
    assert r.returncode == 2 and r.stderr == "hpc env: error: environment: RANK=3 must be in [0, WORLD_SIZE=2)\n"


@pytest.mark.mpi
def test_hpc_env_under_mpirun():
    from helpers import hpc_cmd

    r = subprocess.run([*mpirun_cmd(2), *hpc_cmd("env")], capture_output=True, text=True, env=_no_launcher_env(),
                       timeout=120, cwd=ROOT)
    rows = env_lines(r.stdout)
    assert r.returncode == 0 and [(x["RANK"], x["WORLD_SIZE"], x["LAUNCHER"]) for x in rows] \
        == [("0", "2", "mpi"), ("1", "2", "mpi")], r.stderr[-2000:]


@pytest.mark.slurm
def test_hpc_env_under_srun(slurm):
    from helpers import hpc_cmd

    r = slurm.srun(["-n", "2", *hpc_cmd("env")], env=_no_launcher_env() | {"SLURM_CONF": str(slurm.conf)}, cwd=ROOT)
    rows = env_lines(r.stdout)
    assert r.returncode == 0 and [(x["RANK"], x["WORLD_SIZE"], x["LOCAL_RANK"], x["LAUNCHER"]) for x in rows] \
        == [("0", "2", "0", "srun"), ("1", "2", "1", "srun")], r.stderr[-2000:]
    assert {x["MASTER_ADDR"] for x in rows} == {slurm.node}
