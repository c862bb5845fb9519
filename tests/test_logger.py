"""Run logger: metrics.jsonl + config.yaml always; W&B offline run read back with wandb's own
protobuf Record class (history has the losses, the images are logged); mode from config/WANDB_MODE;
other ranks write nothing."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml

from hpc.config import Config
from hpc.errors import ConfigError
from hpc.train.logger import RunLogger, wandb_mode

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc32, len16, type8) records
HEADER = 7  # b":W&B" + magic 0xBEE1 + version


def read_wandb_records(path: Path) -> list:
    """Every Record in an offline .wandb file, parsed with wandb's protobuf class (FULL, or
    FIRST/MIDDLE.../LAST fragments joined)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    records, pos, pending = [], HEADER, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a record header is zero padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            rec = Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def written_records(path: Path, finished: bool = True, timeout: float = 60) -> list:
    """read_wandb_records once wandb-core (a process of its own, which may write after finish()
    returned or after the trainer was killed) is done: the file has stopped growing and, for a run
    that finished, holds its exit record."""
    import time

    deadline, size = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if path.stat().st_size == size:
            records = read_wandb_records(path)
            if not finished or any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
        size = path.stat().st_size
    raise AssertionError(f"{path}: W&B did not finish writing within {timeout:.0f} s")


def cfg_for(tmp_path: Path, mode: str = "disabled") -> Config:
    cfg = Config()
    cfg.train.run_dir = str(tmp_path / "run")
    cfg.log.wandb, cfg.log.project, cfg.log.group, cfg.log.progress = mode, "hpc-test", "g1", False
    return cfg


def test_jsonl_and_config_always(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = cfg_for(tmp_path)
    log = RunLogger(cfg, main=True, total=10)
    log.scalars(4, {"loss": 0.5, "lr": 1e-3})
    log.scalars(8, {"nmse": float("nan")}, kind="val")
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 4, "kind": "train", "loss": 0.5, "lr": 1e-3},
                     {"step": 8, "kind": "val", "nmse": None}]  # strict JSON: NaN becomes null
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["log"]["project"] == "hpc-test"
    assert not (tmp_path / "run" / "wandb").exists()


def test_other_ranks_write_nothing(tmp_path):
    log = RunLogger(cfg_for(tmp_path, "offline"), main=False, total=10)
    log.scalars(1, {"loss": 1.0})
    log.images(1, {"target": torch.ones(4, 4)})
    log.close()
    assert not (tmp_path / "run").exists()


def test_mode_from_env_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(cfg_for(tmp_path, "online").log) == "offline"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE"):
        wandb_mode(cfg_for(tmp_path).log)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):  # never an interactive prompt
        RunLogger(cfg_for(tmp_path), main=True, total=1)


