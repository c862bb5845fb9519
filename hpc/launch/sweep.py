"""Hyperparameter sweep: a grid and/or random search over config keys, submitted as one job array.

Every member is a full training job (one task per GPU, possibly multi-node) with its own run dir
SWEEP_DIR/NNN and W&B run, all in the W&B group named after the sweep; at most `launch.max_parallel`
members run at once. `hpc sweep status SWEEP_DIR` reads the run dirs (and Slurm's accounting when it
answers), so it works with W&B offline or disabled.

Sweep file (see launch/sweeps/):
  name: lr-msssim                      # W&B group; members go to DIR/NAME/000, 001, ...
  config: configs/tiny.yaml
  dir: runs/sweeps
  fixed: [train.samples=4096]          # every member
  grid:   {optim.lr: [1.0e-3, 3.0e-4], loss.msssim: [0.0, 0.5]}
  random: {trials: 4, seed: 0, space: {optim.weight_decay: {loguniform: [1.0e-6, 1.0e-2]},
           model.name: {choice: [unet, light]}, loss.l1: {uniform: [0.5, 1.0]}}}
  launch: {gpus_per_node: 8, max_parallel: 4}   # any launch.* key; command-line flags win
Grid points x random trials = members.

example:
  hpc sweep launch/sweeps/lr-msssim.yaml --partition batch --time 120
  hpc sweep launch/sweeps/lr-msssim.yaml --cluster local --dry-run
  hpc sweep status runs/sweeps/lr-msssim
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hpc.config import Config, check_dataset, load_config, to_dict
from hpc.config.parse import read_yaml
from hpc.errors import ConfigError, InputError
from hpc.io.atomic import atomic_write_text
from hpc.launch.submit import TrainJob, add_launch_arguments, launch_overrides, make_executor

SWEEP_KEYS = {"name", "config", "dir", "fixed", "grid", "random", "launch"}
SLOTS = ".slots"  # in the sweep dir: lock files, one per member that may run at once (cluster local)
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


def _draw(rng: random.Random, key: str, spec: dict):
    """One value for `key` from {choice: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} |
    {randint: [lo, hi]} (inclusive)."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"random.space.{key}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    (kind, arg), = spec.items()
    if kind == "choice":
        return rng.choice(list(arg))
    lo, hi = arg
    if kind == "randint":
        return rng.randint(int(lo), int(hi))
    if kind == "uniform":
        value = rng.uniform(float(lo), float(hi))
    else:
        value = math.exp(rng.uniform(math.log(float(lo)), math.log(float(hi))))
    return float(f"{value:.4g}")  # 4 significant digits: readable overrides, W&B configs, tables


def expand(spec: dict, origin: str) -> list[dict[str, object]]:
    """The members' varying settings: the grid's cartesian product x `random.trials` draws."""
    grid = spec.get("grid") or {}
    rand = spec.get("random") or {}
    space = rand.get("space") or {}
    for key in [*grid, *space]:
        if "." not in key or key.startswith("launch.") or key == "train.run_dir":
            raise ConfigError(f"{origin}: cannot sweep over {key!r} "
                              "(expected section.key, not launch.* or train.run_dir)")
    trials = int(rand.get("trials", 1)) if space else 1
    rng = random.Random(int(rand.get("seed", 0)))
    return [{**dict(zip(grid, values, strict=True)), **{k: _draw(rng, k, s) for k, s in space.items()}}
            for values in itertools.product(*grid.values()) for _ in range(trials)]


def _as_override(key: str, value: object) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def load_sweep(path: str | Path) -> dict:
    p = Path(path)
    spec = read_yaml(p, "sweep", InputError)
    if not isinstance(spec, dict) or (unknown := set(spec) - SWEEP_KEYS):
        raise ConfigError(f"{p}: unknown keys {sorted(unknown) if isinstance(spec, dict) else spec!r}; "
                          f"valid: {', '.join(sorted(SWEEP_KEYS))}")
    for key in ("name", "config"):
        if not spec.get(key):
            raise ConfigError(f"{p}: `{key}` is required")
    if not spec.get("grid") and not (spec.get("random") or {}).get("space"):
        raise ConfigError(f"{p}: nothing to sweep: give `grid` and/or `random.space`")
    return spec


