"""Daemon processes of the test cluster (tests/cluster/harness.py): started detached with only fds
0-2 open, found again by their own pid files, checked against /proc (a reused PID is never
signalled), stopped by PID with TERM then KILL; never by name."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


class StartError(RuntimeError):
    """A daemon did not come up; the message ends with the tail of its log."""


def running(pid: int, name: str) -> bool:
    """pid is a live (not zombie) process whose command line mentions `name` (guards PID reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and name in cmdline


def terminate(pid: int, name: str, grace: float = 15) -> None:
    if not running(pid, name):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not running(pid, name):
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def spawn(root: Path, name: str, cmd: list[str], pidfile: Path, timeout: float = 30,
           log_name: str = "") -> int:
    """Start a daemon in the foreground under `setsid --fork` (so it is re-parented to init and
    never a zombie child of pytest), fds > 2 closed, output to log/<log_name or name>.out; returns
    its PID from the daemon's own pid file."""
    log_name = log_name or name
    out = root / "log" / f"{log_name}.out"
    with open(out, "ab") as log:  # cwd: the cluster's root, never the caller's (it may be deleted while the
        # daemons live on: slurmstepd then prints "Unable to get current working directory" into job output)
        subprocess.run(["setsid", "--fork", *cmd], stdin=subprocess.DEVNULL, stdout=log,
                       stderr=subprocess.STDOUT, close_fds=True, check=True, cwd=root,
                       env={**os.environ, "PATH": SBIN_PATH, "SLURM_CONF": str(root / "etc" / "slurm.conf")})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid = int(pidfile.read_text().split()[0])
            if running(pid, name):
                return pid
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.2)
    raise StartError(f"{name} did not start within {timeout:.0f} s:\n{tail(out, 15)}"
                     f"\n{tail(root / 'log' / f'{log_name}.log', 15)}")


def wait_for(what: str, ok, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.3)
    raise StartError(f"{what} not ready within {timeout:.0f} s:\n{tail(log, 20)}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
