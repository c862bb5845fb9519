"""One configuration tree for the whole pipeline, and its single validator.

Every section is a small dataclass; the tree is loaded from YAML and overridden on the command
line with ``section.key=value`` (values are parsed as YAML scalars/lists and type-checked:
hpc.config.parse). Unknown sections or keys are errors that list the valid ones. Every choice is a ``Literal`` and
every range, choice and cross-field rule lives in :func:`validate`, which ``load_config`` and
``from_dict`` run: no other module keeps a list of valid names or checks a config value. A
violation is a ``ConfigError``: one line naming the key, the value and what is valid (exit 2).
The resolved tree is saved with every run and checkpoint (``to_dict`` / ``save``); configs stored
in checkpoints are read back with ``from_stored`` (keys that no longer exist: a warning).

YAML words: only ``true``/``false`` are booleans when parsing (YAML 1.2), so ``log.wandb=off`` is
the string ``off``; a boolean field still takes ``yes/no/on/off``.

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "model.name=unet"])
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from hpc.config.parse import apply_dict, apply_overrides, field_types, read_yaml
from hpc.errors import ConfigError, HpcWarning
from hpc.io.atomic import atomic_write_text
from hpc.physics import geometry as G
from hpc.registry import FILLS, LOSSES, MODELS, Registry

# The valid values of every choice field (``choices(Normalize)`` gives them as a tuple).
Backend = Literal["torch", "dali"]
Edge = Literal["replicate", "reflect"]
Normalize = Literal["max", "scale", "anscombe", "none"]
PadBins = Literal["zero", "reflect"]
Device = Literal["auto", "cpu", "cuda"]
Target = Literal["measured", "expected"]
Norm = Literal["batch", "instance", "group", "none"]
UpMode = Literal["transposed", "nearest", "bilinear"]
OptimName = Literal["adam", "adamw", "sgd", "rmsprop"]  # == hpc.train.optim.OPTIMIZERS (tested)
Scheduler = Literal["none", "step", "cosine_restarts", "plateau"]
Precision = Literal["auto", "fp32", "bf16"]
DoseTarget = Literal["rest", "full"]
Metric = Literal["nmse", "psnr", "ssim", "nmse_gap", "psnr_gap", "ssim_gap", "loss"]  # validation's keys
BestMode = Literal["min", "max"]
DistBackend = Literal["auto", "nccl", "gloo"]
WandbMode = Literal["online", "offline", "disabled"]
Cluster = Literal["slurm", "local", "debug"]
GradCompression = Literal["none", "bf16"]


def choices(tp: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` type, e.g. ``choices(Normalize) == ("max", "scale", ...)``."""
    return typing.get_args(tp)


@dataclass
class DataConfig:
    path: str = ""  # converted dataset dir (manifest.json + shards/)
    backend: Backend = "torch"
    context: int = 2  # k neighbouring slices each side -> 2k+1 input channels
    edge: Edge = "replicate"  # context at the ends of a (study, tof, segment) stack
    batch_size: int = 16  # per rank
    workers: int = 2  # reader processes per rank (0 = in the main process)
    run_length: int = 32  # contiguous slices read at once (windows are cut from runs)
    shuffle_buffer: int = 256  # windows held for shuffling
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train/val/test by study
    train_studies: list[str] = field(default_factory=list)  # explicit lists override `split`
    val_studies: list[str] = field(default_factory=list)
    test_studies: list[str] = field(default_factory=list)
    normalize: Normalize = "max"
    pad_bins: PadBins = "zero"
    fill: str = "zero"  # gaps in the network input (hpc.registry.FILLS): zero, linear, reproject, ...
    fill_iters: int = 4  # data.fill=reproject: OSEM iterations (x 4 subsets) of the plane before projecting
    nonneg: bool = True  # counts >= 0: predictions, baselines floored at 0 (false: e.g. randoms-subtracted)
    # what the loss compares with: "measured", the stored counts (all real data has); "expected", the
    # noise-free counts a simulated dataset stores (hpc convert --expected): no Poisson noise in the
    # target (at ~4 counts per bin it dominates), for networks trained on simulations only
    target: Target = "measured"
    pad_multiple: int = 0  # 0 = from the model (2**depth)
    stage_to: str = ""  # node-local dir (e.g. /raid/$USER) to copy shards to before epoch 0
    device: Device = "auto"
    seed: int = 0


