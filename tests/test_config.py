"""The config tree: YAML + overrides, type checks, precise errors, round trip."""
from __future__ import annotations

import os

import pytest
import yaml

from hpc.config import Config, dump, from_dict, load_config, save, to_dict
from hpc.errors import ConfigError, HpcWarning

from helpers import ROOT, run_hpc


def test_defaults_and_derived_channels():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.in_channels() == 2 * cfg.data.context + 1
    cfg = load_config(overrides=["data.context=3"])
    assert cfg.in_channels() == 7
    cfg = load_config(overrides=["data.context=1", "model.in_channels=3"])
    assert cfg.in_channels() == 3


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


# ---------------------------------------------------------------- the single validator
@pytest.mark.parametrize("override, message", [
    ("augment.p=2", "augment.p=2.0: must be in [0, 1]"),
    ("checkpoint.keep=0", "checkpoint.keep=0: must be >= 1"),
    ("optim.lr=nan", "optim.lr=nan: must be a finite number"),
    ("optim.lr=.inf", "optim.lr=inf: must be a finite number"),
    ("augment.zoom=[1.5, nan]", "augment.zoom=[1.5, nan]: must be a finite number"),
    ("optim.lr=0", "optim.lr=0.0: must be > 0"),
    ("data.normalize=foo", "data.normalize='foo': expected one of max | scale | anscombe | none"),
    ("data.pad_bins=foo", "data.pad_bins='foo': expected one of zero | reflect"),
    ("data.fill=foo", "data.fill='foo': expected one of zero | linear"),
    ("data.edge=wrap", "data.edge='wrap': expected one of replicate | reflect"),
    ("data.backend=jax", "data.backend='jax': expected one of torch | dali"),
    ("data.device=tpu", "data.device='tpu': expected one of auto | cpu | cuda"),
    ("data.split=[0.8, 0.2]", "data.split=[0.8, 0.2]: must be three fractions"),
    ("data.run_length=0", "data.run_length=0: must be >= 1"),
    ("model.name=resnet", "model.name='resnet': expected one of badblock | unet | light"),
    ("model.norm=layer", "model.norm='layer': expected one of batch | instance | group | none"),
    ("model.up_mode=pixelshuffle", "model.up_mode='pixelshuffle': expected one of transposed"),
    ("model.depth=0", "model.depth=0: must be >= 1"),
    ("optim.name=lamb", "optim.name='lamb': expected one of adam | adamw | sgd | rmsprop"),
    ("optim.scheduler=linear", "optim.scheduler='linear': expected one of none | step"),
    ("optim.betas=[0.9, 1.0]", "optim.betas=[0.9, 1.0]: must be two numbers in [0, 1)"),
    ("train.precision=fp16", "train.precision='fp16': expected one of auto | fp32 | bf16"),
    ("train.best_metric=accuracy", "train.best_metric='accuracy': expected one of nmse | psnr"),
    ("train.best_mode=up", "train.best_mode='up': expected one of min | max"),
    ("dist.backend=mpi", "dist.backend='mpi': expected one of auto | nccl | gloo"),
    ("log.wandb=off", "log.wandb='off': expected one of online | offline | disabled"),
    ("launch.cluster=nowhere", "launch.cluster='nowhere': expected one of slurm | local | debug"),
    ("corrupt.dose=0", "corrupt.dose=0.0: must be in (0, 1]"),
    ("corrupt.scanner=petmr9000", "corrupt.scanner='petmr9000': valid: test, demo, mmr, mct"),
    ("loss.mse=-0.1", "loss.mse=-0.1: must be a finite number >= 0"),
])
def test_every_choice_and_range_is_one_line_naming_key_value_and_what_is_valid(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["loss.l1=0"], "loss: every weight is 0"),
    (["model.in_channels=2"], "model.in_channels=2: must be 0 (automatic) or 2 * data.context + 1 = 5"),
    (["model.out_channels=2"], "model.out_channels=2: must be 1 with model.inpaint=true"),
    (["optim.min_lr=0.1", "optim.lr=0.01"], "optim.min_lr=0.1: must be <= optim.lr=0.01"),
    (["data.train_studies=[a, b]", "data.val_studies=[b]"], "data.val_studies=['b']: shares ['b'] with"),
    (["launch.cluster=local", "launch.nodes=2"], "launch.nodes=2: must be 1 with launch.cluster=local"),
    (["launch.time_min=2", "launch.signal_delay_s=120"], "launch.signal_delay_s=120: must be < launch.time_min"),
    (["corrupt.scanner=test", "corrupt.dead_blocks=13"], "corrupt.dead_blocks=13: must be <= 12, the blocks"),
    (["data.device=cpu", "dist.sync_bn=true"], "dist.sync_bn=True: needs GPU ranks"),
])
def test_cross_field_rules(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert message in str(err.value)


def test_from_dict_validates_too():
    tree = to_dict(load_config())
    tree["augment"]["p"] = 2.0
    with pytest.raises(ConfigError, match=r"augment.p=2.0: must be in \[0, 1\]"):
        from_dict(tree)


def test_registries_name_exactly_the_configs_choices():
    """The Literal types and the registries are the lists of valid names; the maps that build the
    objects must agree with them (no name that validates but cannot be built, and none unreachable)."""
    from hpc.config import REGISTERED, Metric, Norm, OptimName, WandbMode, choices
    from hpc.physics import geometry
    from hpc.registry import FILLS, LOSSES, MODELS
    from hpc.train import logger, metrics, models, optim

    assert set(models.NORMS) == set(choices(Norm))
    assert set(optim.OPTIMIZERS) == set(choices(OptimName))
    assert set(logger.WANDB_MODES) == set(choices(WandbMode))
    assert set(metrics.METRICS) | {"loss"} == set(choices(Metric))  # what validation reports
    assert REGISTERED == {"data.fill": FILLS, "model.name": MODELS}
    for name in MODELS:
        assert load_config(overrides=[f"model.name={name}"]).model.name == name
    for name in LOSSES:
        assert load_config(overrides=[f"loss.{name}=0.5"]).loss.weights[name] == 0.5
    for name in FILLS:
        assert load_config(overrides=[f"data.fill={name}"]).data.fill == name
    for name in geometry.SCANNERS:  # corrupt.scanner: the geometry registry's names are valid
        load_config(overrides=[f"corrupt.scanner={name}", "corrupt.dead_blocks=1"])


def test_loss_weights_round_trip_flat_and_old_stored_configs_load():
    """Loss weights are stored flat (`loss: {l1: 1.0, msssim: 0.2, gaps_only: false}`), so configs
    stored before the registry (every term a field, zeros included) load unchanged."""
    from hpc.config import from_stored

    cfg = load_config(overrides=["loss.msssim=0.2", "loss.gaps_only=true"])
    assert to_dict(cfg)["loss"] == {"l1": 1.0, "msssim": 0.2, "gaps_only": True}
    assert from_dict(yaml.safe_load(dump(cfg))).loss == cfg.loss
    old = {"loss": {"l1": 1.0, "mse": 0.0, "msssim": 0.0, "poisson": 0.5, "gaps_only": False, "gone": 1.0}}
    with pytest.warns(HpcWarning, match="loss term 'gone' no longer exists"):
        loss = from_stored(old, "ck.pt").loss
    assert loss.weights == {"l1": 1.0, "mse": 0.0, "msssim": 0.0, "poisson": 0.5}
    for bad, what in (("loss.l1=-1", "must be a finite number >= 0"), ("loss.l1=0", "every weight is 0")):
        with pytest.raises(ConfigError, match=what):
            load_config(overrides=[bad])


def test_no_other_module_keeps_a_list_of_choices_or_checks_config_values():
    """The config is the single validator: no module raises on a config key by name."""
    import re

    pattern = re.compile(r"raise \w+Error\(f?\"(data|corrupt|augment|model|loss|optim|train|dist|checkpoint|"
                         r"launch)\.\w+[:= ]")
    offenders = []
    for path in (ROOT / "hpc").rglob("*.py"):
        if path.parent.name == "config":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    # what depends on the dataset or the machine, not on the config alone, is checked where it is known
    allowed = ("data.*_studies: unknown study ids", "data.pad_bins='reflect': padding",  # the data's size
               "corrupt.scanner: {index.ds.root}",  # the dataset's planes and slice size vs the scanner
               "data.device=cuda but no CUDA", "dist.sync_bn: SyncBatchNorm needs GPU")  # the machine
    assert [o for o in offenders if not any(a in o for a in allowed)] == []


# ---------------------------------------------------------------- YAML words
def test_yaml_words_stay_strings_for_string_fields_and_booleans_for_bool_fields(tmp_path):
    cfg = load_config(overrides=["log.name=off", "log.project=no", "log.group=yes", "log.entity=1.10",
                                 "augment.enabled=off", "log.images=no", "log.progress=On"])
    assert (cfg.log.name, cfg.log.project, cfg.log.group, cfg.log.entity) == ("off", "no", "yes", "1.10")
    assert (cfg.augment.enabled, cfg.log.images, cfg.log.progress) == (False, False, True)
    p = tmp_path / "c.yaml"
    p.write_text("log:\n  name: off\n  project: No\n  images: off\n  tensorboard: yes\naugment:\n  flip_bins: NO\n")
    cfg = load_config(p)
    assert (cfg.log.name, cfg.log.project) == ("off", "No")
    assert (cfg.log.images, cfg.log.tensorboard, cfg.augment.flip_bins) == (False, True, False)
    again = load_config(save(cfg, tmp_path / "saved.yaml"))  # the written file reads back the same
    assert again.log.name == "off" and to_dict(again) == to_dict(cfg)


# ---------------------------------------------------------------- stored configs
def test_stored_configs_drop_vanished_keys_with_a_warning_user_yaml_stays_strict(tmp_path):
    from hpc.config import from_stored
    from hpc.errors import HpcWarning

    tree = to_dict(load_config(overrides=["optim.lr=0.01"]))
    tree["optim"]["lookahead"] = True  # a key an older version had
    tree["legacy"] = {"x": 1}  # and a whole section
    with pytest.warns(HpcWarning) as caught:
        cfg = from_stored(tree, origin="old.pt: config")
    assert cfg.optim.lr == 0.01
    assert sorted(str(w.message) for w in caught) == [
        "old.pt: config: key optim.lookahead no longer exists; ignored",
        "old.pt: config: section 'legacy' no longer exists; ignored"]
    with pytest.raises(ConfigError, match="unknown key optim.lookahead"):
        from_dict(tree)
    p = tmp_path / "user.yaml"
    p.write_text("optim:\n  lookahead: true\n")
    with pytest.raises(ConfigError, match="user.yaml: unknown key optim.lookahead"):
        load_config(p)


def test_an_old_checkpoint_loads_through_the_cli_with_one_warning_line(tmp_path):
    """hpc export (via the inference library's load_repairer) reads a checkpoint whose stored config
    has a key this version no longer knows: one warning line, and the export is written."""
    import torch

    from hpc.train.models import build_model

    cfg = load_config(overrides=["data.context=0", "model.name=light", "model.base=2", "model.norm=none"])
    tree = to_dict(cfg)
    tree["model"]["dropout"] = 0.1
    model = build_model(cfg.model, cfg.in_channels())
    torch.save({"model": model.state_dict(), "optim": {}, "step": 0, "epoch": 0, "config": tree,
                "data": {"scale": 10.0, "slice_shape": [8, 8], "scanner": ""}}, tmp_path / "old.pt")
    r = run_hpc("export", "--checkpoint", tmp_path / "old.pt", "--format", "torchscript", "-o", tmp_path / "m.pt")
    assert r.returncode == 0, r.stderr
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("hpc export:")]  # (torch's tracer warns too)
    assert ours == [f"hpc export: warning: {tmp_path / 'old.pt'}: config: key model.dropout no longer exists; "
                    "ignored"]
    assert (tmp_path / "m.pt").is_file()


