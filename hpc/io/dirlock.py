"""One writer per directory: a lock file naming its holder (host, pid, the pid's start time,
Slurm job id). A second writer is refused with one line naming the holder; a lock whose holder is
dead is taken over with a message. `hpc train` locks its run directory (hpc.train.runlock),
`hpc convert` its dataset directory.

Why a lock *file* and not ``fcntl``/``flock``: run directories and datasets live on Lustre, GPFS or
NFS. Lustre honours ``flock`` only when mounted with ``-o flock`` (many sites mount ``localflock``,
which locks per node, so two nodes would both "hold" it, or ``noflock``, which fails); NFS locks go
through lockd/NLM, which is often missing or slow in containers, and are silently dropped when a
client reboots. Creating a file is atomic on all of them (``link()`` of a complete temporary file:
the lock never exists half-written), and the file says who holds it, which a person can read.

Holder dead means: our own Slurm job before its requeue (same job id, lower SLURM_RESTART_COUNT),
or on the same host a pid that no longer runs (or now belongs to another process: its start time
differs), or on another host a Slurm job that `scontrol` no longer shows as running.

The lock file is read like any file hpc did not write: never through a link, only a regular file,
at most 64 KiB, and every field checked (a pid of "abc" or 1e30 is an unreadable lock, one line).

    with DirLock(path, "train.lock", "hpc train", "run directory"):   # OutputError when held
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

from hpc.errors import HpcError, OutputError
from hpc.io.atomic import output_error
from hpc.io.regular import read_bounded

ALIVE_STATES = {"RUNNING", "PENDING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                "STAGE_OUT", "SIGNALING", "REQUEUE_HOLD", "REQUEUE_FED", "STOPPED"}
MAX_LOCK_BYTES = 1 << 16
MAX_PID = 1 << 22  # Linux's largest pid_max


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), "" if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # fields after the command name, which may hold spaces


def me() -> dict:
    restart = os.environ.get("SLURM_RESTART_COUNT") or "0"
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
            "job": os.environ.get("SLURM_JOB_ID", ""), "restart": int(restart) if restart.isdigit() else 0,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def holder_record(raw: bytes) -> dict | None:
    """A lock file's record with checked fields, or None when it is not one: JSON object, host and
    job strings, pid an integer in [0, 2**22], restart an integer >= 0."""
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(rec, dict):
        return None
    pid, restart = rec.get("pid", 0), rec.get("restart", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (pid, restart)):
        return None
    if not (0 <= pid <= MAX_PID and 0 <= restart < 1 << 31):
        return None
    if not all(isinstance(rec.get(k, ""), str) for k in ("host", "job", "start", "since")):
        return None
    return rec


def missing_dirs(paths: list[Path]) -> list[Path]:
    """The directories of ``paths`` (and their parents) that do not exist yet, outermost first:
    what a command is about to create, and removes again after a failed start (remove_empty)."""
    missing: list[Path] = []
    for path in paths:
        for p in [Path(path), *Path(path).parents]:
            if os.path.lexists(p):
                break
            if p not in missing:
                missing.append(p)
    return sorted(missing, key=lambda p: len(p.parts))


def make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the directories it created, outermost first."""
    missing = missing_dirs([path])
    path.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty(created: list[Path]) -> None:
    """Remove the directories of ``created`` (outermost first) that are empty, innermost first: a
    failed start leaves no skeleton behind, and never removes anything it did not create."""
    for p in reversed(created):
        with contextlib.suppress(OSError):
            p.rmdir()


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
    """Why the holder (a checked record: holder_record) is known to be gone, or None while it may be alive."""
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


class DirLock:
    """``name`` in ``directory`` held by this process; ``verb`` ("hpc train") and ``what`` ("run
    directory") word the messages, ``conflict`` says what two writers would do."""

    conflict = "two would interleave their writes"

    def __init__(self, directory: str | os.PathLike, name: str, verb: str, what: str, report=None):
        self.dir = Path(directory)
        self.name, self.verb, self.what = name, verb, what
        self.path = self.dir / name
        self.report = report or (lambda msg: print(f"{verb}: {msg}", file=sys.stderr, flush=True))
        self.held = False
        self.created: list[Path] = []  # directories acquire() made (outermost first)

    def acquire(self):
        try:
            self.created = make_dirs(self.dir)
            mine = me()
            for _ in range(5):
                if self._create(mine):
                    self.held = True
                    return self
                self._take_over_if_dead(mine)
        except OSError as exc:  # a full disk, a read-only file system: the atomic writer's words
            raise output_error(self.path, exc, f"cannot lock the {self.what}") or \
                OutputError(f"{self.path}: cannot lock the {self.what}: {exc.strerror or exc}") from None
        raise OutputError(f"{self.path}: could not take the lock (other writers starting at the same time?)")

    def _create(self, mine: dict) -> bool:
        """Create the lock with our record, atomically and only if absent (link of a full temp file)."""
        tmp = self.dir / f".{self.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(mine) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, self.path)  # never follows a link planted at the name: EEXIST
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self, path: Path) -> bytes:
        """A lock file's bytes; one OutputError line when it is a link, a FIFO, a device or too big."""
        try:
            return read_bounded(path, "lock", MAX_LOCK_BYTES, OutputError, follow=False)
        except HpcError as exc:
            raise OutputError(f"{exc}; delete it if no {self.verb} uses this {self.what}") from None

    def _take_over_if_dead(self, mine: dict) -> None:
        if not os.path.lexists(self.path):
            return  # released meanwhile: try again
        try:
            raw = self._read(self.path)
        except OutputError:
            if not os.path.lexists(self.path):
                return
            raise
        holder = holder_record(raw)
        if holder is None:
            raise OutputError(f"{self.path}: {self.what} locked by an unreadable lock file; delete it if "
                              f"no {self.verb} uses this {self.what}")
        why = dead_because(holder, mine)
        if why is None:
            raise OutputError(f"{self.dir}: another {self.verb} is using this {self.what} ({describe(holder)}); "
                              f"{self.conflict} (if it is gone, delete {self.path})")
        # Move the stale lock aside, then check that it is the one we judged: a racing writer may
        # have replaced it with a live one in between, which then goes back.
        aside = self.dir / f".{self.name}.{secrets.token_hex(8)}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            same = self._read(aside) == raw
        except OutputError:
            same = False
        if not same:
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
        with contextlib.suppress(OSError, HpcError):
            holder = holder_record(self._read(self.path)) or {}
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
