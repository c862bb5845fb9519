"""Train a sinogram-repair UNet: one CPU process, one GPU, or many nodes (DDP), same code.

Steps are counted in samples seen by all ranks, so runs on different GPU counts compare. The run
resumes by itself from the newest valid checkpoint in train.run_dir; SIGUSR2 or SIGTERM finishes
the current step, writes a checkpoint and exits with code 75 (requeue me).

Reading order: `Trainer.run` (the loop), `train_step`, then the components it drives: TrainState
(hpc.train.state: what a checkpoint holds), Validator (hpc.train.validate: metrics and baselines),
hpc.train.optim (optimizer, LR schedule, numerics), hpc.distributed.dist (every collective), hpc.train.checkpoint
(files).

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
import socket
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

from hpc.config import Config, dump, load_config, to_dict, validate
from hpc.data import build_loader
from hpc.data.select import empty_fraction
from hpc.distributed import dist
from hpc.distributed.device import device_memory
from hpc.distributed.launcher import setup_torch_env
from hpc.errors import EXIT_REQUEUE, ConfigError, DistributedError, HpcError, OutputError
from hpc.io.dirlock import missing_dirs, remove_empty
from hpc.registry import FILLS, LOSSES, MODELS, SCANNERS
from hpc.train import checkpoint as ck
from hpc.train.ema import EMA
from hpc.train.logger import RunLogger, preflight
from hpc.train.losses import build_loss
from hpc.train.models import build_model, check_fits, input_multiple
from hpc.train.optim import LRSchedule, build_optimizer, set_numerics
from hpc.train.report import empty_line, finished_line, model_differences, splits_line, val_line
from hpc.train.runlock import RunLock
from hpc.train.state import TrainState, training_data
from hpc.train.validate import Validator, reproject_iters, slice_baselines


class Preemption:
    """SIGUSR2 / SIGTERM set a flag; the loop checks it (agreed across ranks) after each step
    (Trainer._agree)."""

    def __init__(self):
        self.signal = 0
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum


def _crossed(before: int, after: int, every: int) -> bool:
    return every > 0 and after // every > before // every


class Trainer:
    """The components built from the config (loaders, model, optimizer, schedule, loss, logger),
    a TrainState that checkpoints them, and a Validator; `run()` is the loop."""

    def __init__(self, cfg: Config):
        validate(cfg)  # configs built in code (tests, submitit) get the same checks as loaded ones
        preflight(cfg)  # what logging needs (packages, W&B key), before a run dir or W&B run exists
        self.cfg = cfg
        self.stop = Preemption()  # before the slow set-up: a signal then still ends in a checkpoint
        self.ctx = dist.init(cfg.dist, cfg.data.device)
        created = missing_dirs([Path(cfg.train.run_dir)])  # what this start creates (removed if it fails)
        self.lock = self._lock()  # before anything is read from or written to the run dir
        try:
            self._build()
        except BaseException:
            self.release()
            if self.ctx.rank == 0:
                remove_empty(created)  # a failed start leaves no empty run directory behind
            raise

    def _build(self) -> None:

        cfg, ctx = self.cfg, self.ctx
        dist.seed_everything(cfg.train.seed, ctx.rank)
        self.amp = set_numerics(cfg, ctx.device)
        self.fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        multiple = input_multiple(cfg)  # the loader pads views and bins to what the model needs
        self.loader = build_loader(cfg, "train", ctx.rank, ctx.world, ctx.device, multiple)
        limit = cfg.train.val_batches * cfg.data.batch_size * ctx.world  # slices of a bounded validation
        val_loader = build_loader(cfg, "val", ctx.rank, ctx.world, ctx.device, multiple, limit) \
            if cfg.train.val_every else None
        # what the data and the memory allow, before anything is allocated (hpc.config bounds the rest)
        check_fits(cfg, ctx.device, self.loader.index.ds.slice_shape, device_memory(ctx.device))
        self.model = build_model(cfg.model, cfg.in_channels()).to(ctx.device, memory_format=self.fmt)
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters())
        self.ema = EMA(self.model, cfg.train.ema) if cfg.train.ema > 0 else None
        self.sched = LRSchedule(cfg.optim, cfg.train.best_mode)
        self.loss = build_loss(cfg.loss)
        self.validator = Validator(cfg, val_loader, self.model.centre, main=ctx.rank == 0) \
            if val_loader is not None else None
        self.state = TrainState(cfg, self.model, self.optimizer, self.sched, self.loader,
                                training_data(cfg, self.loader), ctx.rank, self.validator, self.ema)
        self.ckpt = ck.Checkpointer(cfg.train.run_dir, cfg.checkpoint.keep)
        self.resumed_from = self._resume() if cfg.checkpoint.resume else None
        self.finished = self.resumed_from is not None and self.state.step >= cfg.train.samples
        if self.finished:  # nothing to train: no log, no W&B run, no validation
            return
        if ctx.rank == 0:
            self._describe_data()
        self.net = dist.wrap(self.model, cfg.dist, ctx, compile=cfg.train.compile)  # after loading the weights
        self.log = RunLogger(cfg, ctx.rank == 0, cfg.train.samples, self.state.step)
        self.lr = 0.0  # of the last optimizer step
        self._steps = 0  # optimizer steps of this process
        self._bad = torch.zeros((), dtype=torch.bool, device=ctx.device)  # a non-finite loss was seen
        # the bar's loss: this rank's mean over the steps since it was last shown (summed on the device)
        self._window = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        self._shown = (0.0, "")  # (time, text) of the bar's last loss

    def _describe_data(self) -> None:
        """Which studies went where, and a warning when the training data are mostly empty."""
        ids = [s.id for s in self.loader.index.ds.studies]
        print(f"hpc train: {splits_line(self.state.data['splits'])}", flush=True)  # stdout: what happens
        index = self.loader.index
        fraction, n = empty_fraction(index, [ids.index(s) for s in self.loader.studies])
        warning = empty_line(fraction, n, str(index.ds.root))
        if warning:
            print(f"hpc train: warning: {warning}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------ run dir
    def _lock(self) -> RunLock | None:
        """Rank 0 locks the run dir (hpc.train.runlock); every rank learns whether that worked."""
        lock, error = (RunLock(self.cfg.train.run_dir), None) if self.ctx.rank == 0 else (None, None)
        if lock is not None:
            try:
                lock.acquire()
            except HpcError as exc:
                error = exc
        refused = dist.all_reduce_sum(torch.tensor([float(error is not None)], device=self.ctx.device))
        if error is not None:
            raise error
        if float(refused[0]) > 0:
            raise OutputError(f"{self.cfg.train.run_dir}: run directory locked by another trainer (see rank 0)")
        return lock

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    # ------------------------------------------------------------ checkpoints
    def _resume(self) -> Path | None:
        """Restore the newest readable checkpoint in the run dir (None: a fresh run)."""
        saved, path = self.ckpt.resume(main=self.ctx.rank == 0)
        if saved is None:
            return None
        if saved["rng"] and len(saved["rng"]) != self.ctx.world:
            raise ConfigError(f"{path}: written by {len(saved['rng'])} rank(s), this job has {self.ctx.world}")
        try:
            self.state.load_state_dict(saved)
        except (RuntimeError, ValueError, KeyError) as exc:  # another network or optimizer than the run's
            diff = model_differences(saved["config"], to_dict(self.cfg))
            what = "; ".join(diff) if diff else f"its state does not fit this config ({str(exc).splitlines()[0][:120]})"
            raise ConfigError(f"{path}: this run directory holds another model: {what}. A run directory holds "
                              f"one run: start a new one with train.run_dir=NEW_DIR, or drop the changed "
                              f"overrides to continue this one") from None
        if self.ctx.rank == 0:
            print(f"hpc train: resumed from {path} (step {self.state.step})", file=sys.stderr, flush=True)
        return path

    def _save(self, is_best: bool = False) -> Path | None:
        """Every rank contributes its RNG state (a collective); rank 0 alone writes. Non-finite
        weights or optimizer moments are never written: every rank checks its own (identical under
        DDP) copy, so all of them stop together with exit 2."""
        tensors = {"model": self.model.state_dict(), "optim": self.optimizer.state_dict(),
                   "ema": self.ema.weights() if self.ema is not None else {}}
        bad = ck.nonfinite(tensors, tuple(tensors))
        if bad is not None:
            raise ck.NonFiniteError(f"{self.cfg.train.run_dir}: step {self.state.step}: {bad} holds NaN or inf; "
                                    f"no checkpoint written ({self._newest()})")
        rng = dist.gather_objects(ck.rng_state())
        path = self.ckpt.save(self.state.state_dict(rng), self.state.step, is_best) if self.ctx.rank == 0 else None
        dist.barrier()  # nobody runs ahead (or exits) before the file is in place
        return path

    # ------------------------------------------------------------ steps
    def _batches(self):
        while True:  # the loader advances its own epoch at the end of each pass
            yield from self.loader

    def _forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction (B, 1, V', X'), loss ()) under the configured autocast."""
        x = batch.input.contiguous(memory_format=self.fmt)  # (B, C, V', X')
        with torch.autocast(self.ctx.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            pred = self.net(x, batch.mask)
        return pred, self.loss(pred, batch.target, batch.mask, batch.valid)[0]

    def train_step(self, batches) -> torch.Tensor:
        """One optimizer step over `accumulate` micro-batches; returns the mean loss (this rank) as a
        device tensor: nothing in a step waits for the device (read it at log time)."""
        self.net.train()
        n = self.cfg.optim.accumulate
        total = torch.zeros((), dtype=torch.float64, device=self.ctx.device)  # summed on the device
        self.lr = self.sched.apply(self.optimizer, self.state.step)
        for i in range(n):
            with dist.no_sync(self.net, skip=i < n - 1):  # all-reduce gradients once per step
                _, loss = self._forward(next(batches))
                (loss / n).backward()
            total += loss.detach().double()
        if self.cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()  # on the device, no sync
        return total / n

    def _validate(self) -> bool:
        """Validate, log (with the baselines) and say it on the console, step the plateau
        schedule; True when a new best."""
        self.net.eval()
        if self.validator.baselines is None:
            self.log.report(f"validating at {self.state.step} samples; the first validation also scores the "
                             f"baselines ({', '.join(slice_baselines())}, and reproject at "
                             f"{'/'.join(map(str, reproject_iters()))} OSEM iterations when the geometry is "
                             f"known) on the same slices, once: they are kept in the checkpoints")
        self.log.pause()  # the validation's progress takes the bar's line
        with self.ema.applied() if self.ema is not None else nullcontext():  # the weights users will run
            metrics, panels = self.validator(self._forward)
        key = self.cfg.train.best_metric  # one of hpc.config.Metric: the keys of `metrics`
        st = self.state
        if self.cfg.log.images and panels is not None:
            self.log.images(st.step, panels)
        st.metrics, st.val_step = metrics, st.step
        baselines = self.validator.baselines or {}
        values = dict(metrics)
        for name, m in baselines.items():
            values |= {f"{name}_{k}": v for k, v in m.items()}
        self.log.scalars(st.step, values, kind="val")
        self.sched.observe(metrics[key])
        is_best = st.improved(metrics[key])
        if is_best:
            self.log.best({**values, "step": st.step})
        self.log.report(val_line(st.step, self.cfg.train.samples, metrics, baselines, self.cfg.train, is_best,
                                  st.best, st.best_step))
        return is_best

    # ------------------------------------------------------------ loop
    def run(self) -> dict:
        if self.finished:
            return self.already_finished()
        cfg, st = self.cfg, self.state
        batches = self._batches()
        per_step = cfg.data.batch_size * self.ctx.world * cfg.optim.accumulate  # samples, all ranks
        window = (time.perf_counter(), st.step)  # throughput over each logging interval
        while st.step < cfg.train.samples:
            before = st.step
            loss = self.train_step(batches)
            st.step += per_step
            self._steps += 1
            self._bad = self._bad | ~torch.isfinite(loss)  # on the device: no sync
            self._window += torch.stack([loss.detach().double(), loss.new_ones((), dtype=torch.float64)])
            self.log.progress(per_step, self._bar_loss)  # read only when the bar draws a line
            if _crossed(before, st.step, cfg.log.every):
                window = self._log_train(loss, window)
            validate = self.validator is not None and _crossed(before, st.step, cfg.train.val_every)
            save = _crossed(before, st.step, cfg.checkpoint.every)
            preempted = False
            # The ranks agree on a signal and a non-finite loss (a collective and a host sync) every
            # dist.preempt_every steps and before anything is validated or saved (so a NaN is never
            # saved), at the same steps on every rank; one process also as soon as it is signalled.
            if (self._steps % cfg.dist.preempt_every == 0 or validate or save or st.step >= cfg.train.samples
                    or (self.ctx.world == 1 and self.stop.signal != 0)):
                preempted, diverged = self._agree()
                if diverged:
                    value = float(loss)
                    raise ck.NonFiniteError(f"{cfg.train.run_dir}: step {st.step}: training loss is "
                                            f"{value if not math.isfinite(value) else 'non-finite on another rank'}; "
                                            f"stopped, no checkpoint written ({self._newest()})")
            is_best = validate and self._validate()
            if preempted or is_best or save:
                path = self._save(is_best)
            if preempted:
                self.log.message(f"signal {self.stop.signal or 'on another rank'}: checkpoint {path or ''} "
                                 f"at step {st.step}; exiting with {EXIT_REQUEUE} (requeue)")
                self.log.close()
                raise SystemExit(EXIT_REQUEUE)
        return self._finish()

    def _agree(self) -> tuple[bool, bool]:
        """(preempted, diverged) on any rank, in one all-reduce: a signal, a non-finite loss since
        the start (``self._bad``, kept on the device)."""
        signal = torch.tensor([float(self.stop.signal != 0)], device=self.ctx.device)
        flags = dist.all_reduce_sum(torch.cat([signal, self._bad.float().reshape(1)]))
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def _bar_loss(self, force: bool = False) -> str:
        """The bar's loss: this rank's mean over the steps since it was last read (at most once a
        second, unless ``force``: reading it waits for the device)."""
        now = time.perf_counter()
        if (force or now - self._shown[0] >= 1.0) and float(self._window[1]) > 0:
            total, n = self._window.tolist()
            self._window.zero_()
            self._shown = (now, f"loss {total / n:.4g}")
        return self._shown[1]

    def _newest(self) -> str:
        found = self.ckpt.list()
        return f"newest finite checkpoint: {found[0]}" if found else "no checkpoint yet"

    def _log_train(self, loss: float, window: tuple[float, int]) -> tuple[float, int]:
        """Log the loss averaged over ranks (a collective) and the throughput since ``window``
        (time, step); returns the next window."""
        now, step = time.perf_counter(), self.state.step
        mean_loss = dist.all_reduce_sum(loss.detach().float().reshape(1))[0] / self.ctx.world  # host sync
        values = {"loss": float(mean_loss), "lr": self.lr, "samples_per_s": (step - window[1]) / (now - window[0]),
                  "epoch": self.loader.epoch}
        if self.ctx.device.type == "cuda":
            values["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        self.log.scalars(step, values, kind="train")
        return now, step

    def _finish(self) -> dict:
        """Validate the final weights (unless that just happened) and checkpoint them."""
        st, is_best = self.state, False
        if self.validator is not None and st.val_step != st.step:
            is_best = self._validate()
        last = self.ckpt.path(st.step)
        path = self._save(is_best) if is_best or not last.exists() else last
        self.log.end(st.step)
        self._bar_loss(force=True)  # the bar's last line shows the last steps' loss, not an older one
        self.log.close(self.ckpt.best_path)
        return self._summary(path or last)

    def _summary(self, checkpoint: Path) -> dict:
        st = self.state
        return {"step": st.step, "epoch": self.loader.epoch, "metrics": st.metrics,
                "baselines": (self.validator.baselines if self.validator else None) or {}, "best": st.best,
                "run_dir": str(self.cfg.train.run_dir), "checkpoint": str(checkpoint),
                "best_checkpoint": str(self.ckpt.best_path), "resumed_from": str(self.resumed_from or "")}

    def already_finished(self) -> dict:
        """A resumed run that has seen train.samples: say so, write nothing, return its summary."""
        st = self.state
        if self.ctx.rank == 0:
            line = finished_line(self.cfg.train.run_dir, st.step, self.cfg.train, st.best, st.best_step,
                                 str(self.resumed_from))
            print(f"hpc train: {line}", flush=True)
        return self._summary(self.resumed_from)


def train(cfg: Config) -> dict:
    """Train to cfg.train.samples (resuming if a checkpoint exists); the final metrics and paths.
    Raises SystemExit(EXIT_REQUEUE) after checkpointing on SIGUSR2/SIGTERM, and (no checkpoint: the
    process group is broken) when a collective got no answer within dist.timeout_s; DistributedError
    when another rank went away. Each rank then prints one line naming itself."""
    trainer = None
    # the trainer's SIGUSR2/SIGTERM handlers only set a flag its loop reads: once it has returned they
    # would swallow the signals of whatever the process does next (hpc demo's evaluation, a sweep)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        trainer = Trainer(cfg)
        return trainer.run()
    except RuntimeError as exc:
        failure = dist.collective_failure(exc, cfg.dist.timeout_s)
        if failure is None:
            raise
        message, code = failure
        if trainer is not None and not trainer.finished:
            trainer.log.close()  # rank 0: the W&B run and metrics.jsonl end cleanly
        where = f"rank {dist.rank()} ({socket.gethostname()})"
        if code != EXIT_REQUEUE:
            raise DistributedError(f"{where}: {message}") from None
        print(f"hpc train: error: {where}: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_REQUEUE) from None
    finally:
        if trainer is not None:
            trainer.release()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config YAML (e.g. configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. optim.lr=3e-4 train.samples=4096")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved (validated) config as YAML and exit; nothing is written")
    parser.epilog = registered_choices()


def registered_choices() -> str:
    """The registries' names as `hpc train --help` lists them (hpc.registry: one file adds an entry)."""
    lines = [f"  {key:<16} {' | '.join(reg.names())}" for key, reg in (
        ("model.name", MODELS), ("loss.<term>", LOSSES), ("data.fill", FILLS), ("corrupt.scanner", SCANNERS))]
    return "registered choices (hpc.registry):\n" + "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Launcher env -> train -> clean distributed shutdown (docs/ARCHITECTURE.md) with the run's exit code."""

    cfg = load_config(args.config, args.overrides)
    preflight(cfg)  # also for --print-config: a config that passes it can start
    if args.print_config:
        sys.stdout.write(dump(cfg))
        return 0
    setup_torch_env()
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
    except Exception:  # a bug: the traceback is the useful message
        traceback.print_exc()
        code = 1
    dist.shutdown(code)
    return code  # not reached: shutdown exits