@dataclass
class CorruptConfig:
    scanner: str = ""  # geometry preset; "" = the one recorded in the dataset manifest
    dead_blocks: int = 2  # random dead blocks per sample (0 = none)
    use_stored_mask: bool = False  # use the shard's `mask` instead of random blocks
    dose: float = 1.0  # < 1: binomial thinning of the counts to this fraction (a denoising input)
    # what a thinned input is trained against: "rest", the counts the thinning did not keep, scaled by
    # 1 / (1 - dose): the right mean and independent of the input; "full", the whole scan, which holds
    # the input's own counts (a network trained on it keeps a fraction `dose` of the input's noise)
    dose_target: DoseTarget = "rest"
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
    name: str = "badblock"  # hpc.registry.MODELS: badblock, unet, light, ...
    in_channels: int = 0  # 0 = 2 * data.context + 1
    out_channels: int = 1
    base: int = 64  # width of the first level
    depth: int = 2  # unet: number of down-samplings (badblock: fixed 2)
    norm: Norm = "batch"
    up_mode: UpMode = "transposed"
    residual: bool = False  # unet: predict a correction to the centre input slice
    inpaint: bool = True  # output replaces only the missing pixels: out = x*m + pred*(1-m)
    mask_input: bool = False  # the centre gap mask as one more input channel (where to correct)


@dataclass
class LossConfig:
    """``loss.<term>=<weight>`` for the terms registered in hpc.train.losses (hpc.registry.LOSSES):
    l1, mse, msssim (1 - MS-SSIM), poisson (Poisson NLL, for non-negative outputs), ...; stored flat,
    e.g. ``loss: {l1: 1.0, msssim: 0.2, gaps_only: false}``."""
    weights: dict[str, float] = field(default_factory=lambda: {"l1": 1.0})
    gaps_only: bool = False  # restrict every term to the missing pixels
    EXTRA: ClassVar[str] = "weights"  # the section's other keys are term names -> weights (hpc.config.parse)


@dataclass
class OptimConfig:
    name: OptimName = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: Scheduler = "none"
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
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    channels_last: bool = True
    compile: bool = False
    tf32: bool = True
    deterministic: bool = False
    best_metric: Metric = "nmse_gap"
    best_mode: BestMode = "min"
    seed: int = 0
    ema: float = 0.0  # decay per step of the weights' moving average that is validated and used (0 = off)


@dataclass
class DistConfig:
    backend: DistBackend = "auto"  # auto: nccl on GPU, gloo on CPU
    timeout_s: int = 300  # a dead or hung rank ends the job after this
    sync_bn: bool = False
    bucket_mb: int = 0  # DDP gradient bucket; 0 = from the parameter count (hpc.distributed.dist.bucket_mb_for)
    find_unused: bool = False
    static_graph: bool = False  # DDP static_graph: the same parameters get gradients every step
    grad_compression: GradCompression = "none"  # bf16: gradients all-reduced in bfloat16 (half the bytes)
    preempt_every: int = 10  # steps between the ranks' agreement on a signal and a non-finite loss (a host sync)


@dataclass
class CheckpointConfig:
    every: int = 1024  # samples between checkpoints (0 = only at the end / on signal)
    keep: int = 3  # last K, plus the best
    resume: bool = True  # resume from the newest valid checkpoint in run_dir


@dataclass
class LogConfig:
    wandb: WandbMode = "disabled"  # WANDB_MODE overrides
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
    cluster: Cluster = "slurm"
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


