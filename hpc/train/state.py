"""What a training checkpoint holds, defined once (torchtitan's `Stateful` pattern).

    state = TrainState(cfg, model, optimizer, sched, loader, data=training_data(cfg, loader), rank=0)
    ckpt.save(state.state_dict(rng=dist.gather_objects(ck.rng_state())), state.step)   # rank 0
    state.load_state_dict(ck.load(path))                                               # every rank

The trainer mutates ``step``, ``best`` and ``metrics``; the components (model, optimizer, schedule,
loader) keep their own state and are read/restored through their own state_dict methods. `KEYS` is
the checkpoint's contract (docs/ARCHITECTURE.md): `hpc predict`, `hpc export`, `hpc inspect` and
the resume path read these names, so they change only with a version bump.
"""
from __future__ import annotations

import math

import torch

from hpc.config import Config, to_dict
from hpc.data.index import SPLITS, config_split
from hpc.train import checkpoint as ck

KEYS = ("model", "optim", "sched", "step", "epoch", "loader", "rng", "config", "metrics", "best", "validation",
        "data", "ema", "version", "git")


def training_data(cfg: Config, loader) -> dict:
    """{scale, slice_shape, scanner} of the training set: what `hpc predict` and `hpc export` need to
    preprocess new inputs exactly as training did; and ``splits``, the study ids of each split (what
    `hpc inspect` shows: which studies a model never saw)."""
    ds = loader.index.ds
    ids = [s.id for s in ds.studies]
    return {"scale": float(ds.scale), "slice_shape": list(ds.slice_shape),
            "scanner": cfg.corrupt.scanner or ds.scanner,
            "splits": {name: config_split(ids, cfg.data, name) for name in SPLITS}}


class TrainState:
    """The model, optimizer, LR schedule and loader plus the loop's counters, saved and restored as one."""

    def __init__(self, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sched, loader,
                 data: dict, rank: int = 0, validator=None, ema=None):
        self.cfg, self.model, self.optimizer, self.sched, self.loader = cfg, model, optimizer, sched, loader
        self.data, self.rank, self.validator, self.ema = data, rank, validator, ema  # ema: hpc.train.ema.EMA
        self.step = 0  # samples seen by all ranks (runs on different GPU counts compare)
        self.best = math.inf if cfg.train.best_mode == "min" else -math.inf  # of train.best_metric
        self.metrics: dict[str, float] = {}  # the last validation's
        self.val_step = self.best_step = -1  # samples seen at the last validation and at the best one
        self.code = ck.code_version()  # the code this run started with (not whatever HEAD is at save time)

    def state_dict(self, rng: list[dict] | None = None) -> dict:
        """The checkpoint (plain containers and tensors: loadable with weights_only=True). ``rng``:
        every rank's RNG state in rank order (gathering them is a collective, so the caller does it;
        default: this process's only)."""
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict(),
                 "sched": self.sched.state_dict(), "step": self.step, "epoch": self.loader.epoch,
                 "loader": self.loader.state_dict(), "rng": rng if rng is not None else [ck.rng_state()],
                 "config": to_dict(self.cfg), "metrics": self.metrics, "best": self.best,
                 "validation": self.validation(), "data": self.data,
                 "ema": self.ema.state_dict() if self.ema is not None else None,
                 **self.code}  # keys in the order of KEYS (tests/test_train_state.py checks it)

    def validation(self) -> dict:
        """When the metrics were measured (``step``), the best one (``best_step``), and the
        validator's baselines with the fingerprint of their slices (hpc.train.validate): a resumed
        run neither scores the baselines again nor mistakes old metrics for new ones."""
        state = {"step": self.val_step, "best_step": self.best_step}
        return state | (self.validator.state_dict() if self.validator is not None else {})

    def load_state_dict(self, state: dict) -> None:
        """Restore every component and counter; this rank continues with its own RNG streams. The
        caller checks first that the checkpoint was written by as many ranks as this job has."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        self.sched.load_state_dict(state["sched"])
        if self.ema is not None:
            if not state.get("ema"):
                raise ValueError("the checkpoint has no moving average of the weights (train.ema was 0)")
            self.ema.load_state_dict(state["ema"])
        self.loader.load_state_dict(state["loader"])  # continues mid-epoch at the same batch
        ck.set_rng_state(state["rng"][self.rank])
        self.step, self.best, self.metrics = int(state["step"]), float(state["best"]), dict(state["metrics"])
        val = state.get("validation") or {}  # absent in checkpoints written before it existed
        self.val_step, self.best_step = int(val.get("step", -1)), int(val.get("best_step", -1))
        if self.validator is not None:
            self.validator.load_state_dict(val)

    def improved(self, value: float) -> bool:
        """True when ``value`` of train.best_metric is finite and beats the best so far (which it then
        becomes): a non-finite metric is never "best" (issue 12)."""
        better = value < self.best if self.cfg.train.best_mode == "min" else value > self.best
        better = better and math.isfinite(value)  # NaN never compares better; +inf would in max mode
        if better:
            self.best, self.best_step = value, self.step
        return better