def test_wandb_offline_run_reads_back(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    log = RunLogger(cfg_for(tmp_path, "offline"), main=True, total=10)
    for step, loss in ((2, 0.75), (4, 0.25)):
        log.scalars(step, {"loss": loss, "lr": 0.01})
    panels = {k: torch.rand(8, 12) for k in ("input", "prediction", "target", "error", "mask")}
    log.images(4, panels)
    log.close()
    assert "wandb sync" in capsys.readouterr().err
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = written_records(run_file)
    # history items are flattened: nested_key ("images/input", "_type") for an image's fields
    history = [{tuple(i.nested_key) or (i.key,): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    losses = [h[("train/loss",)] for h in history if ("train/loss",) in h]
    assert losses == [0.75, 0.25]
    # one labelled panel (hpc.train.panel) with the five images side by side
    assert [h[("images/panel", "_type")] for h in history if ("images/panel", "_type") in h] == ["image-file"]
    assert len(list(run_file.parent.glob("files/media/images/**/*.png"))) == 1
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.run_group, run.job_type) == ("hpc-test", "g1", "train")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}  # the resolved config
    assert config["log"]["group"] == "g1" and config["optim"]["name"] == "adamw"


def _history(records: list) -> list[tuple[int, dict]]:
    """(W&B step, {key: value}) of every history record of an offline run file."""
    return [(r.history.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
            for r in records if r.WhichOneof("record_type") == "history"]


def _metric_axes(records: list) -> dict[str, str]:
    return {m.metric.name or m.metric.glob_name: m.metric.step_metric for m in records
            if m.WhichOneof("record_type") == "metric"}


def test_a_resumed_run_continues_the_wandb_step_and_keeps_repeated_sample_counts(tmp_path, monkeypatch):
    """A requeued attempt resumes from a checkpoint older than its last log: it logs sample counts
    again. Its W&B steps continue after the first attempt's (wandb drops a point whose step is below
    the last), so every point of both attempts is in the run; `samples` is every chart's x-axis."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = cfg_for(tmp_path, "offline")
    for samples in (range(4, 37, 4), range(20, 49, 4)):  # attempt 2 resumed from step 16
        log = RunLogger(cfg, main=True, total=48)
        for n in samples:
            log.scalars(n, {"loss": 1 / n})
        log.close()
    files = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and files[0].name == files[1].name  # one W&B run, two attempts
    attempts = [written_records(f) for f in files]
    first, second = (_history(a) for a in attempts)
    steps = [step for step, _ in first + second]
    assert steps == list(range(len(steps)))  # one W&B step per log call, never going back
    assert [h["samples"] for _, h in first] == list(range(4, 37, 4))
    assert [h["samples"] for _, h in second] == list(range(20, 49, 4))
    assert [h["train/loss"] for _, h in second] == [1 / n for n in range(20, 49, 4)]
    for records in attempts:
        assert _metric_axes(records) == {"samples": "", "*": "samples"}


@pytest.mark.slow
def test_wandb_after_kill_9_and_resume_from_an_older_checkpoint(tmp_path):
    """The real trainer killed with SIGKILL after logging past its newest checkpoint, then resumed
    from an older one (the newer checkpoints removed): the resumed attempt's W&B steps start after
    every step the killed one reserved (run_dir/wandb_step), and every point it logs is in its
    offline file, sample counts the killed attempt had logged included. (What the killed attempt's
    wandb-core had not yet written to its offline file is lost with it; metrics.jsonl keeps all.)"""
    import os
    import signal
    import subprocess
    import time

    from helpers import hpc_cmd, make_dataset

    ds = make_dataset(tmp_path / "ds", studies=3, views=16, bins=16, mask=True, counts=True)
    run = tmp_path / "run"
    cmd = hpc_cmd("train", "--config", "configs/tiny.yaml", f"data.path={ds}", f"train.run_dir={run}",
                  "train.samples=96", "train.val_every=16", "checkpoint.every=16", "checkpoint.keep=10",
                  "log.every=4", "log.wandb=offline")
    # no WANDB_* from this process: an in-process wandb.init (another test) leaves WANDB_SERVICE set,
    # which would attach the trainers to this process's wandb-core
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 180
    while not any(r.get("kind") == "train" and r["step"] >= 36 for r in _jsonl(run)):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no training records"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reserved = int((run / "wandb_step").read_text())  # the last W&B step the killed attempt could use
    assert reserved >= 8  # train records 4..36 at least
    for newer in sorted((run / "checkpoints").glob("step-*.pt"))[1:]:  # resume from step 16
        newer.unlink()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and files[0].name == files[1].name  # one W&B run id, two attempts
    killed = _history(written_records(files[0], finished=False))
    resumed_records = written_records(files[1])
    resumed = _history(resumed_records)
    steps = [s for s, _ in resumed]
    assert steps == sorted(steps) and steps[0] == reserved + 1
    assert all(s <= reserved for s, _ in killed)  # whatever the killed attempt did write
    assert [h["samples"] for _, h in resumed if "train/loss" in h] == list(range(20, 97, 4))
    assert all("samples" in h for _, h in resumed)
    assert _metric_axes(resumed_records) == {"samples": "", "*": "samples"}


def _jsonl(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