# ---------------------------------------------------------------- loading and saving
def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (see find_config) <- ``section.key=value`` overrides, then ``validate``."""
    cfg = Config()
    if path:
        apply_dict(cfg, read_yaml(find_config(path), "config"), origin=str(path))
    return validate(apply_overrides(cfg, list(overrides or [])))


def find_config(path: str | os.PathLike) -> Path:
    """The config file: `path` when it exists; else, for `NAME`, `NAME.yaml` or `configs/NAME.yaml`,
    the config of that name shipped in the package (hpc/configs/, the repo's configs/), so the
    documented `--config configs/tiny.yaml` also works outside a checkout (pip install, images)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = resources.files("hpc") / "configs"
    name = p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml"
    if p.parent in (Path("."), Path("configs")) and (shipped / name).is_file():
        return Path(str(shipped / name))
    names = sorted(f.name.removesuffix(".yaml") for f in shipped.iterdir() if f.name.endswith(".yaml"))
    raise ConfigError(f"{p}: config file not found (shipped with hpc: {', '.join(names)})")


def to_dict(cfg: Config) -> dict:
    """The tree as plain values; a section's EXTRA dict is stored flat (``loss: {l1: 1.0, gaps_only: false}``)."""
    tree = dataclasses.asdict(cfg)
    for name in SECTIONS:
        extra = getattr(type(getattr(cfg, name)), "EXTRA", None)
        if extra:
            tree[name] = {**tree[name].pop(extra), **tree[name]}
    return tree


def from_dict(tree: dict, origin: str = "stored config") -> Config:
    """A resolved tree (``to_dict``) back into a validated Config; unknown keys are errors."""
    return validate(apply_dict(Config(), tree, origin=origin))


def from_stored(tree: dict, origin: str) -> Config:
    """A config stored by (possibly older) code, e.g. in a checkpoint: keys that no longer exist
    are dropped with a warning naming ``origin`` (loss terms no longer registered too); everything
    else is checked as ``from_dict``."""
    cfg = apply_dict(Config(), tree, origin=origin, lenient=True)
    for term in [t for t in cfg.loss.weights if t not in LOSSES]:
        warnings.warn(f"{origin}: loss term {term!r} no longer exists; ignored", HpcWarning, stacklevel=2)
        del cfg.loss.weights[term]
    return validate(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config atomically (tmp, then rename)."""

    return atomic_write_text(Path(path), dump(cfg))


# ---------------------------------------------------------------- validation
Rule = tuple[Callable[[Any], bool], str]  # (holds for the value, what is valid)


def _ge(lo: float) -> Rule:
    return (lambda v: v >= lo), f">= {lo}"


def _gt(lo: float) -> Rule:
    return (lambda v: v > lo), f"> {lo}"


def _between(lo: float, hi: float, why: str) -> Rule:
    return (lambda v: lo <= v <= hi), f">= {lo} and <= {hi} ({why})"


def _pair(ok: Callable[[float, float], bool], what: str) -> Rule:
    return (lambda v: len(v) == 2 and ok(*v)), what


# Sizes beyond any real use, so that nothing is built (or allocated) from an absurd value; what fits
# the data and the memory at hand is checked where they are known (hpc.data.index, hpc.train.models).
MAX_CONTEXT, MAX_BASE, MAX_DEPTH = 1024, 65536, 16
# Ranges of single fields. Choices come from the Literal types, finiteness from the float types.
RANGES: dict[str, Rule] = {
    "data.context": _between(0, MAX_CONTEXT, "no scanner has a segment of that many planes"),
    "data.batch_size": _ge(1), "data.workers": _ge(0), "data.run_length": _ge(1),
    "data.shuffle_buffer": _ge(0), "data.pad_multiple": _ge(0), "data.seed": _ge(0), "data.fill_iters": _ge(1),
    "data.split": ((lambda v: len(v) == 3 and min(v) >= 0 and sum(v) > 0),
                   "three fractions (train, val, test) >= 0 with a positive sum"),
    "corrupt.dead_blocks": _ge(0),
    "corrupt.dose": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "augment.rotate_deg": _ge(0),
    "augment.zoom": _pair(lambda lo, hi: 0 < lo <= hi, "two numbers [lo, hi] with 0 < lo <= hi"),
    "augment.p": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "augment.seed": _ge(0),
    "model.in_channels": _ge(0), "model.out_channels": _ge(1),
    "model.base": _between(1, MAX_BASE, "wider networks do not fit any GPU"),
    "model.depth": _between(1, MAX_DEPTH, "2**depth must divide the slice sides"),
    "optim.lr": _gt(0), "optim.weight_decay": _ge(0), "optim.momentum": _ge(0),
    "optim.betas": _pair(lambda b1, b2: 0 <= b1 < 1 and 0 <= b2 < 1, "two numbers in [0, 1)"),
    "optim.warmup_samples": _ge(0), "optim.step_samples": _ge(1),
    "optim.gamma": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "optim.restart_samples": _ge(1), "optim.restart_mult": _ge(1), "optim.min_lr": _ge(0),
    "optim.patience": _ge(0), "optim.clip_grad": _ge(0), "optim.accumulate": _ge(1),
    "train.run_dir": ((lambda v: bool(v.strip())), "a directory (not empty)"),
    "train.samples": _ge(1), "train.val_every": _ge(0), "train.val_batches": _ge(0), "train.seed": _ge(0),
    "train.ema": ((lambda v: 0 <= v < 1), "in [0, 1) (0 = off; 0.999 averages ~1,000 steps)"),
    "dist.timeout_s": _ge(1), "dist.bucket_mb": _ge(0), "dist.preempt_every": _ge(1),
    "checkpoint.every": _ge(0), "checkpoint.keep": _ge(1),
    "log.every": _ge(1),
    "launch.nodes": _ge(1), "launch.gpus_per_node": _ge(0), "launch.tasks_per_node": _ge(0),
    "launch.cpus_per_task": _ge(1), "launch.mem_gb": _ge(0), "launch.time_min": _ge(1),
    "launch.signal_delay_s": _ge(0), "launch.max_parallel": _ge(1), "launch.max_requeues": _ge(0),
}


def _fail(key: str, value: Any, what: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: {what}")


def _finite(value: Any) -> bool:
    items = value if isinstance(value, list) else [value]
    return all(math.isfinite(v) for v in items if isinstance(v, float))


# Fields whose valid values are a registry's names (asking a registry imports its home module).
REGISTERED: dict[str, Registry] = {"data.fill": FILLS, "model.name": MODELS}


def _check_registered(cfg: Config) -> None:
    """Registry-backed fields name a registered entry; loss weights are finite, >= 0, of registered terms."""
    for key, registry in REGISTERED.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in registry:
            raise _fail(key, value, f"expected one of {' | '.join(registry.names())}")
    for term, weight in cfg.loss.weights.items():
        if term not in LOSSES:
            raise _fail(f"loss.{term}", weight, f"not a loss term; expected one of {' | '.join(LOSSES.names())}")
        if not math.isfinite(weight) or weight < 0:
            raise _fail(f"loss.{term}", weight, "must be a finite number >= 0")


def _check_fields(cfg: Config) -> None:
    """Every field: a member of its Literal, a finite number, inside its RANGES entry."""
    for section in SECTIONS:
        sec = getattr(cfg, section)
        for key, tp in field_types(type(sec)).items():
            name, value = f"{section}.{key}", getattr(sec, key)
            if typing.get_origin(tp) is Literal and value not in choices(tp):
                raise _fail(name, value, f"expected one of {' | '.join(choices(tp))}")
            if not _finite(value):
                raise _fail(name, value, "must be a finite number")
            ok, what = RANGES.get(name, (None, ""))
            if ok is not None and not ok(value):
                raise _fail(name, value, f"must be {what}")


def validate_scanner(cfg: Config, name: str) -> None:
    """corrupt.scanner (or the dataset's recorded scanner, ``name``) is a known geometry preset with
    at least corrupt.dead_blocks blocks. The presets' registry is hpc.registry.SCANNERS."""
    try:
        sc = G.get_scanner(name)
    except ValueError as exc:
        raise _fail("corrupt.scanner", name, str(exc).replace(f"unknown scanner {name!r}; ", "")) from None
    n_blocks = G.block_counts(sc)[1]
    if cfg.corrupt.dead_blocks > n_blocks:
        raise _fail("corrupt.dead_blocks", cfg.corrupt.dead_blocks,
                    f"must be <= {n_blocks}, the blocks of scanner {sc.name!r}")


def _check_rules(cfg: Config) -> None:
    """Rules that join fields."""
    d, m, o, la = cfg.data, cfg.model, cfg.optim, cfg.launch
    if m.in_channels not in (0, 2 * d.context + 1):
        raise _fail("model.in_channels", m.in_channels,
                    f"must be 0 (automatic) or 2 * data.context + 1 = {2 * d.context + 1}")
    if m.inpaint and m.out_channels != 1:
        raise _fail("model.out_channels", m.out_channels, "must be 1 with model.inpaint=true")
    if not any(w > 0 for w in cfg.loss.weights.values()):
        raise ConfigError(f"loss: every weight is 0; set at least one of "
                          f"{', '.join(f'loss.{t}' for t in LOSSES.names())} > 0")
    if o.min_lr > o.lr:
        raise _fail("optim.min_lr", o.min_lr, f"must be <= optim.lr={o.lr}")
    lists = {s: getattr(d, f"{s}_studies") for s in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        if shared := sorted(set(lists[a]) & set(lists[b])):
            raise _fail(f"data.{b}_studies", lists[b], f"shares {shared} with data.{a}_studies")
    if d.device == "cpu" and cfg.dist.sync_bn:
        raise _fail("dist.sync_bn", True, "needs GPU ranks (data.device=cpu)")
    if cfg.dist.grad_compression == "bf16" and (d.device == "cpu" or cfg.dist.backend == "gloo"):
        raise _fail("dist.grad_compression", "bf16", "needs NCCL ranks (not data.device=cpu or dist.backend=gloo)")
    if la.cluster != "slurm" and la.nodes != 1:
        raise _fail("launch.nodes", la.nodes, f"must be 1 with launch.cluster={la.cluster} (one machine)")
    if la.signal_delay_s >= 60 * la.time_min:
        raise _fail("launch.signal_delay_s", la.signal_delay_s,
                    f"must be < launch.time_min * 60 = {60 * la.time_min}")
    if cfg.corrupt.scanner:
        validate_scanner(cfg, cfg.corrupt.scanner)


def check_dataset(cfg: Config, workdir: str | os.PathLike | None = None):
    """The hpc.io.shards.Dataset at data.path (relative to ``workdir``, default here): what the
    launchers check before anything is queued and the loader opens. InputError naming the directory."""
    from hpc.io.shards import Dataset  # late: h5py

    if not cfg.data.path:
        raise ConfigError("data.path: not set (a dataset directory written by `hpc convert`)")
    return Dataset.open(Path(workdir or ".") / cfg.data.path)


def validate(cfg: Config) -> Config:
    """Every range, choice and cross-field rule of the tree; returns ``cfg``, or raises a one-line
    ``ConfigError`` naming the key, the value and what is valid."""
    _check_fields(cfg)
    _check_registered(cfg)
    _check_rules(cfg)
    return cfg
