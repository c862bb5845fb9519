"""Submit one training job to Slurm with submitit; preempted jobs requeue and resume by themselves.

One task per GPU (tasks_per_node = gpus_per_node; `--tasks-per-node` for CPU jobs). On USR2 (time
limit or preemption) the trainer writes a checkpoint and stops, submitit requeues the job, and the
next attempt resumes from the newest checkpoint in train.run_dir: a run longer than --time finishes
in several attempts without anyone watching. Launch flags override the config's `launch` section;
trailing `section.key=value` arguments override any other key.

example:
  hpc submit --config configs/dgx.yaml --nodes 2 --gpus-per-node 8 --partition batch \\
      --account proj --time 240 train.run_dir=runs/unet-a optim.lr=3e-4
  hpc submit --config configs/tiny.yaml --cluster local --tasks-per-node 2 --wait
"""
from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hpc.config import Config, check_dataset, from_dict, load_config, to_dict
from hpc.errors import EXIT_REQUEUE

# CLI flag -> (launch.<key>, type, help). Shared by `hpc submit`, `hpc sweep` and `hpc sbatch`.
LAUNCH_FLAGS: dict[str, tuple[str, type, str]] = {
    "--cluster": ("cluster", str, "slurm | local (submitit's local executor) | debug (in-process)"),
    "--nodes": ("nodes", int, "number of nodes"),
    "--gpus-per-node": ("gpus_per_node", int, "GPUs per node; one task per GPU (0 = CPU job)"),
    "--tasks-per-node": ("tasks_per_node", int, "tasks per node (default: gpus per node, or 1)"),
    "--cpus-per-task": ("cpus_per_task", int, "CPU cores per task (data loader workers + 1)"),
    "--mem-gb": ("mem_gb", int, "memory per node in GB (0 = the partition's default)"),
    "--partition": ("partition", str, "Slurm partition"),
    "--account": ("account", str, "Slurm account"),
    "--qos": ("qos", str, "Slurm QOS"),
    "--constraint": ("constraint", str, "Slurm node constraint (e.g. dgxa100)"),
    "--time": ("time_min", int, "time limit per attempt, minutes"),
    "--signal-delay": ("signal_delay_s", int, "seconds before the limit at which USR2 is sent"),
    "--container": ("container", str, "pyxis/enroot image (.sqsh or registry) the tasks run in"),
    "--log-dir": ("log_dir", str, "directory for submitit's pickles and the job logs"),
    "--max-requeues": ("max_requeues", int, "give up after this many time-limit requeues"),
}
T = TypeVar("T")


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, (key, tp, help_) in LAUNCH_FLAGS.items():
        parser.add_argument(flag, dest=f"launch_{key}", type=tp, default=None, metavar=key.upper(),
                            help=f"{help_} [launch.{key}]")


def launch_overrides(args: argparse.Namespace) -> list[str]:
    """The launch flags that were given, as `launch.key=value` overrides (recorded in the config)."""
    out = []
    for key, _, _ in LAUNCH_FLAGS.values():
        value = getattr(args, f"launch_{key}")
        if value is not None:
            out.append(f"launch.{key}={value}")
    return out


def tasks_per_node(cfg: Config) -> int:
    return cfg.launch.tasks_per_node or max(1, cfg.launch.gpus_per_node)


def requeue_on_exit75(fn: Callable[[], T]) -> T:
    """Run `fn` in a submitit task; when it stops with EXIT_REQUEUE (the trainer caught USR2 or
    SIGTERM and wrote a checkpoint), hand over to submitit's own USR2 handler, which on rank 0
    calls the callable's checkpoint(), runs `scontrol requeue` and exits; other ranks just leave."""
    requeue = signal.getsignal(signal.SIGUSR2)  # submitit's, before fn installs its own
    try:
        return fn()
    except SystemExit as exc:
        if exc.code != EXIT_REQUEUE or not callable(requeue):
            raise
        for sig in (signal.SIGUSR2, signal.SIGTERM):  # a second signal must not requeue twice
            signal.signal(sig, signal.SIG_IGN)
        requeue(signal.SIGUSR2, None)
        raise


def _shutdown_unless_failed() -> None:
    """atexit: barrier -> flush -> os._exit(0), unless the interpreter is exiting on an unhandled
    exception (sys.last_value is set then), whose non-zero status must reach Slurm."""
    if getattr(sys, "last_value", None) is None:
        from hpc.distributed import dist  # late: torch; `hpc submit` on a login node never imports it

        dist.shutdown(0)


