"""Render an sbatch template (shipped in the package: hpc/launch/templates/*.sbatch) with your
settings; print it or submit it.

Templates: dgx (venv on DGX nodes, NCCL settings, optional staging to /raid), pyxis (enroot image
via `srun --container-image`), singularity (`singularity exec --nv`), plain (venv, any cluster).
All run one task per GPU and requeue themselves from the batch shell on USR2 (time limit or
preemption). `--print` shows the script without submitting; otherwise it is saved to
LOG_DIR/NAME.sbatch and submitted with sbatch.

example:
  hpc sbatch -t dgx --print --config configs/dgx.yaml --nodes 4 --gpus-per-node 8 \\
      --partition batch --account proj --time 240 --stage-to /raid/$USER/pet train.run_dir=runs/big
  hpc sbatch -t pyxis --config configs/dgx.yaml --image /shared/images/hpc.sqsh --gpus-per-node 8
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hpc.config import Config, check_dataset, load_config
from hpc.errors import ConfigError, InputError, OutputError
from hpc.io.atomic import atomic_write_text
from hpc.launch.submit import LAUNCH_FLAGS, launch_overrides, tasks_per_node

TEMPLATES = ("dgx", "pyxis", "singularity", "plain")
# Templates and partials are package data (found by importlib.resources, also in a plain `pip install .`);
# HPC_LAUNCH_DIR points at a copy of the directory with your own edits.
LAUNCH_DIR = Path(os.environ.get("HPC_LAUNCH_DIR") or str(resources.files("hpc.launch") / "templates"))
_PLACEHOLDER = re.compile(r"\{\{(>\s*)?(\w+)\}\}")


@dataclass
class Job:
    """What a template needs besides the config's launch section."""
    config: str  # config file, as given (relative to workdir)
    overrides: list[str]  # section.key=value passed on to `hpc train`
    name: str
    workdir: str  # absolute; the script cd's there and containers mount it at the same path
    image: str = ""  # pyxis: .sqsh or registry image; singularity: .sif
    venv: str = ""  # dgx/plain: the virtual environment to activate (default: this one)
    mounts: str = ""  # containers: SRC:DST[,SRC:DST] (default: workdir at the same path)
    stage_to: str = ""  # dgx: node-local directory to copy the dataset to ("" = no staging)


def sbatch_options(cfg: Config, name: str, workdir: str) -> str:
    """The #SBATCH lines; optional settings appear only when set."""
    launch = cfg.launch
    opts = [("job-name", name), ("nodes", launch.nodes), ("ntasks-per-node", tasks_per_node(cfg))]
    if launch.gpus_per_node:
        opts.append(("gpus-per-node", launch.gpus_per_node))
    opts += [("cpus-per-task", launch.cpus_per_task), ("time", launch.time_min)]
    if launch.mem_gb:
        opts.append(("mem", f"{launch.mem_gb}G"))
    opts += [(key, getattr(launch, key)) for key in ("partition", "account", "qos", "constraint")
             if getattr(launch, key)]
    # B: only the batch shell gets USR2: it forwards the signal to the tasks and requeues
    opts += [("signal", f"B:USR2@{launch.signal_delay_s}"), ("requeue", None),
             ("open-mode", "append"),
             ("output", os.path.join(workdir, launch.log_dir, "%x-%j.out"))]  # one log per job
    lines = []
    for key, value in opts:
        if value is not None and re.search(r"\s", str(value)):
            raise ConfigError(f"sbatch option --{key}={value!r}: whitespace is not allowed")
        lines.append(f"#SBATCH --{key}" + ("" if value is None else f"={value}"))
    return "\n".join(lines)


def check_staging(data_path: str, stage_to: str, workdir: str) -> None:
    """Refuse, when rendering, a staging that rsync --delete could turn destructive: no dataset
    (an empty data.path would copy "/"), the root as source or target, or one inside the other."""
    if not data_path:
        raise ConfigError("--stage-to: data.path is not set (staging would copy the filesystem root)")
    src = os.path.realpath(os.path.join(workdir, data_path))
    dst = os.path.realpath(os.path.join(workdir, stage_to))
    for name, p in (("data.path", src), ("--stage-to", dst)):
        if p == os.sep:
            raise ConfigError(f"{name}: {p!r} is the filesystem root; refusing to stage from or to it")
    if src == dst or dst.startswith(src + os.sep) or src.startswith(dst + os.sep):
        raise ConfigError(f"--stage-to {stage_to}: overlaps data.path {data_path}; stage to a separate "
                          "node-local directory")


