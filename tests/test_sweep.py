"""`hpc sweep`: members from grid x random search, the sweep file's errors, and (on the real Slurm
cluster, with the real trainer) a 3-member job array whose `hpc sweep status` shows every member
done."""
from __future__ import annotations

import json

import pytest
import yaml

from hpc.errors import ConfigError
from hpc.launch.sweep import expand, load_sweep, member_configs

from helpers import ROOT, run_hpc


def test_grid_is_the_cartesian_product():
    members = expand({"grid": {"optim.lr": [1e-3, 1e-4], "loss.msssim": [0.0, 0.5, 1.0]}}, "s.yaml")
    assert len(members) == 6
    assert {(m["optim.lr"], m["loss.msssim"]) for m in members} == {
        (lr, w) for lr in (1e-3, 1e-4) for w in (0.0, 0.5, 1.0)}


def test_random_draws_are_seeded_and_within_their_ranges():
    spec = {"grid": {"model.name": ["unet", "light"]},
            "random": {"trials": 5, "seed": 3, "space": {
                "optim.lr": {"loguniform": [1e-4, 1e-2]}, "loss.l1": {"uniform": [0.5, 1.0]},
                "model.base": {"choice": [16, 32]}, "data.context": {"randint": [1, 3]}}}}
    members = expand(spec, "s.yaml")
    assert len(members) == 10 and members == expand(spec, "s.yaml")
    assert members != expand({**spec, "random": {**spec["random"], "seed": 4}}, "s.yaml")
    for m in members:
        assert 1e-4 <= m["optim.lr"] <= 1e-2 and 0.5 <= m["loss.l1"] <= 1.0
        assert m["model.base"] in (16, 32) and m["data.context"] in (1, 2, 3)
    assert [m["model.name"] for m in members] == ["unet"] * 5 + ["light"] * 5


@pytest.mark.parametrize("spec, message", [
    ({"grid": {"launch.nodes": [1, 2]}}, "cannot sweep over 'launch.nodes'"),
    ({"grid": {"lr": [1, 2]}}, "cannot sweep over 'lr'"),
    ({"random": {"space": {"optim.lr": {"normal": [0, 1]}}}}, "random.space.optim.lr: expected one of"),
])
def test_bad_sweep_keys_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        expand(spec, "s.yaml")


@pytest.mark.parametrize("text, message", [
    ("name: a\nconfig: c.yaml\n", "nothing to sweep"),
    ("config: c.yaml\ngrid: {optim.lr: [1]}\n", "`name` is required"),
    ("name: a\nconfig: c.yaml\ngird: {optim.lr: [1]}\n", "unknown keys \\['gird'\\]"),
])
def test_bad_sweep_files_are_refused(tmp_path, text, message):
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_sweep(tmp_path / "s.yaml")


def test_members_share_the_wandb_group_and_get_their_own_run_dirs(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  samples: 64\nlaunch:\n  max_parallel: 8\n")
    spec = {"name": "lr", "config": str(tmp_path / "c.yaml"), "fixed": ["optim.name=sgd"],
            "grid": {"optim.lr": [0.1, 0.01]}, "launch": {"max_parallel": 2, "nodes": 2}}
    members = member_configs(spec, tmp_path / "lr", ["launch.nodes=3"], "s.yaml")
    cfgs = [cfg for _, cfg in members]
    assert [c.optim.lr for c in cfgs] == [0.1, 0.01] and {c.optim.name for c in cfgs} == {"sgd"}
    assert {c.log.group for c in cfgs} == {"lr"} and [c.log.name for c in cfgs] == ["lr-000", "lr-001"]
    assert [c.train.run_dir for c in cfgs] == [str(tmp_path / "lr" / "000"), str(tmp_path / "lr" / "001")]
    assert cfgs[0].launch.max_parallel == 2  # the sweep file's launch section beats the config's
    assert cfgs[0].launch.nodes == 3  # and command-line flags beat both


def test_dry_run_lists_members_and_submits_nothing(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  samples: 64\n")
    (tmp_path / "s.yaml").write_text("name: lr\nconfig: c.yaml\ngrid: {optim.lr: [0.1, 0.01]}\n")
    r = run_hpc("sweep", "s.yaml", "--dry-run", "--cluster", "local", cwd=tmp_path, check=True)
    assert "would submit sweep lr: 2 members (local)" in r.stdout
    assert "000" in r.stdout and "optim.lr=0.01" in r.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("example", sorted((ROOT / "launch" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_example_sweeps_expand_against_the_repo_configs(example):
    r = run_hpc("sweep", str(example.relative_to(ROOT)), "--dry-run", cwd=ROOT, check=True)
    assert r.stdout.startswith(f"would submit sweep {example.stem}: ")


def test_status_of_a_directory_without_a_sweep_is_one_line_error(tmp_path):
    r = run_hpc("sweep", "status", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().endswith("no sweep.json (not a sweep directory)")
    (tmp_path / "sweep.json").write_text("{")
    r = run_hpc("sweep", "status", str(tmp_path))
    assert r.returncode == 2 and "sweep.json: unreadable" in r.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_three_member_sweep_runs_as_an_array_and_status_shows_all_done(slurm, tmp_path_factory, tmp_path):
    from cluster.tiny_data import make_dataset, train_overrides

    dataset = make_dataset(tmp_path_factory.getbasetemp() / "launch-data")
    (tmp_path / "c.yaml").write_text("{}\n")
    spec = {"name": "lr3", "config": "c.yaml", "dir": "runs/sweeps",
            "fixed": train_overrides(dataset, 32) + ["train.best_metric=nmse"],
            "grid": {"optim.lr": [0.01, 0.003, 0.001]},
            "launch": {"cpus_per_task": 1, "time_min": 5, "max_parallel": 2}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    r = run_hpc("sweep", "s.yaml", cwd=tmp_path, env=slurm.env, check=True)
    assert "submitted sweep lr3: 3 members (slurm)" in r.stdout
    record = json.loads((tmp_path / "runs" / "sweeps" / "lr3" / "sweep.json").read_text())
    job_ids = [m["job_id"] for m in record["members"]]
    array = {j.split("_")[0] for j in job_ids}
    assert len(array) == 1 and sorted(j.split("_")[1] for j in job_ids) == ["0", "1", "2"]  # one array
    assert slurm.wait(array.pop(), timeout=300) == "COMPLETED"
    status = run_hpc("sweep", "status", "runs/sweeps/lr3", cwd=tmp_path, env=slurm.env, check=True)
    lines = status.stdout.splitlines()
    assert lines[0] == "sweep lr3: 3/3 done", status.stdout
    rows = [ln.split() for ln in lines[2:5]]  # the members; the baselines follow after a blank line
    assert [row[0] for row in rows] == ["000", "001", "002"]
    assert [row[1] for row in rows] == ["optim.lr=0.01", "optim.lr=0.003", "optim.lr=0.001"]
    assert all(row[2] == "done" and row[3] == "32/32" for row in rows)
    assert all(row[4].startswith("nmse=") for row in rows)  # best validation value, from metrics.jsonl
    assert all(row[5].endswith("best.pt") for row in rows)  # a checkpoint per member