def member_configs(spec: dict, sweep_dir: Path, cli_launch: list[str], origin: str
                   ) -> list[tuple[dict, Config]]:
    """(varying settings, resolved and validated config) per member, each with its run dir and W&B
    group/name: one bad member refuses the whole sweep before anything is queued."""
    launch = [f"launch.{k}={v}" for k, v in (spec.get("launch") or {}).items()]
    out = []
    for i, varying in enumerate(expand(spec, origin)):
        member = f"{i:03d}"
        overrides = [*spec.get("fixed", []), *(_as_override(k, v) for k, v in varying.items()),
                     f"train.run_dir={sweep_dir / member}", f"log.group={spec['name']}",
                     f"log.name={spec['name']}-{member}", *launch, *cli_launch]
        try:
            out.append((varying, load_config(spec["config"], overrides)))
        except ConfigError as exc:
            where = " ".join(f"{k}={v}" for k, v in varying.items())
            raise ConfigError(f"{origin}: member {member} ({where}): {exc}") from None
    return out


class SweepMember(TrainJob):
    """A member of a local sweep: before training it takes one of ``slots`` lock files in
    ``folder`` (flock, released when its process ends however it ends) and waits while all are
    held, so at most launch.max_parallel members run at once (Slurm's array throttle does this on
    a cluster; submitit's local executor starts every job at once)."""

    def __init__(self, config: dict, folder: str = "", slots: int = 0):
        super().__init__(config)
        self.folder, self.slots = folder, slots

    def __call__(self) -> dict:
        held = _take_slot(Path(self.folder), self.slots) if self.slots else None
        try:
            return super().__call__()
        finally:
            if held is not None:
                os.close(held)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(SweepMember(self.config, self.folder, self.slots))


