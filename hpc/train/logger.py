"""Run logging: console progress (rank 0), ``metrics.jsonl`` + ``config.yaml`` in the run dir
(readable without any service), W&B (rank 0; online / offline / disabled) and optional TensorBoard.

    preflight(cfg)                                    # before anything is written: services, packages
    log = RunLogger(cfg, main=ctx.rank == 0, total=cfg.train.samples)
    log.scalars(step, {"loss": 0.1, "lr": 1e-3}, kind="train")
    log.images(step, {"input": x, "prediction": y, ...})   # (V, X) tensors -> one labelled panel
    log.best({"nmse_gap": 0.1, "step": 64})           # the W&B run's summary
    log.end(step)                                     # metrics.jsonl: the run is complete
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

import importlib.util
import json
import math
import os
import re
import secrets
import sys
from pathlib import Path

from hpc import config as C
from hpc.errors import ConfigError, OutputError
from hpc.io.atomic import append_open, atomic_write_text
from hpc.io.regular import read_bounded
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


def own_dir(path: Path) -> Path:
    """``path`` as a directory of the run (created if absent); a symbolic link planted there is
    refused: W&B and TensorBoard would write through it into someone else's directory."""
    if path.is_symlink():
        raise OutputError(f"{path}: is a symbolic link; hpc never writes through a link it did not create (remove it)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _small_file(path: Path) -> str:
    """The stripped text of one of the run's own small files ("" when absent); never through a link,
    never a FIFO or device, never more than 4 KiB."""
    if not os.path.lexists(path):
        return ""
    return read_bounded(path, "run state", 4096, OutputError, follow=False).decode("utf-8", "replace").strip()


def preflight(cfg: C.Config) -> None:
    """What the logger will need, checked before a run directory or a W&B run is created (and by
    `hpc train --print-config`): a valid W&B mode, its key when online, the packages it imports."""
    mode = wandb_mode(cfg.log)
    if mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"log.wandb={mode} needs the `wandb` package (pip install 'hpc[wandb]'), "
                          "or set log.wandb=disabled")
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("log.wandb=online needs WANDB_API_KEY in the environment "
                          "(or use log.wandb=offline and `wandb sync` later)")
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("log.tensorboard=true needs the `tensorboard` package "
                          "(pip install tensorboard), or set log.tensorboard=false")


