"""A real local sweep (submitit's local executor, the real trainer; issue 26.6): launch.max_parallel
is honoured (one member trains at a time, the other waits for its slot), `hpc sweep status` says
"done" only for a member whose run wrote its end record (after the final validation and checkpoint),
and the results table has the baselines the members' values are to be read against."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers import TINY, hpc_cmd, make_dataset


def hpc(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run(hpc_cmd(*args), capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
    assert r.returncode == 0, f"hpc {' '.join(map(str, args))}: {r.stdout}\n{r.stderr}"
    return r


def ended(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and any(json.loads(ln).get("kind") == "end" for ln in path.read_text().splitlines()
                                 if ln.strip().endswith("}"))


@pytest.mark.slow
def test_local_sweep_runs_one_member_at_a_time_and_reports_truthfully(tmp_path):
    ds = make_dataset(tmp_path / "ds", studies=3, views=16, bins=16, mask=True, counts=True)
    spec = {"name": "two", "config": str(TINY), "dir": "runs",
            # one validation, at the end: the window between the last training step and the end record
            "fixed": [f"data.path={ds}", "train.samples=64", "train.val_every=64", "train.val_batches=0"],
            "grid": {"optim.lr": [0.01, 0.003]},
            "launch": {"max_parallel": 1, "cpus_per_task": 1, "time_min": 5}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    r = hpc("sweep", "s.yaml", "--cluster", "local", cwd=tmp_path)
    assert "submitted sweep two: 2 members (local)" in r.stdout
    sweep = tmp_path / "runs" / "two"
    seen, deadline = [], time.monotonic() + 240
    while time.monotonic() < deadline:
        lines = hpc("sweep", "status", "runs/two", cwd=tmp_path).stdout.splitlines()
        states = {row.split()[0]: row.split()[2] for row in lines[2:4]}
        for member, state in states.items():
            if state == "done":  # never before the run's end record
                assert ended(sweep / member), lines
        seen.append(states)
        if lines[0] == "sweep two: 2/2 done":
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the sweep did not finish: {seen[-3:]}")
    busy = {"running", "finishing"}
    assert not any(set(s.values()) <= busy for s in seen), seen  # never both at once
    # one member busy while the other waits or is done; "finishing" (after the last step, before the end
    # record) counts as busy: under load a poll can miss the short "running" window of a tiny run
    one_busy = [s for s in seen if sum(v in busy for v in s.values()) == 1
                and {v for v in s.values() if v not in busy} <= {"waiting", "done"}]
    assert one_busy, seen[-20:]
    # the second member's run started after the first one's had ended
    starts = {m: (sweep / m / "config.yaml").stat().st_mtime for m in ("000", "001")}
    ends = {m: (sweep / m / "metrics.jsonl").stat().st_mtime for m in ("000", "001")}
    first, second = sorted(starts, key=starts.get)
    assert starts[second] >= ends[first]
    lines = hpc("sweep", "status", "runs/two", cwd=tmp_path).stdout.splitlines()
    assert "baselines on the same validation slices (nmse_gap):" in lines
    base = [ln.split() for ln in lines[lines.index("baselines on the same validation slices (nmse_gap):") + 1:]]
    assert {row[0] for row in base} == {"linear", "biharmonic"}
    val = [json.loads(ln) for ln in (sweep / "000" / "metrics.jsonl").read_text().splitlines()
           if '"val"' in ln][-1]
    assert dict(row for row in base) == {n: f"nmse_gap={val[f'{n}_nmse_gap']:.4g}" for n in ("linear", "biharmonic")}
