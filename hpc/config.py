"""One configuration tree for the whole pipeline.

Every section is a small dataclass; the tree is loaded from YAML and overridden on the command
line with ``section.key=value`` (values are parsed as YAML scalars/lists and type-checked).
Unknown sections or keys are errors that list the valid ones. The resolved tree is saved with
every run, checkpoint and shard (``to_dict`` / ``save``).

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "model.name=unet"])
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hpc.errors import ConfigError


@dataclass
class DataConfig:
    path: str = ""  # converted dataset dir (manifest.json + shards/)
    backend: str = "torch"  # torch | dali
    context: int = 2  # k neighbouring slices each side -> 2k+1 input channels
    edge: str = "replicate"  # replicate | reflect: context at the ends of a (study, tof, segment) stack
    batch_size: int = 16  # per rank
    workers: int = 2  # reader processes per rank (0 = in the main process)
    run_length: int = 32  # contiguous slices read at once (windows are cut from runs)
    shuffle_buffer: int = 256  # windows held for shuffling
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train/val/test by study
    train_studies: list[str] = field(default_factory=list)  # explicit lists override `split`
    val_studies: list[str] = field(default_factory=list)
    test_studies: list[str] = field(default_factory=list)
    normalize: str = "max"  # max | scale | anscombe | none
    pad_bins: str = "zero"  # zero | reflect
    fill: str = "zero"  # gaps in the network input: zero | linear (radial interpolation, then corrected)
    nonneg: bool = True  # counts >= 0: predictions, baselines floored at 0 (false: e.g. randoms-subtracted)
    pad_multiple: int = 0  # 0 = from the model (2**depth)
    stage_to: str = ""  # node-local dir (e.g. /raid/$USER) to copy shards to before epoch 0
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0


@dataclass
class CorruptConfig:
    scanner: str = ""  # geometry preset; "" = the one recorded in the dataset manifest
    dead_blocks: int = 2  # random dead blocks per sample (0 = none)
    use_stored_mask: bool = False  # use the shard's `mask` instead of random blocks
    dose: float = 1.0  # < 1: binomial thinning of the counts to this fraction
    paired: bool = False  # use the shard's stored `input` (e.g. low-count) as the input


@dataclass
class AugmentConfig:
    enabled: bool = True
    rotate_views: bool = True  # physically valid rotation: cyclic view shift, radial mirror on wrap
    flip_bins: bool = True  # mirror of the object
    affine: bool = False  # the tutorial's approximate rotate/zoom
    rotate_deg: float = 10.0
    zoom: list[float] = field(default_factory=lambda: [1.1, 1.5])
    p: float = 0.5  # probability of each switched-on transform
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = "badblock"  # badblock | unet | light
    in_channels: int = 0  # 0 = 2 * data.context + 1
    out_channels: int = 1
    base: int = 64  # width of the first level
    depth: int = 2  # unet: number of down-samplings (badblock: fixed 2)
    norm: str = "batch"  # batch | instance | group | none
    up_mode: str = "transposed"  # transposed | nearest | bilinear
    residual: bool = False  # unet: predict a correction to the centre input slice
    inpaint: bool = True  # output replaces only the missing pixels: out = x*m + pred*(1-m)
    mask_input: bool = False  # the centre gap mask as one more input channel (where to correct)


@dataclass
class LossConfig:
    l1: float = 1.0
    mse: float = 0.0
    msssim: float = 0.0  # 1 - MS-SSIM; sinograms under 161 px use fewer scales (hpc.losses)
    poisson: float = 0.0  # Poisson NLL of the counts; for non-negative outputs (badblock)
    gaps_only: bool = False  # restrict every term to the missing pixels


@dataclass
class OptimConfig:
    name: str = "adamw"  # adam | adamw | sgd | rmsprop
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "none"  # none | step | cosine_restarts | plateau
    warmup_samples: int = 0
    step_samples: int = 10000  # step: decay every N samples
    gamma: float = 0.5
    restart_samples: int = 10000  # cosine_restarts: first period (SGDR T_0), in samples
    restart_mult: int = 2
    min_lr: float = 0.0
    patience: int = 3  # plateau: validations without improvement
    clip_grad: float = 0.0  # 0 = off
    accumulate: int = 1


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    samples: int = 2048  # total samples seen (all ranks): comparable across GPU counts
    val_every: int = 512  # samples between validations
    val_batches: int = 0  # 0 = the whole validation split
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    channels_last: bool = True
    compile: bool = False
    tf32: bool = True
    deterministic: bool = False
    best_metric: str = "nmse_gap"
    best_mode: str = "min"  # min | max
    seed: int = 0


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_s: int = 300  # a dead or hung rank ends the job after this
    sync_bn: bool = False
    bucket_mb: int = 25
    find_unused: bool = False


@dataclass
class CheckpointConfig:
    every: int = 1024  # samples between checkpoints (0 = only at the end / on signal)
    keep: int = 3  # last K, plus the best
    resume: bool = True  # resume from the newest valid checkpoint in run_dir


@dataclass
class LogConfig:
    wandb: str = "disabled"  # online | offline | disabled (WANDB_MODE overrides)
    project: str = "hpc"
    entity: str = ""
    group: str = ""
    job_type: str = "train"
    name: str = ""
    every: int = 64  # samples between metric lines
    images: bool = True  # image panels at each validation
    tensorboard: bool = False
    progress: bool = True


@dataclass
class LaunchConfig:
    cluster: str = "slurm"  # slurm | local | debug
    nodes: int = 1
    gpus_per_node: int = 0  # 0 = CPU job; tasks_per_node = max(1, gpus_per_node) unless set
    tasks_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: int = 0
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_min: int = 60
    signal_delay_s: int = 120
    container: str = ""
    log_dir: str = "runs/slurm"
    max_parallel: int = 8  # sweep: job-array parallelism cap
    max_requeues: int = 10


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    corrupt: CorruptConfig = field(default_factory=CorruptConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def in_channels(self) -> int:
        return self.model.in_channels or 2 * self.data.context + 1


SECTIONS = [f.name for f in fields(Config)]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one parsed YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported field type {tp}")  # pragma: no cover


def _section_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in fields(section_cls)}


def _set(cfg: Config, section: str, key: str, value: Any, origin: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{origin}: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
    sec = getattr(cfg, section)
    types = _section_types(type(sec))
    if key not in types:
        raise ConfigError(
            f"{origin}: unknown key {section}.{key}; valid keys: {', '.join(sorted(types))}"
        )
    setattr(sec, key, _coerce(value, types[key], f"{origin}: {section}.{key}"))


def apply_dict(cfg: Config, tree: dict, origin: str = "config") -> Config:
    if not isinstance(tree, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {type(tree).__name__}")
    for section, values in tree.items():
        if section not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping")
        for key, value in values.items():
            _set(cfg, section, key, value, origin)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected section.key=value (e.g. optim.lr=3e-4)")
        dotted, raw = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from None
        _set(cfg, section, key, value, f"override {item!r}")
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``section.key=value`` overrides."""
    cfg = Config()
    if path:
        apply_dict(cfg, read_yaml(path, "config"), origin=str(path))
    return apply_overrides(cfg, list(overrides or []))


def read_yaml(path: str | Path, what: str, error: type[Exception] = ConfigError):
    """A YAML file's tree ({} when empty); ``error`` naming the file when it is missing or invalid."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: {what} file not found")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{p}: invalid YAML: {exc}") from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(tree: dict) -> Config:
    return apply_dict(Config(), tree, origin="stored config")


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config atomically (tmp, then rename)."""
    from hpc.io.atomic import atomic_write_text

    return atomic_write_text(Path(path), dump(cfg))
