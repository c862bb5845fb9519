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
from hpc.logger import RunLogger, wandb_mode

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
    records = read_wandb_records(run_file)
    # history items are flattened: nested_key ("images/input", "_type") for an image's fields
    history = [{tuple(i.nested_key) or (i.key,): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    losses = [h[("train/loss",)] for h in history if ("train/loss",) in h]
    assert losses == [0.75, 0.25]
    for name in panels:
        assert [h[(f"images/{name}", "_type")] for h in history if (f"images/{name}", "_type") in h] \
            == ["image-file"]
    assert len(list(run_file.parent.glob("files/media/images/**/*.png"))) == 5
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.run_group, run.job_type) == ("hpc-test", "g1", "train")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}  # the resolved config
    assert config["log"]["group"] == "g1" and config["optim"]["name"] == "adamw"