# ---------------------------------------------------------------- the CLI
def _one_line_error(r, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


@pytest.mark.parametrize("override, needle", [
    ("checkpoint.keep=0", "checkpoint.keep=0: must be >= 1"),
    ("optim.lr=nan", "optim.lr=nan: must be a finite number"),
    ("data.normalize=foo", "data.normalize='foo': expected one of max | scale | anscombe | none"),
    ("data.pad_bins=foo", "data.pad_bins='foo': expected one of zero | reflect"),
    ("data.fill=foo", "data.fill='foo': expected one of zero | linear"),
    ("augment.p=2", "augment.p=2.0: must be in [0, 1]"),
])
def test_hpc_train_refuses_bad_values_in_one_line(tmp_path, override, needle):
    r = run_hpc("train", "--config", ROOT / "configs" / "tiny.yaml", f"train.run_dir={tmp_path / 'run'}",
                override, cwd=tmp_path)
    _one_line_error(r, f"hpc train: error: {needle}")
    assert not (tmp_path / "run").exists()


def test_print_config_prints_the_resolved_yaml_and_creates_nothing(tmp_path):
    run_dir = tmp_path / "run"
    r = run_hpc("train", "--config", ROOT / "configs" / "tiny.yaml", f"train.run_dir={run_dir}",
                "optim.lr=3e-4", "log.name=off", "--print-config", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == ""
    from hpc.config.parse import parse_yaml

    printed = from_dict(parse_yaml(r.stdout))
    assert to_dict(printed) == to_dict(load_config(ROOT / "configs" / "tiny.yaml",
                                                   [f"train.run_dir={run_dir}", "optim.lr=3e-4", "log.name=off"]))
    assert printed.optim.lr == 3e-4 and printed.log.name == "off"
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []
    bad = run_hpc("train", "--config", ROOT / "configs" / "tiny.yaml", "data.fill=foo", "--print-config")
    _one_line_error(bad, "data.fill='foo'")


def _launch_cases(dataset, tmp_path):
    """(verb arguments, expected stderr piece) for every launcher, each refused before anything is
    queued or written: a bad value, and a missing dataset."""
    (tmp_path / "c.yaml").write_text(f"data:\n  path: {dataset}\ntrain:\n  samples: 8\n")
    (tmp_path / "bad.yaml").write_text("name: bad\nconfig: c.yaml\ngrid: {data.normalize: [max, foo]}\n")
    (tmp_path / "nodata.yaml").write_text("name: nodata\nconfig: c.yaml\nfixed: [data.path=missing]\n"
                                          "grid: {optim.lr: [0.1]}\n")
    return [
        (["submit", "--config", "c.yaml", "--cluster", "local", "data.normalize=foo"],
         "hpc submit: error: data.normalize='foo': expected one of"),
        (["submit", "--config", "c.yaml", "--cluster", "local", "data.path=missing"],
         "hpc submit: error: missing: not a converted dataset"),
        (["sweep", "bad.yaml", "--cluster", "local"],
         "hpc sweep: error: bad.yaml: member 001 (data.normalize=foo): data.normalize='foo': expected one of"),
        (["sweep", "bad.yaml", "--cluster", "local", "--dry-run"], "member 001 (data.normalize=foo)"),
        (["sweep", "nodata.yaml", "--cluster", "local"], "hpc sweep: error: missing: not a converted dataset"),
        (["sbatch", "-t", "plain", "--config", "c.yaml", "optim.lr=nan"],
         "hpc sbatch: error: optim.lr=nan: must be a finite number"),
        (["sbatch", "-t", "plain", "--config", "c.yaml", "--print", "--workdir", "/nonexistent/x", "augment.p=2"],
         "augment.p=2.0: must be in [0, 1]"),
        (["sbatch", "-t", "plain", "--config", "c.yaml", "--print", "data.path=missing"],
         f"hpc sbatch: error: {tmp_path / 'missing'}: not a converted dataset"),  # as seen from --workdir
    ]


def test_launchers_validate_the_config_and_dataset_before_queueing_or_rendering(tmp_path_factory, tmp_path):
    from cluster.tiny_data import make_dataset

    dataset = make_dataset(tmp_path_factory.getbasetemp() / "launch-data")
    for argv, needle in _launch_cases(dataset, tmp_path):
        r = run_hpc(*argv, cwd=tmp_path, env={"SLURM_CONF": "/nonexistent"})  # nothing may reach a queue
        _one_line_error(r, needle)
        assert r.stdout == "", (argv, r.stdout)  # no "submitted", no script
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "c.yaml", "nodata.yaml"], argv
