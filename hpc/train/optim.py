"""The training step's numerical components, each built from its config section (torchtitan style):
the optimizer (`build_optimizer`, registry `OPTIMIZERS`), the learning-rate schedule (`LRSchedule`:
state_dict()/load_state_dict(), saved under the checkpoint's ``sched`` key) and the numerics of the
step (`set_numerics`: TF32, cuDNN, deterministic algorithms, autocast dtype).

    optimizer = build_optimizer(cfg.optim, model.parameters())
    sched = LRSchedule(cfg.optim, cfg.train.best_mode); sched.apply(optimizer, samples)
    amp = set_numerics(cfg, device)  # torch.bfloat16 or None (fp32)
"""
from __future__ import annotations

import math
import os

import torch

from hpc.config import Config, OptimConfig

# optim.name -> optimizer (the names are hpc.config.OptimName's; tests/test_config.py checks they agree)
OPTIMIZERS = {
    "adam": lambda c, p: torch.optim.Adam(p, c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay),
    "adamw": lambda c, p: torch.optim.AdamW(p, c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay),
    "sgd": lambda c, p: torch.optim.SGD(p, c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "rmsprop": lambda c, p: torch.optim.RMSprop(p, c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
}


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    """The configured optimizer (cfg already validated by hpc.config)."""
    return OPTIMIZERS[cfg.name](cfg, params)


class LRSchedule:
    """Learning rate as a function of samples seen: warmup x (step | SGDR cosine restarts), and a
    reduce-on-plateau factor driven by validation. Set on the optimizer before every step."""

    def __init__(self, cfg: OptimConfig, mode: str):
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
