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
import itertools
import json
import math
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from hpc.config import Config, check_dataset, load_config, to_dict
from hpc.config.parse import read_yaml
from hpc.errors import ConfigError, InputError
from hpc.io.atomic import atomic_write_text
from hpc.launch.submit import TrainJob, add_launch_arguments, launch_overrides, make_executor

SWEEP_KEYS = {"name", "config", "dir", "fixed", "grid", "random", "launch"}
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
    with executor.batch():  # one Slurm job array
        jobs = [executor.submit(TrainJob(to_dict(cfg))) for _, cfg in members]
    for job, member in zip(jobs, record["members"], strict=True):
        member["job_id"] = job.job_id
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / "sweep.json", json.dumps(record, indent=1))
    return record


@dataclass
class RunSummary:
    """What a run dir says about its training run (written by hpc.train.train; no W&B needed)."""
    state: str  # pending (nothing written yet) | started | done
    samples: int  # samples trained so far (newest metrics record)
    target: int | None  # train.samples of the resolved config
    best_metric: str
    best_value: float | None
    checkpoint: str  # best.pt, else the newest step checkpoint, else ""


def run_summary(run_dir: Path) -> RunSummary:
    """Read config.yaml, metrics.jsonl and checkpoints/ of a run dir. metrics.jsonl has one JSON
    object per line, {"step": samples seen, "kind": "train" | "val" | ..., metric: value, ...}."""
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    train = cfg.get("train", {})
    metric, mode = train.get("best_metric", "nmse_gap"), train.get("best_mode", "min")
    samples, best = 0, None
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        samples = max(samples, int(rec.get("step", 0)))
        if rec.get("kind") == "val" and isinstance(rec.get(metric), (int, float)):
            value = float(rec[metric])
            best = value if best is None or (value < best if mode == "min" else value > best) else best
    ckpts = run_dir / "checkpoints"
    steps = sorted(ckpts.glob("step-*.pt"))
    checkpoint = ckpts / "best.pt" if (ckpts / "best.pt").is_file() else (steps[-1] if steps else None)
    target = train.get("samples")
    done = target is not None and samples >= int(target)
    state = "done" if done else ("started" if lines or checkpoint else "pending")
    return RunSummary(state, samples, target, metric, best, str(checkpoint or ""))


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


def status_table(sweep_dir: Path) -> str:
    try:
        record = json.loads((sweep_dir / "sweep.json").read_text())
    except OSError:
        raise InputError(f"{sweep_dir}: no sweep.json (not a sweep directory)") from None
    except ValueError as exc:
        raise InputError(f"{sweep_dir / 'sweep.json'}: unreadable: {exc}") from None
    slurm = _slurm_states([m["job_id"] for m in record["members"]])
    rows = [("member", "overrides", "state", "samples", "best", "checkpoint")]
    done = 0
    for m in record["members"]:
        s = run_summary(sweep_dir / m["id"])  # works from any working directory
        done += s.state == "done"
        # the run dir knows "done"; Slurm knows pending/running/failed (when it answers)
        state = s.state if s.state == "done" else slurm.get(m["job_id"], s.state)
        best = f"{s.best_metric}={s.best_value:.4g}" if s.best_value is not None else "-"
        overrides = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in m["overrides"].items())
        rows.append((m["id"], overrides, state, f"{s.samples}/{s.target or '?'}", best, s.checkpoint or "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([f"sweep {record['name']}: {done}/{len(record['members'])} done", *lines])


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
