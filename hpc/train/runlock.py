"""One `hpc train` per run directory: ``run_dir/train.lock`` names the holder (host, pid, the pid's
start time, Slurm job id). A second trainer is refused with one line naming the holder; a lock
whose holder is dead is taken over with a message.

Why a lock *file* and not ``fcntl``/``flock``: run directories live on Lustre, GPFS or NFS. Lustre
honours ``flock`` only when mounted with ``-o flock`` (many sites mount ``localflock``, which locks
per node, so two nodes would both "hold" it, or ``noflock``, which fails); NFS locks go through
lockd/NLM, which is often missing or slow in containers, and are silently dropped when a client
reboots. Creating a file is atomic on all of them (``link()`` of a complete temporary file: the
lock never exists half-written), and the file says who holds it, which a person can read.

Holder dead means: our own Slurm job before its requeue (same job id, lower SLURM_RESTART_COUNT),
or on the same host a pid that no longer runs (or now belongs to another process: its start time
differs), or on another host a Slurm job that `scontrol` no longer shows as running.

    with RunLock(run_dir):      # OutputError when another live trainer holds it
        ...
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

from hpc.errors import OutputError

NAME = "train.lock"
ALIVE_STATES = {"RUNNING", "PENDING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                "STAGE_OUT", "SIGNALING", "REQUEUE_HOLD", "REQUEUE_FED", "STOPPED"}


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), "" if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # fields after the command name, which may hold spaces


def me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
            "job": os.environ.get("SLURM_JOB_ID", ""), "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _pid_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    return not start or _start_time(pid) in ("", start)  # same pid number, another process: dead


def _slurm_job_alive(job: str) -> bool | None:
    """True/False from `scontrol show job`, None when it cannot tell (no Slurm here)."""
    try:
        r = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return False if "Invalid job id" in r.stderr else None
    state = next((w.split("=", 1)[1] for w in r.stdout.split() if w.startswith("JobState=")), "")
    return state in ALIVE_STATES


def dead_because(holder: dict, mine: dict) -> str | None:
    """Why the holder is known to be gone, or None while it may be alive."""
    job = str(holder.get("job") or "")
    if job and job == mine["job"] and int(holder.get("restart") or 0) < mine["restart"]:
        return f"it is this Slurm job {job} before its requeue"
    if holder.get("host") == mine["host"]:
        pid = int(holder.get("pid") or 0)
        if pid <= 0 or not _pid_alive(pid, str(holder.get("start") or "")):
            return f"pid {pid} no longer runs on {mine['host']}"
        return None
    if job and _slurm_job_alive(job) is False:
        return f"Slurm job {job} has ended"
    return None


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['job']}" if holder.get("job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since', '?')}"


class RunLock:
    def __init__(self, run_dir: str | os.PathLike, report=None):
        self.dir = Path(run_dir)
        self.path = self.dir / NAME
        self.report = report or (lambda msg: print(f"hpc train: {msg}", file=sys.stderr, flush=True))
        self.held = False

    def acquire(self) -> RunLock:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            mine = me()
            for _ in range(5):
                if self._create(mine):
                    self.held = True
                    return self
                self._take_over_if_dead(mine)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot lock the run directory: {exc.strerror or exc}") from None
        raise OutputError(f"{self.path}: could not take the lock (other trainers starting at the same time?)")

    def _create(self, mine: dict) -> bool:
        """Create the lock with our record, atomically and only if absent (link of a full temp file)."""
        tmp = self.dir / f".{NAME}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(mine) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over_if_dead(self, mine: dict) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            holder = json.loads(raw)
            assert isinstance(holder, dict)
        except (ValueError, AssertionError):
            raise OutputError(f"{self.path}: run directory locked by an unreadable lock file; delete it if "
                              "no trainer uses this directory") from None
        why = dead_because(holder, mine)
        if why is None:
            raise OutputError(f"{self.dir}: another hpc train is using this run directory ({describe(holder)}); "
                              f"two would interleave metrics.jsonl and checkpoints (if it is gone, delete {self.path})")
        # Move the stale lock aside, then check that it is the one we judged: a racing trainer may
        # have replaced it with a live one in between, which then goes back.
        aside = self.dir / f".{NAME}.{secrets.token_hex(8)}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_bytes() != raw:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        self.report(f"taking over the lock of {self.dir} from {describe(holder)}: {why}")

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads(self.path.read_bytes())
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