def _take_slot(folder: Path, slots: int, poll_s: float = 1.0) -> int:
    """The descriptor of a slot lock of ``folder`` this process now holds (waits for one)."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for i in range(slots):
            fd = os.open(folder / f"slot-{i}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
        time.sleep(poll_s)


@contextlib.contextmanager
def _detached(local: bool):
    """Local members are child processes that outlive `hpc sweep`: they must not inherit its
    stdin/stdout/stderr, or `hpc sweep ... | tee`, a CI step or a subprocess capturing its output
    waits until the last member ends (their own output goes to the log directory)."""
    if not local:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        yield
    finally:
        for fd, old in zip((0, 1, 2), saved, strict=True):
            os.dup2(old, fd)
            os.close(old)
        os.close(null)


def submit_sweep(spec: dict, sweep_dir: Path, cli_launch: list[str], origin: str,
                 dry_run: bool = False) -> dict:
    members = member_configs(spec, sweep_dir, cli_launch, origin)
    first = members[0][1]
    record = {"name": spec["name"], "config": spec["config"], "cluster": first.launch.cluster,
              "members": [{"id": Path(cfg.train.run_dir).name, "run_dir": cfg.train.run_dir,
                           "overrides": varying, "job_id": ""}
                          for varying, cfg in members]}
    if dry_run:
        return record
    for _, cfg in members:  # every member's dataset (data.path may be swept)
        check_dataset(cfg)
    if (sweep_dir / "sweep.json").exists():
        raise ConfigError(f"{sweep_dir}: a sweep is already recorded there; pick another `name` or `dir`")
    executor = make_executor(first, spec["name"])
    executor.update_parameters(slurm_array_parallelism=first.launch.max_parallel)
    parallel = first.launch.max_parallel
    slots = parallel if first.launch.cluster == "local" and 0 < parallel < len(members) else 0
    if slots:  # a member's time limit starts when its process does: it includes waiting for a slot
        waves = -(-len(members) // slots)
        executor.update_parameters(timeout_min=first.launch.time_min * waves)
    folder = str((sweep_dir / SLOTS).resolve())
    with _detached(first.launch.cluster == "local"), executor.batch():  # one Slurm job array
        jobs = [executor.submit(SweepMember(to_dict(cfg), folder, slots)) for _, cfg in members]
    for job, member in zip(jobs, record["members"], strict=True):
        member["job_id"] = job.job_id
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / "sweep.json", json.dumps(record, indent=1))
    return record


@dataclass
class RunSummary:
    """What a run dir says about its training run (written by hpc.train.train; no W&B needed)."""
    state: str  # pending (nothing written yet) | started | finishing | done
    samples: int  # samples trained so far (newest metrics record)
    target: int | None  # train.samples of the resolved config
    best_metric: str
    best_value: float | None
    checkpoint: str  # best.pt, else the newest step checkpoint, else ""
    baselines: dict[str, float] = field(default_factory=dict)  # baseline -> its value of best_metric
    locked: bool = False  # train.lock is there: a trainer holds the run dir (or was killed holding it)


def _records(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut short by a kill
            continue
    return out


def run_summary(run_dir: Path) -> RunSummary:
    """Read config.yaml, metrics.jsonl and checkpoints/ of a run dir. metrics.jsonl has one JSON
    object per line, {"step": samples seen, "kind": "train" | "val" | "end", metric: value, ...}; the
    "end" record comes after the final validation and checkpoint: only then is a run "done"."""
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    train = cfg.get("train", {})
    metric, mode = train.get("best_metric", "nmse_gap"), train.get("best_mode", "min")
    samples, best, ended, baselines = 0, None, False, {}
    records = _records(run_dir)
    for rec in records:
        samples = max(samples, int(rec.get("step", 0)))
        ended = ended or rec.get("kind") == "end"
        if rec.get("kind") == "val" and isinstance(rec.get(metric), (int, float)):
            value = float(rec[metric])
            best = value if best is None or (value < best if mode == "min" else value > best) else best
        if rec.get("kind") == "val":
            baselines = {k[:-len(metric) - 1]: v for k, v in rec.items()
                         if k.endswith(f"_{metric}") and k != metric and isinstance(v, (int, float))}
    ckpts = run_dir / "checkpoints"
    steps = sorted(ckpts.glob("step-*.pt"))
    checkpoint = ckpts / "best.pt" if (ckpts / "best.pt").is_file() else (steps[-1] if steps else None)
    target = train.get("samples")
    reached = target is not None and samples >= int(target)
    state = "done" if ended else "finishing" if reached else "started" if records or checkpoint else "pending"
    return RunSummary(state, samples, target, metric, best, str(checkpoint or ""), baselines,
                      (run_dir / "train.lock").exists())


def _slurm_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: state} from sacct; {} when Slurm's accounting does not answer (laptop, local)."""
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    try:
        r = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(ids)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    rows = [ln.split("|") for ln in r.stdout.splitlines() if "|" in ln]
    return {job: state.split()[0].lower() for job, state in rows} if r.returncode == 0 else {}


