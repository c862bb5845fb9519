"""Train a sinogram-repair UNet: one CPU process, one GPU, or many nodes (DDP), same code.

Steps are counted in samples seen by all ranks, so runs on different GPU counts compare. The run
resumes by itself from the newest valid checkpoint in train.run_dir; SIGUSR2 or SIGTERM finishes
the current step, writes a checkpoint and exits with code 75 (requeue me).

example:
  hpc train --config configs/tiny.yaml data.path=data/demo train.run_dir=runs/tiny optim.lr=3e-4
  torchrun --standalone --nproc_per_node=2 -m hpc train --config configs/tiny.yaml
  srun -n 8 hpc train --config configs/dgx.yaml log.wandb=offline
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from hpc import checkpoint as ck
from hpc import dist
from hpc.config import Config, OptimConfig, load_config, to_dict
from hpc.errors import EXIT_REQUEUE, ConfigError, HpcError

PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULERS = ("none", "step", "cosine_restarts", "plateau")
BASELINES = ("linear", "biharmonic")


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    kinds = {
        "adam": lambda: torch.optim.Adam(params, cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay),
        "adamw": lambda: torch.optim.AdamW(params, cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay),
        "sgd": lambda: torch.optim.SGD(params, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
        "rmsprop": lambda: torch.optim.RMSprop(params, cfg.lr, momentum=cfg.momentum,
                                               weight_decay=cfg.weight_decay),
    }
    if cfg.name not in kinds:
        raise ConfigError(f"optim.name: unknown optimizer {cfg.name!r}; valid: {', '.join(kinds)}")
    if cfg.lr <= 0 or len(cfg.betas) != 2:
        raise ConfigError(f"optim: lr must be > 0 and betas two numbers (got {cfg.lr}, {cfg.betas})")
    return kinds[cfg.name]()


class LRSchedule:
    """Learning rate as a function of samples seen: warmup x (step | SGDR cosine restarts), and a
    reduce-on-plateau factor driven by validation. Set on the optimizer before every step."""

    def __init__(self, cfg: OptimConfig, mode: str):
        if cfg.scheduler not in SCHEDULERS:
            raise ConfigError(f"optim.scheduler: unknown {cfg.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        if min(cfg.step_samples, cfg.restart_samples) < 1 or cfg.restart_mult < 1 or cfg.warmup_samples < 0:
            raise ConfigError("optim: step_samples, restart_samples, restart_mult must be >= 1 "
                              "and warmup_samples >= 0")
        self.cfg, self.mode = cfg, mode
        self.scale, self.best, self.bad = 1.0, math.inf if mode == "min" else -math.inf, 0

    def lr(self, samples: int) -> float:
        c = self.cfg
        lr = c.lr * self.scale
        if c.scheduler == "step":
            lr *= c.gamma ** (samples // c.step_samples)
        elif c.scheduler == "cosine_restarts":
            t, period = samples, c.restart_samples
            while t >= period:  # SGDR: each period restart_mult times longer than the last
                t, period = t - period, period * c.restart_mult
            lr = c.min_lr + (lr - c.min_lr) * 0.5 * (1 + math.cos(math.pi * t / period))
        if samples < c.warmup_samples:
            lr *= (samples + 1) / c.warmup_samples
        return max(lr, c.min_lr) if c.scheduler == "plateau" else lr

    def apply(self, optimizer: torch.optim.Optimizer, samples: int) -> float:
        lr = self.lr(samples)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def observe(self, value: float) -> None:
        """Plateau: after `patience` validations without improvement multiply the lr by gamma."""
        if self.cfg.scheduler != "plateau" or not math.isfinite(value):
            return
        better = value < self.best if self.mode == "min" else value > self.best
        self.best, self.bad = (value, 0) if better else (self.best, self.bad + 1)
        if self.bad > self.cfg.patience:
            self.scale, self.bad = self.scale * self.cfg.gamma, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.best, self.bad = float(state["scale"]), float(state["best"]), int(state["bad"])


class Preemption:
    """SIGUSR2 / SIGTERM set a flag; the loop checks it (agreed across ranks) after each step."""

    def __init__(self):
        self.signal = 0
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def requested(self, device: torch.device) -> bool:
        flag = torch.tensor([float(self.signal != 0)], device=device)
        return bool(dist.all_reduce_sum(flag).item() > 0)


def check_config(cfg: Config) -> None:
    t = cfg.train
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision: expected one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    if t.best_mode not in ("min", "max"):
        raise ConfigError(f"train.best_mode: expected min or max, got {t.best_mode!r}")
    if t.samples < 1 or t.val_every < 0 or cfg.checkpoint.every < 0 or cfg.log.every < 1:
        raise ConfigError("train.samples >= 1, train.val_every >= 0, checkpoint.every >= 0 and "
                          "log.every >= 1 needed")
    if cfg.optim.accumulate < 1 or cfg.optim.clip_grad < 0:
        raise ConfigError(f"optim.accumulate must be >= 1 and optim.clip_grad >= 0 "
                          f"(got {cfg.optim.accumulate}, {cfg.optim.clip_grad})")


def set_numerics(cfg: Config, device: torch.device) -> torch.dtype | None:
    """TF32, cuDNN autotuning / deterministic algorithms; returns the autocast dtype (None = fp32)."""
    t = cfg.train
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.tf32
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = device.type == "cuda"
    precision = t.precision if t.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return torch.bfloat16 if precision == "bf16" else None


def _crossed(before: int, after: int, every: int) -> bool:
    return every > 0 and after // every > before // every


class Trainer:
    def __init__(self, cfg: Config):
        from hpc.data import build_loader
        from hpc.logger import RunLogger
        from hpc.losses import build_loss
        from hpc.models import build_model

        check_config(cfg)
        self.cfg = cfg
        self.stop = Preemption()  # before the slow set-up: a signal then still ends in a checkpoint
        self.ctx = ctx = dist.init(cfg.dist, cfg.data.device)
        dist.seed_everything(cfg.train.seed, ctx.rank)
        self.amp = set_numerics(cfg, ctx.device)
        self.fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.loader = build_loader(cfg, "train", ctx.rank, ctx.world, ctx.device)
        self.val_loader = build_loader(cfg, "val", ctx.rank, ctx.world, ctx.device) if cfg.train.val_every else None
        self.model = build_model(cfg.model, cfg.in_channels()).to(ctx.device, memory_format=self.fmt)
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters())
        self.sched = LRSchedule(cfg.optim, cfg.train.best_mode)
        self.loss = build_loss(cfg.loss)
        self.ckpt = ck.Checkpointer(cfg.train.run_dir, cfg.checkpoint.keep)
        self.step = 0  # samples seen by all ranks
        self.best = math.inf if cfg.train.best_mode == "min" else -math.inf
        self.metrics: dict[str, float] = {}
        self.val_step = -1  # step of the last validation
        self.baselines: dict[str, dict[str, float]] | None = None  # fixed val set: computed once
        self.resumed_from = self._resume() if cfg.checkpoint.resume else None
        self.net = dist.wrap(self.model, cfg.dist, ctx, compile=cfg.train.compile)
        self.log = RunLogger(cfg, ctx.rank == 0, cfg.train.samples, self.step)
        self.batch_samples = cfg.data.batch_size * ctx.world  # samples per micro-batch, all ranks
        ds = self.loader.index.ds  # what `hpc predict` needs to preprocess new inputs the same way
        self.data_info = {"scale": float(ds.scale), "slice_shape": list(ds.slice_shape),
                          "scanner": cfg.corrupt.scanner or ds.scanner}

    # ------------------------------------------------------------ state
    def _resume(self) -> Path | None:
        state, path = self.ckpt.resume()
        if state is None:
            return None
        if state["rng"] and len(state["rng"]) != self.ctx.world:
            raise ConfigError(f"{path}: written by {len(state['rng'])} rank(s), this job has {self.ctx.world}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        self.sched.load_state_dict(state["sched"])
        self.loader.load_state_dict(state["loader"])
        ck.set_rng_state(state["rng"][self.ctx.rank])
        self.step, self.best, self.metrics = int(state["step"]), float(state["best"]), dict(state["metrics"])
        if self.ctx.rank == 0:
            print(f"hpc train: resumed from {path} (step {self.step})", file=sys.stderr, flush=True)
        return path

    def _save(self, is_best: bool = False) -> Path | None:
        """Every rank contributes its RNG state; rank 0 alone writes."""
        rng = dist.gather_objects(ck.rng_state())
        path = None
        if self.ctx.rank == 0:
            state = {"model": self.model.state_dict(), "optim": self.optimizer.state_dict(),
                     "sched": self.sched.state_dict(), "step": self.step, "epoch": self.loader.epoch,
                     "loader": self.loader.state_dict(), "rng": rng, "config": to_dict(self.cfg),
                     "metrics": self.metrics, "best": self.best, "data": self.data_info,
                     **ck.code_version()}
            path = self.ckpt.save(state, self.step, is_best)
        dist.barrier()  # nobody runs ahead (or exits) before the file is in place
        return path

    # ------------------------------------------------------------ steps
    def _batches(self):
        while True:  # the loader advances its own epoch at the end of each pass
            yield from self.loader

    def _forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch.input.contiguous(memory_format=self.fmt)
        with torch.autocast(self.ctx.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            pred = self.net(x, batch.mask)
        return pred, self.loss(pred, batch.target, batch.mask)[0]

    def train_step(self, batches) -> float:
        """One optimizer step over `accumulate` micro-batches; returns the mean loss (this rank)."""
        self.net.train()
        n, total = self.cfg.optim.accumulate, 0.0
        lr = self.sched.apply(self.optimizer, self.step)
        for i in range(n):
            with dist.no_sync(self.net, skip=i < n - 1):  # all-reduce gradients once per step
                _, loss = self._forward(next(batches))
                (loss / n).backward()
            total += float(loss.detach())
        if self.cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr = lr
        return total / n

    def _floor(self, y: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """Counts cannot be negative (data.nonneg): validation scores what hpc predict writes."""
        from hpc.augment import floor_counts

        return floor_counts(y, self.cfg.data.normalize, norm) if self.cfg.data.nonneg else y

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        from hpc.augment import crop
        from hpc.metrics import MetricAccumulator, baseline_batch

        self.net.eval()
        acc = MetricAccumulator()
        base = {name: MetricAccumulator() for name in BASELINES} if self.baselines is None else {}
        loss_sum = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)  # (sum B*loss, B)
        panels = None
        for j, batch in enumerate(self.val_loader):
            if self.cfg.train.val_batches and j >= self.cfg.train.val_batches:
                break
            pred, loss = self._forward(batch)
            loss_sum += torch.stack([loss.double() * len(pred), loss.new_tensor(len(pred)).double()])
            p, t, m = (crop(a.float(), batch.pad) for a in (pred, batch.target, batch.mask))
            p = self._floor(p, batch.norm)
            acc.update(p, t, m)
            centre = crop(batch.input[:, self.model.centre : self.model.centre + 1], batch.pad)
            for name, b in base.items():
                b.update(self._floor(baseline_batch(name, centre, m), batch.norm), t, m)
            if panels is None:
                panels = {"input": centre[0, 0], "prediction": p[0, 0], "target": t[0, 0],
                          "error": (p - t)[0, 0].abs(), "mask": m[0, 0]}
        metrics = acc.compute(dist.all_reduce_sum(acc.state(self.ctx.device)))
        metrics["loss"] = float(dist.all_reduce_sum(loss_sum)[0] / loss_sum[1].clamp_min(1))
        if base:
            self.baselines = {n: b.compute(dist.all_reduce_sum(b.state(self.ctx.device))) for n, b in base.items()}
        if self.cfg.log.images and panels is not None:
            self.log.images(self.step, panels)
        return metrics

    def _validate_and_track(self) -> bool:
        """Validate, log (with the baselines), step the plateau schedule; True when a new best."""
        metrics = self.validate()
        key = self.cfg.train.best_metric
        if key not in metrics:
            raise ConfigError(f"train.best_metric: unknown metric {key!r}; valid: {', '.join(metrics)}")
        self.metrics, self.val_step = metrics, self.step
        values = dict(metrics)
        for name, m in (self.baselines or {}).items():
            values |= {f"{name}_{k}": v for k, v in m.items()}
        self.log.scalars(self.step, values, kind="val")
        self.sched.observe(metrics[key])
        value = metrics[key]
        better = value < self.best if self.cfg.train.best_mode == "min" else value > self.best
        if better and math.isfinite(value):
            self.best = value
        return better

    # ------------------------------------------------------------ loop
    def run(self) -> dict:
        cfg, stop = self.cfg, self.stop
        batches, samples_per_step = self._batches(), self.batch_samples * cfg.optim.accumulate
        window = (time.perf_counter(), self.step)  # throughput over each logging interval
        while self.step < cfg.train.samples:
            before = self.step
            loss = self.train_step(batches)
            self.step += samples_per_step
            self.log.progress(samples_per_step, f"loss {loss:.4g}")
            if _crossed(before, self.step, cfg.log.every):
                now = time.perf_counter()
                self._log_train(loss, (self.step - window[1]) / (now - window[0]))
                window = (now, self.step)
            is_best = self.val_loader is not None and _crossed(before, self.step, cfg.train.val_every) \
                and self._validate_and_track()
            preempted = stop.requested(self.ctx.device)
            if preempted or is_best or _crossed(before, self.step, cfg.checkpoint.every):
                path = self._save(is_best)
            if preempted:
                self.log.message(f"signal {stop.signal or 'on another rank'}: checkpoint {path or ''} "
                                 f"at step {self.step}; exiting with {EXIT_REQUEUE} (requeue)")
                self.log.close()
                raise SystemExit(EXIT_REQUEUE)
        return self._finish()

    def _log_train(self, loss: float, rate: float) -> None:
        mean_loss = dist.all_reduce_sum(torch.tensor([loss], device=self.ctx.device))[0] / self.ctx.world
        values = {"loss": float(mean_loss), "lr": self.lr, "samples_per_s": rate, "epoch": self.loader.epoch}
        if self.ctx.device.type == "cuda":
            values["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        self.log.scalars(self.step, values, kind="train")

    def _finish(self) -> dict:
        """Validate the final weights (unless that just happened) and checkpoint them."""
        is_best = False
        if self.val_loader is not None and self.val_step != self.step:
            is_best = self._validate_and_track()
        last = self.ckpt.path(self.step)
        path = self._save(is_best) if is_best or not last.exists() else last
        self.log.close()
        return {"step": self.step, "epoch": self.loader.epoch, "metrics": self.metrics,
                "baselines": self.baselines or {}, "best": self.best, "run_dir": str(self.cfg.train.run_dir),
                "checkpoint": str(path or last), "best_checkpoint": str(self.ckpt.best_path),
                "resumed_from": str(self.resumed_from or "")}


def train(cfg: Config) -> dict:
    """Train to cfg.train.samples (resuming if a checkpoint exists); the final metrics and paths.
    Raises SystemExit(EXIT_REQUEUE) after checkpointing on SIGUSR2/SIGTERM."""
    return Trainer(cfg).run()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config YAML (e.g. configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. optim.lr=3e-4 train.samples=4096")


def run(args: argparse.Namespace) -> int:
    """Launcher env -> train -> clean distributed shutdown (ENV-FACTS.md) with the run's exit code."""
    from hpc.launch.env import setup_torch_env

    setup_torch_env()
    cfg = load_config(args.config, args.overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        train(cfg)  # errors reach the CLI, which prints one line
        return 0
    try:
        train(cfg)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    except HpcError as exc:
        print(f"hpc train: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except Exception:  # e.g. a collective timed out because a peer died
        traceback.print_exc()
        code = 1
    dist.shutdown(code)
    return code  # not reached: shutdown exits