class TrainJob:
    """What submitit runs in every task: launch env -> `hpc.train.train.train(cfg)`.

    Checkpointable: submitit calls `checkpoint()` on preemption or time limit, which resubmits this
    same object (the config as a plain dict, no model state): the trainer itself resumes from the
    newest checkpoint in train.run_dir.
    """

    def __init__(self, config: dict):
        self.config = config

    def __call__(self) -> dict:
        from hpc.distributed.launcher import setup_torch_env  # late (here and below): runs on the compute node;
        from hpc.train.train import train  # `hpc submit` on the login node never imports torch

        setup_torch_env()
        result = requeue_on_exit75(lambda: train(from_dict(self.config)))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # submitit pickles `result` after this returns, then the interpreter exits, where gloo
            # aborts ~1 run in 8 (docs/ARCHITECTURE.md, "Shutting down"): leave through
            # hpc.distributed.dist.shutdown instead
            atexit.register(_shutdown_unless_failed)
        return result

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.config))


def make_executor(cfg: Config, name: str):
    """A submitit executor with the config's launch settings (slurm, local or debug)."""
    import submitit

    launch = cfg.launch
    kwargs = {"slurm_max_num_timeout": launch.max_requeues}
    if launch.container:
        kwargs["slurm_python"] = "python3"  # the container's interpreter, not this venv's
    executor = submitit.AutoExecutor(folder=launch.log_dir, cluster=launch.cluster, **kwargs)
    params = dict(name=name, nodes=launch.nodes, tasks_per_node=tasks_per_node(cfg),
                  cpus_per_task=launch.cpus_per_task, timeout_min=launch.time_min,
                  slurm_signal_delay_s=launch.signal_delay_s)
    if launch.cluster == "slurm":
        # one OpenMP thread per core given to the task: torch otherwise starts one per core of the
        # node, and oversubscribed ranks spin (7x slower steps measured on a busy 2-core node)
        params["slurm_setup"] = [f"export OMP_NUM_THREADS={launch.cpus_per_task}"]
    if launch.gpus_per_node:
        params["gpus_per_node"] = launch.gpus_per_node
    if launch.mem_gb:
        params["mem_gb"] = launch.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(launch, key):
            params[f"slurm_{key}"] = getattr(launch, key)
    if launch.container:
        cwd = os.getcwd()  # run dirs, logs and data are given relative to it: mount it in place
        params["slurm_srun_args"] = [f"--container-image={launch.container}",
                                     f"--container-mounts={cwd}:{cwd}", f"--container-workdir={cwd}"]
    executor.update_parameters(**params)
    return executor


def _error_line(message: str) -> str:
    """The exception line of the traceback that submitit frames between dashed lines."""
    parts = message.split("-" * 22)
    body = parts[1] if len(parts) > 2 else message
    lines = [ln for ln in body.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "(no message)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="", help="training config YAML (default: the built-in defaults)")
    add_launch_arguments(parser)
    parser.add_argument("--name", default="", help="job name (default: the run dir's name)")
    parser.add_argument("--wait", action="store_true",
                        help="block until the job ends; exit non-zero if it failed")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, [*args.overrides, *launch_overrides(args)])  # validated
    check_dataset(cfg)
    name = args.name or Path(cfg.train.run_dir).name or "hpc"
    job = make_executor(cfg, name).submit(TrainJob(to_dict(cfg)))
    launch = cfg.launch
    print(f"submitted job {job.job_id} ({launch.cluster}: {launch.nodes} node(s) x "
          f"{tasks_per_node(cfg)} task(s))")
    print(f"  run dir: {cfg.train.run_dir}")
    print(f"  stdout:  {job.paths.stdout}")
    print(f"  stderr:  {job.paths.stderr}")
    if launch.cluster == "slurm":
        print(f"  follow:  tail -f {job.paths.stdout}   |   squeue -j {job.job_id}   |   sacct -j {job.job_id}")
    sys.stdout.flush()
    if not args.wait:
        return 0
    import submitit

    try:
        results = job.results()  # one per task (rank 0's first)
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as exc:
        print(f"hpc submit: job {job.job_id} failed: {_error_line(str(exc))} (see {job.paths.stderr})",
              file=sys.stderr)
        return 1
    result = results[0]  # train()'s summary on rank 0
    done = (f"step {result.get('step')}, checkpoint {result.get('checkpoint')}"
            if isinstance(result, dict) else repr(result))
    print(f"job {job.job_id} finished: {done}")
    return 0