class RunLogger:
    def __init__(self, cfg: C.Config, main: bool, total: int, resumed_step: int = 0):
        self.main = main
        self.run_dir = Path(cfg.train.run_dir)
        self.wandb = self.tb = self.bar = None
        self._jsonl = None
        if not main:
            return
        preflight(cfg)  # nothing is created for a run that cannot log
        self.run_dir.mkdir(parents=True, exist_ok=True)
        C.save(cfg, self.run_dir / "config.yaml")
        self._jsonl = append_open(self.run_dir / "metrics.jsonl")  # one line per record, never through a link
        self.bar = Progress(total=total, unit="samples", desc="train", enabled=cfg.log.progress,
                            initial=resumed_step)  # a resumed run's rate and ETA count this attempt only
        self.mode = wandb_mode(cfg.log)
        if self.mode != "disabled":
            self.wandb = self._init_wandb(cfg)
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(own_dir(self.run_dir / "tensorboard")))

    def _init_wandb(self, cfg: C.Config):
        import wandb

        # the same W&B run continues across requeues/resumes of this run dir
        run_id = _small_file(self.run_dir / "wandb_id") or secrets.token_hex(6)
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
            raise OutputError(f"{self.run_dir / 'wandb_id'}: {run_id[:40]!r} is not a W&B run id; delete the file")
        atomic_write_text(self.run_dir / "wandb_id", run_id)
        own_dir(self.run_dir / "wandb")  # W&B writes below it: never into a directory a link points to
        lc = cfg.log
        run = wandb.init(
            mode=self.mode, dir=str(self.run_dir), id=run_id, resume="allow",
            project=lc.project, entity=lc.entity or None, group=lc.group or None,
            job_type=lc.job_type or None, name=lc.name or self.run_dir.name,
            config=C.to_dict(cfg), settings=wandb.Settings(console="off", silent=True))
        run.define_metric("samples")
        run.define_metric("*", step_metric="samples")  # every chart's x-axis
        step = _small_file(self.run_dir / "wandb_step")
        if step and not step.isdigit():
            raise OutputError(f"{self.run_dir / 'wandb_step'}: {step[:40]!r} is not a step count; delete the file")
        saved = int(step) + 1 if step else 0
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

    def images(self, step: int, panels: dict) -> None:
        """One labelled panel (hpc.train.panel): the validation slice with the most gap pixels as
        input, prediction, target, |error| and mask, on fixed colour scales with colour bars."""
        if not self.main or (self.wandb is None and self.tb is None):
            return
        from hpc.train.panel import render_panel  # late: matplotlib, only for runs that log images

        rgb, caption = render_panel(panels, step)
        if self.wandb is not None:
            import wandb

            self._wandb_log({"images/panel": wandb.Image(rgb, caption=caption)}, step)
        if self.tb is not None:
            self.tb.add_image("images/panel", rgb.transpose(2, 0, 1), step)

    def best(self, values: dict[str, float]) -> None:
        """The best validation so far into the W&B run's summary (``best/<key>``), which is what the
        runs table of a project or a sweep shows."""
        if self.main and self.wandb is not None:
            self.wandb.summary.update({f"best/{k}": v for k, v in values.items()})

    def end(self, step: int) -> None:
        """metrics.jsonl's last record: the run is complete (final validation and checkpoint
        written). `hpc sweep status` says "done" only then."""
        if self.main:
            self._jsonl.write(json.dumps({"step": step, "kind": "end"}) + "\n")

    def pause(self) -> None:
        """Erase the terminal bar (it is drawn again at the next update)."""
        if self.main and self.bar is not None:
            self.bar.clear()

    def report(self, text: str) -> None:
        """A line of what the run did (a validation, ...) on stdout; progress, warnings and errors
        go to stderr, so `hpc train > run.log` keeps the results."""
        if self.main:
            self.pause()
            print(f"hpc train: {text}", flush=True)

    def message(self, text: str) -> None:
        if self.main:
            if self.bar is not None:
                self.bar.clear()  # a terminal bar gives up its line; the next update draws it again
            print(f"hpc train: {text}", file=sys.stderr, flush=True)

    def close(self, best_checkpoint: Path | None = None) -> None:
        """End the run's logs; ``best_checkpoint`` (online W&B) is logged as a model artifact."""
        if not self.main or self._jsonl.closed:  # closing twice (a failure after close) is a no-op
            return
        self.bar.close()
        self._jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            import wandb

            if self.mode == "online" and best_checkpoint is not None and best_checkpoint.is_file():
                art = wandb.Artifact(f"{self.wandb.id}-best", type="model",
                                     metadata={"run_dir": str(self.run_dir), "summary": dict(self.wandb.summary)})
                art.add_file(str(best_checkpoint))
                self.wandb.log_artifact(art)
            self.wandb.finish()
            # finish() returns before wandb-core (a process of its own) has written the offline file;
            # teardown waits for it, so the run is complete on disk when `wandb sync` is suggested
            wandb.teardown()
            if self.mode == "offline":
                self.message(f"W&B offline run saved; upload it later with:  {sync_command(self.run_dir)}")


def sync_command(run_dir: Path) -> str:
    """`wandb sync` of every offline attempt of a run dir (one directory per attempt: a resumed run
    has several, all the same W&B run)."""
    found = sorted(str(p) for p in (Path(run_dir) / "wandb").glob("offline-run-*") if p.is_dir())
    return "wandb sync " + " ".join(found)
