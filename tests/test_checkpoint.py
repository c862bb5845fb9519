"""Checkpoints: atomic files, keep last K + best, weights_only loading, corrupt-newest fallback, RNG
states, describe()."""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from hpc.config import Config, to_dict
from hpc.errors import InputError
from hpc.train import checkpoint as ck


def state(step: int) -> dict:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, float(step))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step, "epoch": step // 10,
            "loader": {"epoch": 0, "position": step}, "rng": [ck.rng_state()], "config": to_dict(Config()),
            "metrics": {"nmse": 1.0 / (step + 1)}, "best": 0.5, **ck.code_version()}


def test_save_keeps_last_k_and_best(tmp_path):
    c = ck.Checkpointer(tmp_path, keep=2)
    for step in (10, 20, 30):
        c.save(state(step), step, is_best=step == 20)
    assert [p.name for p in c.list()] == ["step-00000030.pt", "step-00000020.pt"]
    assert ck.load(c.best_path)["step"] == 20
    assert not list(c.dir.glob(".*"))  # no temporary files left behind


def test_weights_only_roundtrip(tmp_path):
    s = state(7)
    path = ck.Checkpointer(tmp_path).save(s, 7)
    back = torch.load(path, weights_only=True)  # what any user may call: nothing is unpickled
    assert torch.equal(back["model"]["weight"], s["model"]["weight"])
    assert back["optim"]["state"][0]["exp_avg"].shape == (2, 3)
    assert back["config"]["optim"]["name"] == "adamw" and back["git"] == s["git"]


def test_corrupt_newest_falls_back_and_reports(tmp_path):
    c = ck.Checkpointer(tmp_path, keep=3)
    for step in (1, 2, 3):
        c.save(state(step), step)
    newest = c.path(3)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated copy
    c.path(2).write_bytes(pickle.dumps({"model": "evil"}))  # not even a torch zip
    reports: list[str] = []
    got, path = c.resume(report=reports.append)
    assert path == c.path(1) and got["step"] == 1
    assert len(reports) == 2 and "step-00000003.pt" in reports[0] and "step-00000002.pt" in reports[1]


def test_no_checkpoint_and_foreign_file(tmp_path):
    assert ck.Checkpointer(tmp_path).resume() == (None, None)
    other = tmp_path / "x.pt"
    torch.save({"weights": torch.ones(2)}, other)
    with pytest.raises(InputError, match="x.pt: not an hpc checkpoint"):
        ck.load(other)
    with pytest.raises(InputError, match="not found"):
        ck.load(tmp_path / "missing.pt")


def test_rng_state_roundtrip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ck.Checkpointer(tmp_path).save(state(1), 1)
    saved = ck.load(path)["rng"][0]
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_describe_file_and_run_dir(tmp_path):
    c = ck.Checkpointer(tmp_path)
    c.save(state(5), 5, is_best=True)
    c.path(9).write_bytes(b"garbage")
    text = ck.describe(c.path(5))
    assert "step (samples seen): 5" in text and "adamw" in text
    run = ck.describe(tmp_path)
    assert "3 checkpoint(s)" in run and "UNREADABLE" in run and "best.pt: step 5" in run