def render(template: str, cfg: Config, job: Job) -> str:
    """Fill `{{key}}` values and `{{> partial}}` includes (templates/partials/NAME.sh). Every value
    but the #SBATCH block is shell-quoted."""
    path = LAUNCH_DIR / f"{template}.sbatch"
    if not path.is_file():
        hint = ("HPC_LAUNCH_DIR is set: unset it to use the templates shipped with hpc"
                if os.environ.get("HPC_LAUNCH_DIR") else "hpc is installed without its templates: reinstall it")
        raise InputError(f"{path}: template not found ({hint})")
    if template in ("pyxis", "singularity") and not job.image:
        raise ConfigError(f"template {template}: --image is required (.sqsh/.sif file or registry image)")
    if job.stage_to:
        check_staging(cfg.data.path, job.stage_to, job.workdir)
    q = shlex.quote
    values = {
        "sbatch_options": sbatch_options(cfg, job.name, job.workdir), "workdir": q(job.workdir),
        "config": q(job.config), "run_dir": q(cfg.train.run_dir),
        "overrides": "".join(" " + q(o) for o in job.overrides),
        "signal_delay_s": str(cfg.launch.signal_delay_s), "max_requeues": str(cfg.launch.max_requeues),
        "image": q(job.image), "venv": q(job.venv or sys.prefix), "stage_to": q(job.stage_to),
        "mounts": q(job.mounts or f"{job.workdir}:{job.workdir}"), "data_path": q(cfg.data.path),
    }

    def fill(text: str, where: Path) -> str:
        def sub(m: re.Match) -> str:
            if m.group(1):
                partial = LAUNCH_DIR / "partials" / f"{m.group(2)}.sh"
                return fill(partial.read_text().rstrip("\n"), partial)
            if m.group(2) not in values:
                raise InputError(f"{where}: unknown placeholder {{{{{m.group(2)}}}}}")
            return values[m.group(2)]
        return _PLACEHOLDER.sub(sub, text)

    return fill(path.read_text(), path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--template", "-t", required=True, choices=TEMPLATES,
                        help="which template (hpc/launch/templates/*.sbatch) to render")
    parser.add_argument("--config", required=True, help="training config YAML (as the job sees it from --workdir)")
    parser.add_argument("--print", action="store_true", help="print the script, do not submit")
    parser.add_argument("--name", default="", help="job name (default: the run dir's name)")
    parser.add_argument("--workdir", default="", help="directory the job runs in (default: here)")
    parser.add_argument("--image", default="", help="pyxis .sqsh / registry image, or singularity .sif")
    parser.add_argument("--venv", default="", help="dgx/plain: venv to activate (default: this one)")
    parser.add_argument("--mounts", default="", help="containers: SRC:DST[,...] (default: workdir)")
    parser.add_argument("--stage-to", default="", help="dgx: node-local dir to copy the dataset to")
    for flag, (key, tp, help_) in LAUNCH_FLAGS.items():
        if key != "cluster":  # an sbatch script always runs on Slurm
            parser.add_argument(flag, dest=f"launch_{key}", type=tp, default=None, metavar=key.upper(),
                                help=f"{help_} [launch.{key}]")
    parser.set_defaults(launch_cluster=None)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")


def run(args: argparse.Namespace) -> int:
    workdir = os.path.abspath(args.workdir or os.getcwd())
    cfg = load_config(args.config, [*args.overrides, *launch_overrides(args)])  # validated
    if os.path.isdir(workdir) or not args.print:
        check_dataset(cfg, workdir)
    else:  # rendering for another machine: its files cannot be checked from here
        print(f"# --workdir {workdir} is not on this machine: data.path not checked", file=sys.stderr)
    name = args.name or Path(cfg.train.run_dir).name or "hpc"
    # the template passes train.run_dir="$RUN_DIR" (the resolved one) itself: not a second time
    overrides = [o for o in args.overrides if not o.startswith("train.run_dir=")]
    job = Job(config=args.config, overrides=overrides, name=name, workdir=workdir,
              image=args.image, venv=args.venv, mounts=args.mounts, stage_to=args.stage_to)
    script = render(args.template, cfg, job)
    log_dir = Path(workdir) / cfg.launch.log_dir
    if args.print:
        sys.stdout.write(script)
        print(f"# before sbatch: mkdir -p {log_dir}  (sbatch does not create the log directory)",
              file=sys.stderr)
        return 0
    try:
        log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
        atomic_write_text(log_dir / f"{name}.sbatch", script)
    except OSError as exc:
        raise OutputError(f"{log_dir}: cannot write the job script: {exc.strerror}") from None
    r = subprocess.run(["sbatch", "--parsable", str(log_dir / f"{name}.sbatch")], cwd=workdir,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise ConfigError(f"sbatch {log_dir / f'{name}.sbatch'}: {r.stderr.strip()}")
    job_id = r.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {log_dir / f'{name}.sbatch'}")
    print(f"  follow: tail -f {log_dir}/{name}-{job_id}.out   |   squeue -j {job_id}")
    return 0
