"""`hpc train` end to end on a tiny dataset (configs/tiny.yaml): samples-counted steps, validation
with baselines, best checkpoint by train.best_metric; SIGKILL, truncated newest checkpoint, resume
from the previous one == uninterrupted run (bitwise, deterministic CPU); SIGUSR2/SIGTERM -> checkpoint
-> exit 75; 2-rank torchrun run; learning-rate schedules and optimizers."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpc.config import OptimConfig
from hpc.errors import EXIT_REQUEUE
from hpc.train import checkpoint as ck
from hpc.train.optim import LRSchedule, build_optimizer

from helpers import ROOT, TINY, hpc_cmd, make_dataset, records, run_hpc


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """3 studies of 8 slices of 16x16 Poisson counts with stored masks (gaps)."""
    return make_dataset(tmp_path_factory.mktemp("ds") / "ds", studies=3, views=16, bins=16,
                        mask=True, counts=True)


def args(dataset: Path, run_dir: Path, *overrides: str) -> list[str]:
    return ["train", "--config", str(TINY), f"data.path={dataset}", f"train.run_dir={run_dir}", *overrides]


def final_state(run_dir: Path) -> dict:
    return ck.load(ck.Checkpointer(run_dir).list()[0])


def start(dataset: Path, run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(hpc_cmd(*args(dataset, run_dir, *overrides)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"trainer ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.slow
def test_train_logs_validates_and_keeps_best(dataset, tmp_path):
    run = tmp_path / "run"
    r = run_hpc(*args(dataset, run), check=True)
    assert r.returncode == 0
    train = records(run, "train")
    assert [t["step"] for t in train] == list(range(8, 65, 8))  # batch 4: 4 samples per step
    assert all(math.isfinite(t["loss"]) and t["lr"] == pytest.approx(0.003) for t in train)
    val = records(run, "val")
    assert [v["step"] for v in val] == [32, 64]
    assert {"nmse_gap", "linear_nmse_gap", "biharmonic_nmse_gap", "loss"} <= val[0].keys()
    best = min(val, key=lambda v: v["nmse_gap"])
    state = ck.load(run / "checkpoints" / "best.pt")
    assert state["step"] == best["step"] and state["metrics"]["nmse_gap"] == pytest.approx(best["nmse_gap"])
    assert [p.name for p in ck.Checkpointer(run).list()] == ["step-00000064.pt", "step-00000048.pt"]
    assert (run / "config.yaml").exists() and final_state(run)["config"]["data"]["path"] == str(dataset)
    data = final_state(run)["data"]  # what `hpc predict` preprocesses new inputs with
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert data["scale"] == pytest.approx(manifest["scale"]) and data["slice_shape"] == [16, 16]


def test_bf16_channels_last_accumulation_schedule_and_best_by_max(dataset, tmp_path):
    """The GPU settings on the CPU: bf16 autocast, channels_last, 2 accumulated micro-batches,
    clipping, SGDR with warmup; best.pt by the highest SSIM."""
    run = tmp_path / "run"
    run_hpc(*args(dataset, run, "train.precision=bf16", "train.channels_last=true", "optim.accumulate=2",
                  "optim.clip_grad=0.5", "optim.scheduler=cosine_restarts", "optim.restart_samples=32",
                  "optim.warmup_samples=8", "train.best_metric=ssim", "train.best_mode=max"), check=True)
    train = records(run, "train")
    assert [t["step"] for t in train] == list(range(8, 65, 8))  # 2 x 4 samples per optimizer step
    sched = LRSchedule(OptimConfig(lr=0.003, scheduler="cosine_restarts", restart_samples=32,
                                   warmup_samples=8), "max")
    assert [t["lr"] for t in train] == pytest.approx([sched.lr(t["step"] - 8) for t in train])
    val = records(run, "val")
    best = max(val, key=lambda v: v["ssim"])
    assert ck.load(run / "checkpoints" / "best.pt")["step"] == best["step"]


def test_the_signal_handlers_are_given_back_when_training_returns(dataset, tmp_path):
    """After train() the process's SIGTERM/SIGUSR2 handlers are what they were: a SIGTERM to `hpc demo`
    during its evaluation ends it (the trainer's handler only sets a flag nobody reads any more)."""
    from hpc.config import load_config
    from hpc.train.train import train

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    cfg = load_config(TINY, [f"data.path={dataset}", f"train.run_dir={tmp_path / 'run'}", "train.samples=8",
                             "train.val_every=8", "log.wandb=disabled"])
    train(cfg)
    assert {s: signal.getsignal(s) for s in before} == before


def test_unknown_best_metric_is_one_line_error(dataset, tmp_path):
    r = run_hpc(*args(dataset, tmp_path / "run", "train.best_metric=accuracy"))
    assert r.returncode == 2
    assert "train.best_metric='accuracy': expected one of nmse | psnr | ssim" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.slow
def test_sigkill_truncated_newest_then_resume_is_bitwise_identical(dataset, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_hpc(*args(dataset, ref), check=True)
    proc = start(dataset, cut)
    wait_for(cut / "checkpoints" / "step-00000032.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    newest, previous = ck.Checkpointer(cut).list()[:2]
    assert newest.name != "step-00000064.pt"  # really cut short
    newest.write_bytes(newest.read_bytes()[:1000])  # and the newest checkpoint truncated
    r = run_hpc(*args(dataset, cut), check=True)
    assert f"skipping {newest}: not a readable checkpoint" in r.stderr
    assert f"resumed from {previous}" in r.stderr
    a, b = final_state(ref), final_state(cut)
    assert a["step"] == b["step"] == 64
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    for i, s in a["optim"]["state"].items():
        assert torch.equal(s["exp_avg_sq"], b["optim"]["state"][i]["exp_avg_sq"])


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_signal_checkpoints_and_exits_75(dataset, tmp_path, sig):
    run = tmp_path / "run"
    proc = start(dataset, run, "train.samples=100000", "checkpoint.every=16", "train.val_every=0")
    wait_for(run / "checkpoints" / "step-00000016.pt", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err[-2000:]
    assert f"exiting with {EXIT_REQUEUE}" in err
    newest = ck.Checkpointer(run).list()[0]
    assert ck.load(newest)["step"] > 16  # written on the signal, after the step in flight


def test_torchrun_two_ranks(dataset, tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "hpc", *args(dataset, run, "train.samples=32", "data.split=[0.5,0.5,0.0]",
                        "data.batch_size=2", "train.ema=0.9")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    state = final_state(run)
    assert state["step"] == 32 and len(state["rng"]) == 2  # every rank's RNG state
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # seeded distinctly
    assert [t["step"] for t in records(run, "train")] == [8, 16, 24, 32]  # 2 ranks x 2 samples per step
    assert state["ema"]["updates"] == 32 // 4  # the weights' average: one update per (DDP) optimizer step


# ---------------------------------------------------------------- schedules and optimizers
def sched(**kw) -> LRSchedule:
    return LRSchedule(OptimConfig(lr=1.0, **kw), "min")


def test_step_schedule_and_warmup():
    s = sched(scheduler="step", step_samples=100, gamma=0.5, warmup_samples=10)
    assert s.lr(4) == pytest.approx(0.5)  # (4 + 1) / 10 of the way up
    assert [s.lr(n) for n in (10, 99, 100, 250)] == [1.0, 1.0, 0.5, 0.25]


def test_cosine_warm_restarts_in_samples():
    s = sched(scheduler="cosine_restarts", restart_samples=100, restart_mult=2, min_lr=0.0)
    assert s.lr(0) == 1.0 and s.lr(50) == pytest.approx(0.5)
    assert s.lr(100) == 1.0  # restart; the next period is 200 samples
    assert s.lr(200) == pytest.approx(0.5) and s.lr(300) == 1.0


def test_plateau_reduces_after_patience():
    s = sched(scheduler="plateau", patience=1, gamma=0.1, min_lr=0.05)
    for v in (1.0, 0.9, 0.95):  # improvement, improvement, one bad validation: no change yet
        s.observe(v)
    assert s.lr(0) == 1.0
    s.observe(0.95)
    assert s.lr(0) == pytest.approx(0.1)
    s.load_state_dict(s.state_dict() | {"scale": 0.001})
    assert s.lr(0) == 0.05  # floored at min_lr


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "rmsprop"])
def test_optimizers_step(name):
    w = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer(OptimConfig(name=name, lr=0.1), [w])
    (w ** 2).sum().backward()
    opt.step()
    assert (w < 1).all()

