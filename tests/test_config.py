"""The config tree: YAML + overrides, type checks, precise errors, round trip."""
from __future__ import annotations

import os

import pytest
import yaml

from hpc.config import Config, dump, from_dict, load_config, save, to_dict
from hpc.errors import ConfigError


def test_defaults_and_derived_channels():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.in_channels() == 2 * cfg.data.context + 1
    cfg = load_config(overrides=["data.context=3"])
    assert cfg.in_channels() == 7
    cfg = load_config(overrides=["model.in_channels=2"])
    assert cfg.in_channels() == 2


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.01\n  betas: [0.5, 0.9]\nmodel:\n  name: unet\n")
    cfg = load_config(p, ["optim.lr=3e-4", "augment.zoom=[1.0, 1.2]", "train.samples=100"])
    assert cfg.optim.lr == pytest.approx(3e-4)  # override wins over the file
    assert cfg.optim.betas == [0.5, 0.9]
    assert cfg.model.name == "unet"
    assert cfg.augment.zoom == [1.0, 1.2]
    assert cfg.train.samples == 100 and isinstance(cfg.train.samples, int)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "valid keys"),
        ("optimizer.lr=1", "valid sections"),
        ("train.samples=abc", "expected an integer"),
        ("train.samples=1.5", "expected an integer"),
        ("augment.enabled=yes please", "expected true/false"),
        ("optim.lr=fast", "expected a number"),
        ("nodot=1", "section.key=value"),
    ],
)
def test_bad_overrides_are_precise(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["optim.lrr=1"])
    assert "lr" in str(err.value) and "weight_decay" in str(err.value)


def test_bad_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  nme: unet\n")
    with pytest.raises(ConfigError, match="bad.yaml.*model.nme"):
        load_config(bad)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(overrides=["optim.lr=0.5", "log.project=x", "data.train_studies=[a, b]"])
    out = save(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(out)
    assert to_dict(again) == to_dict(cfg)
    assert from_dict(yaml.safe_load(dump(cfg))) == cfg
    assert not list((tmp_path / "run").glob(".*tmp"))  # atomic write left no temporary file


def test_atomic_outputs_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    from hpc.io.atomic import atomic_write_text

    old = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "out.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640  # group-readable, as a shared project dir expects