def _local_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: "running" | "ended"} for submitit local jobs (their id is the controller's pid)."""
    out = {}
    for job in job_ids:
        try:
            stat = Path(f"/proc/{int(job)}/stat").read_text()
        except (OSError, ValueError):
            out[job] = "ended"
            continue
        out[job] = "ended" if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X") else "running"
    return out


ENDED = {"completed", "failed", "cancelled", "timeout", "out_of_memory", "node_fail", "preempted",
         "boot_fail", "deadline", "ended"}


def member_state(s: RunSummary, job: str) -> str:
    """One word for a member: done | finishing (final validation and checkpoint) | running |
    waiting (for a slot, or starting) | failed | stopped | pending | Slurm's own state. ``job``: what
    the scheduler says ("" when it does not answer)."""
    if s.state == "done" or job == "completed":  # the end record, or a zero exit status
        return "done"
    if job in ENDED:  # over without the run's end record
        return "failed"
    live = {"finishing": "finishing", "started": "running", "pending": "waiting"}
    if job == "running" or (not job and s.locked):
        return live[s.state]
    if job:
        return job  # pending, requeued, ...
    return "stopped" if s.state in ("started", "finishing") else "pending"


def status_table(sweep_dir: Path) -> str:
    try:
        record = json.loads((sweep_dir / "sweep.json").read_text())
    except OSError:
        raise InputError(f"{sweep_dir}: no sweep.json (not a sweep directory)") from None
    except ValueError as exc:
        raise InputError(f"{sweep_dir / 'sweep.json'}: unreadable: {exc}") from None
    ids = [m["job_id"] for m in record["members"]]
    jobs = _local_states(ids) if record.get("cluster") == "local" else _slurm_states(ids)
    rows = [("member", "overrides", "state", "samples", "best", "checkpoint")]
    done, summaries = 0, []
    for m in record["members"]:
        s = run_summary(sweep_dir / m["id"])  # works from any working directory
        summaries.append(s)
        state = member_state(s, jobs.get(m["job_id"], ""))
        done += state == "done"
        best = f"{s.best_metric}={s.best_value:.4g}" if s.best_value is not None else "-"
        overrides = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in m["overrides"].items())
        rows.append((m["id"], overrides, state, f"{s.samples}/{s.target or '?'}", best, s.checkpoint or "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([f"sweep {record['name']}: {done}/{len(record['members'])} done", *lines,
                      *baseline_lines(record, summaries)])


def baseline_lines(record: dict, summaries: list[RunSummary]) -> list[str]:
    """The baselines on the members' validation slices, to read the members' values against: one
    row each when every member validated on the same slices (equal scores), else one per member."""
    scored = [(m["id"], s) for m, s in zip(record["members"], summaries, strict=True) if s.baselines]
    if not scored:
        return []
    metric = scored[0][1].best_metric
    same = all(s.baselines == scored[0][1].baselines and s.best_metric == metric for _, s in scored)
    lines = ["", f"baselines on the same validation slices ({metric}):" if same else
             "baselines (the members validated on different slices or metrics):"]
    for member, s in scored[:1] if same else scored:
        for name, value in sorted(s.baselines.items(), key=lambda kv: kv[1]):
            lines.append(f"  {name:<12} {s.best_metric}={value:.4g}" + ("" if same else f"  (member {member})"))
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="+", metavar="SWEEP.yaml | status DIR",
                        help="a sweep file to submit, or `status` and a sweep directory")
    parser.add_argument("--dry-run", action="store_true", help="list the members, submit nothing")
    add_launch_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.target[0] == "status":
        if len(args.target) != 2:
            raise ConfigError("usage: hpc sweep status SWEEP_DIR")
        print(status_table(Path(args.target[1])))
        return 0
    if len(args.target) != 1:
        raise ConfigError(f"expected one sweep file, got {' '.join(args.target)}")
    spec = load_sweep(args.target[0])
    sweep_dir = Path(spec.get("dir") or "runs/sweeps") / spec["name"]
    record = submit_sweep(spec, sweep_dir, launch_overrides(args), args.target[0], args.dry_run)
    verb = "would submit" if args.dry_run else "submitted"
    print(f"{verb} sweep {record['name']}: {len(record['members'])} members "
          f"({record['cluster']}), run dirs in {sweep_dir}")
    for m in record["members"]:
        print(f"  {m['id']}  {m['job_id'] or '-':>10}  "
              + " ".join(f"{k}={v}" for k, v in m["overrides"].items()))
    if not args.dry_run:
        print(f"follow: hpc sweep status {sweep_dir}")
    sys.stdout.flush()
    return 0
