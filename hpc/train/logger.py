"""Run logging: console progress (rank 0), ``metrics.jsonl`` + ``config.yaml`` in the run dir
(readable without any service), W&B (rank 0; online / offline / disabled) and optional TensorBoard.

    log = RunLogger(cfg, main=ctx.rank == 0, total=cfg.train.samples)
    log.scalars(step, {"loss": 0.1, "lr": 1e-3}, kind="train")
    log.images(step, {"input": x, "prediction": y, ...})   # (V, X) tensors
    log.close()

On other ranks every call does nothing. W&B never prompts: online mode needs WANDB_API_KEY in the
environment (the key is never written anywhere by this module).

W&B across requeues and crash-resumes: one W&B run per run dir (its id in run_dir/wandb_id). The
x-axis of every chart is `samples`, a metric of its own (`define_metric`), not W&B's step: after a
resume from an older checkpoint the sample counts repeat, and W&B drops any point whose step is
below the last one it saw. W&B's step is a log counter that only grows, kept in run_dir/wandb_step
(reserved before each log call, so it is never behind after a kill -9).
"""
from __future__ import annotations

import json
import math
import os
import secrets
import sys
from pathlib import Path

import numpy as np
import torch

from hpc import config as C
from hpc.errors import ConfigError
from hpc.io.atomic import atomic_write_text
from hpc.progress import Progress

WANDB_MODES = C.choices(C.WandbMode)  # also what the WANDB_MODE variable may say


def wandb_mode(cfg: C.LogConfig) -> str:
    """WANDB_MODE from the environment wins over log.wandb (so a batch script can force offline)."""
    mode = os.environ.get("WANDB_MODE") or cfg.wandb
    if mode == "dryrun":  # wandb's older spelling of offline
        mode = "offline"
    if mode not in WANDB_MODES:
        raise ConfigError(f"log.wandb / WANDB_MODE: expected one of {', '.join(WANDB_MODES)}, got {mode!r}")
    return mode


def to_uint8(img: torch.Tensor, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """(V, X) tensor -> (V, X) uint8 scaled to [lo, hi] (its own range by default)."""
    a = img.detach().float().cpu().numpy()
    lo = float(np.nanmin(a)) if lo is None else lo
    hi = float(np.nanmax(a)) if hi is None else hi
    scaled = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return (np.clip(np.nan_to_num(scaled), 0, 1) * 255).astype(np.uint8)


class RunLogger:
    def __init__(self, cfg: C.Config, main: bool, total: int, resumed_step: int = 0):
        self.main = main
        self.run_dir = Path(cfg.train.run_dir)
        self.wandb = self.tb = self.bar = None
        self._jsonl = None
        if not main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        C.save(cfg, self.run_dir / "config.yaml")
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # one line per record
        self.bar = Progress(total=total, unit="samples", desc="train", enabled=cfg.log.progress)
        self.bar.update(resumed_step)
        self.mode = wandb_mode(cfg.log)
        if self.mode != "disabled":
            self.wandb = self._init_wandb(cfg)
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("log.tensorboard=true needs the `tensorboard` package "
                                  "(pip install tensorboard), or set log.tensorboard=false") from None
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def _init_wandb(self, cfg: C.Config):
        import wandb

        if self.mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise ConfigError("log.wandb=online needs WANDB_API_KEY in the environment "
                              "(or use log.wandb=offline and `wandb sync` later)")
        # the same W&B run continues across requeues/resumes of this run dir
        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        atomic_write_text(id_file, run_id)
        lc = cfg.log
        run = wandb.init(
            mode=self.mode, dir=str(self.run_dir), id=run_id, resume="allow",
            project=lc.project, entity=lc.entity or None, group=lc.group or None,
            job_type=lc.job_type or None, name=lc.name or self.run_dir.name,
            config=C.to_dict(cfg), settings=wandb.Settings(console="off", silent=True))
        run.define_metric("samples")
        run.define_metric("*", step_metric="samples")  # every chart's x-axis
        step_file = self.run_dir / "wandb_step"
        saved = int(step_file.read_text()) + 1 if step_file.exists() else 0
        self._wandb_step = max(saved, run.starting_step)  # online: the server knows the last step too
        return run

    def _wandb_log(self, data: dict, samples: int) -> None:
        """One W&B log call at the next step of the run's counter (see the module docstring)."""
        step = self._wandb_step
        atomic_write_text(self.run_dir / "wandb_step", str(step))  # reserved before it is used
        self._wandb_step += 1
        self.wandb.log(data | {"samples": samples}, step=step)

    def progress(self, samples: int, postfix: str = "") -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix)
            self.bar.update(samples)

    def scalars(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        """One metrics.jsonl line {"step", "kind", **values}; W&B/TensorBoard keys are kind/name."""
        if not self.main:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": step, "kind": kind, **clean}) + "\n")
        if self.wandb is not None:
            self._wandb_log({f"{kind}/{k}": v for k, v in values.items()}, step)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def images(self, step: int, panels: dict[str, torch.Tensor]) -> None:
        """Image panels, e.g. input/prediction/target/error/mask, each a (V, X) tensor. input,
        prediction and target share the target's intensity range so they compare by eye."""
        if not self.main or (self.wandb is None and self.tb is None):
            return
        ref = panels.get("target")
        lo, hi = (float(ref.min()), float(ref.max())) if ref is not None else (None, None)
        shared = {"input", "prediction", "target"}
        arrays = {k: to_uint8(v, *((lo, hi) if k in shared else (None, None))) for k, v in panels.items()}
        if self.wandb is not None:
            import wandb

            self._wandb_log({f"images/{k}": wandb.Image(a, caption=k) for k, a in arrays.items()}, step)
        if self.tb is not None:
            for k, a in arrays.items():
                self.tb.add_image(f"images/{k}", a[None], step)

    def message(self, text: str) -> None:
        if self.main:
            print(f"hpc train: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.main or self._jsonl.closed:  # closing twice (a failure after close) is a no-op
            return
        self.bar.close()
        self._jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            import wandb

            run_dir = Path(self.wandb.dir).parent  # .../wandb/offline-run-*/files -> the run's dir
            self.wandb.finish()
            # finish() returns before wandb-core (a process of its own) has written the offline file;
            # teardown waits for it, so the run is complete on disk when `wandb sync` is suggested
            wandb.teardown()
            if self.mode == "offline":
                self.message(f"W&B offline run saved; upload it later with:  wandb sync {run_dir}")
