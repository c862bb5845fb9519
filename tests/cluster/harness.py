"""A real Slurm cluster (munge + MariaDB + slurmdbd + slurmctld + one slurmd per node) for the tests,
for .ci/run and for anyone who wants to try `hpc submit` / `hpc sweep` without a cluster.

    python tests/cluster/harness.py start    # as root; prints `export SLURM_CONF=...`
    python tests/cluster/harness.py status
    python tests/cluster/harness.py stop
    HPC_SLURM_DIR=/tmp/hpc-slurm-multi python tests/cluster/harness.py start --nodes 2

One node (the default) is this machine on 127.0.0.1. With --nodes N >= 2 every node is a network
and UTS namespace on a private bridge (tests/cluster/netns.py) with its own slurmd, hostname and
/etc/hosts, so jobs really cross node boundaries (MASTER_ADDR, c10d rendezvous, mpirun's daemons);
slurmctld, slurmdbd and the client commands stay in the machine's own shell. Two clusters with
different directories run side by side (own ports, bridge and namespace names).

Everything lives under one directory (``$HPC_SLURM_DIR``, default /tmp/hpc-slurm): configs, munge
key and socket, MariaDB data, Slurm state, logs, PID files, fake GPU devices. Daemons run in their
own session with only fds 0-2 open (an inherited pipe would make `script | cat` hang) and are
stopped by their recorded PIDs, never by name; `stop` also removes the namespaces and the bridge,
and ends what was left in them, also after an interrupted start. A cluster started by the CLI stays
up until `stop`; one started by a test session is stopped by the last session that uses it.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import string
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from daemons import SBIN_PATH, StartError, free_ports, port_open, running, spawn, terminate, wait_for  # noqa: E402

import netns  # noqa: E402  (sibling modules; this file also runs as a script)

ROOT_DIR = Path(os.environ.get("HPC_SLURM_DIR", "/tmp/hpc-slurm"))
# the tests' 2-node cluster, next to the single-node one (never the same directory)
MULTI_DIR = Path(os.environ.get("HPC_SLURM_MULTI_DIR", str(ROOT_DIR) + "-multi"))
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")  # start order
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@dataclass
class Cluster:
    root: Path
    node: str  # the first node's name (a single-node cluster: this machine's short host name)
    cpus: int  # per node
    gpus: int  # fake GPUs per node
    ports: dict[str, int]
    pids: dict[str, int] = field(default_factory=dict)
    started_by: str = "session"  # "cli" clusters are never stopped by test sessions
    nodes: list[str] = field(default_factory=list)  # multi-node: node names; [] = [node] on 127.0.0.1
    owned: bool = False  # this process registered as a user (see stop_if_owned)

    @property
    def node_names(self) -> list[str]:
        return self.nodes or [self.node]

    @property
    def daemons(self) -> list[str]:
        """pids keys in start order: one slurmd per node ("slurmd:NODE" on a multi-node cluster)."""
        if not self.nodes:
            return list(DAEMONS)
        return [*DAEMONS[:-1], *(f"slurmd:{n}" for n in self.nodes)]

    @property
    def net(self) -> netns.Net | None:
        """The bridge and namespaces of a multi-node cluster (None for one node)."""
        return netns.load(self.root) if self.nodes else None

    # --- what jobs and clients need ---------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF: pass to any subprocess that calls Slurm commands."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, args: list[str], timeout: float = 60, check: bool = True,
            **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                           env=kw.pop("env", self.env), **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def sbatch(self, script: str | Path, *args: str, cwd: str | os.PathLike | None = None,
               env: dict[str, str] | None = None) -> str:
        """Submit a batch script (a Path, or the script's text as a str); returns the job id."""
        cmd = ["sbatch", "--parsable", *args]
        text = None if isinstance(script, Path) else script
        if text is None:
            cmd.append(str(script))
        r = self.run(cmd, input=text, cwd=cwd, env={**self.env, **(env or {})})
        return r.stdout.strip().split(";")[0]

    def srun(self, args: list[str], timeout: float = 120, check: bool = False,
             **kw) -> subprocess.CompletedProcess:
        return self.run(["srun", *args], timeout=timeout, check=check, **kw)

    def states(self, job_id: str) -> dict[str, str]:
        """{job or array-task id: state} from squeue (all states), falling back to sacct."""
        r = self.run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%i %T"], check=False)
        rows = [ln.split() for ln in r.stdout.splitlines() if ln.strip()]
        if r.returncode == 0 and rows:
            return {i: s for i, s in rows}
        r = self.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State"], check=False)
        rows = [ln.split("|") for ln in r.stdout.splitlines() if ln.strip()]
        return {i: s.split()[0] for i, s in rows}  # "CANCELLED by 0" -> "CANCELLED"

    def wait(self, job_id: str, timeout: float = 120) -> str:
        """Block until every task of the job has ended; returns its state (several joined by ',')."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.states(job_id)
            if states and all(s in TERMINAL for s in states.values()):
                return ",".join(sorted(set(states.values())))
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s: {states}")
            time.sleep(0.5)

    # --- lifetime ------------------------------------------------------------------------------
    def alive(self) -> bool:
        if set(self.pids) != set(self.daemons) or not all(running(p, _name(d)) for d, p in self.pids.items()):
            return False
        return self.run(["scontrol", "ping"], check=False, timeout=20).returncode == 0

    def stop_if_owned(self) -> None:
        """Called by the test session: stop the cluster if a session started it and no other live
        session still uses it. A cluster started with the CLI (e.g. by .ci/run) stays up."""
        if not self.owned:
            return
        with _locked(self.root):
            (self.root / "users" / str(os.getpid())).unlink(missing_ok=True)
            self.owned = False
            if self.started_by == "session" and not _live_users(self.root):
                self.stop()

    def stop(self) -> None:
        """Cancel jobs, then stop the daemons by PID in reverse start order (TERM, then KILL); on a
        multi-node cluster then end what is left in the node namespaces and remove them and the bridge."""
        if "slurmctld" in self.pids and running(self.pids["slurmctld"], "slurmctld"):
            jobs = self.run(["squeue", "-h", "-o", "%A"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.run(
                        ["squeue", "-h", "-t", "R,CG", "-o", "%A"], check=False).stdout.strip():
                    time.sleep(0.5)
        for daemon in reversed(self.daemons):
            if daemon in self.pids:
                terminate(self.pids[daemon], _name(daemon))
        self.pids.clear()
        if self.nodes:
            netns.teardown(self.root)
        (self.root / "state.json").unlink(missing_ok=True)

    def link(self, node: str, up: bool) -> None:
        """Multi-node only: take `node`'s network link down (or back up), as a failing cable would."""
        net = self.net
        if net is None:
            raise RuntimeError("link(): a single-node cluster has no node links")
        net.link(node, up)

    def save(self) -> None:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        data.pop("owned")
        tmp = self.root / "state.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        tmp.rename(self.root / "state.json")


# --- processes ---------------------------------------------------------------------------------
def _name(daemon: str) -> str:
    """The program behind a pids key: "slurmd:node1" -> "slurmd"."""
    return daemon.split(":")[0]


# --- starting ------------------------------------------------------------------------------------
def _render(template: str, dest: Path, values: dict, mode: int = 0o644) -> None:
    dest.write_text(string.Template((HERE / template).read_text()).substitute(values))
    dest.chmod(mode)


def _mariadb(root: Path, port: int, password: str) -> int:
    data, sock = root / "mysql" / "data", root / "mysql" / "mysql.sock"
    subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                    "--auth-root-authentication-method=socket", "--skip-test-db"],
                   capture_output=True, check=True, env={**os.environ, "PATH": SBIN_PATH})
    pid = spawn(root, "mariadbd", [
        "mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={sock}", f"--port={port}",
        "--bind-address=127.0.0.1", "--skip-name-resolve", "--user=root",
        f"--pid-file={root / 'run' / 'mariadbd.pid'}", f"--log-error={root / 'log' / 'mariadbd.log'}",
        "--innodb-buffer-pool-size=64M"], root / "run" / "mariadbd.pid")
    client = ["mariadb", "--no-defaults", f"--socket={sock}", "-uroot"]
    wait_for("MariaDB", lambda: subprocess.run([*client, "-e", "SELECT 1"], capture_output=True)
              .returncode == 0, 60, root / "log" / "mariadbd.log")
    sql = (f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}';"
           "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
    subprocess.run([*client, "-e", sql], capture_output=True, check=True)
    return pid


def stop_orphans(root: Path) -> list[str]:
    """Stop daemons of a start that was killed before it saved state.json, found by the pid files
    the daemons write under root/run (checked against /proc, so a reused PID is left alone), then
    remove the namespaces and bridge a multi-node start made (named after root)."""
    stopped = []
    pidfiles = sorted((root / "run").glob("slurmd-*.pid"))  # multi-node: one per node
    pidfiles += [root / "run" / f"{d}.pid" for d in reversed(DAEMONS)]
    for pidfile in pidfiles:
        daemon = pidfile.stem.split("-")[0]
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if running(pid, daemon):
            terminate(pid, daemon)
            stopped.append(daemon)
    if shutil.which("ip", path=SBIN_PATH) and os.geteuid() == 0:
        netns.teardown(root)
    return stopped


def _configure(root: Path, n_nodes: int, cpus: int, gpus: int) -> tuple[Cluster, dict]:
    """A fresh root: directories, configs, munge key, fake GPU devices, and (N >= 2) the network."""
    stop_orphans(root)
    shutil.rmtree(root, ignore_errors=True)
    for sub in ("etc", "munge", "mysql", "state", "spool", "run", "log", "dev", "users"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)  # munged refuses a socket/key dir that others can write
    mysql_port, dbd_port, ctld_port, slurmd_port = free_ports(4)
    host = socket.gethostname().split(".")[0]
    nodes = [f"node{i + 1}" for i in range(n_nodes)] if n_nodes > 1 else []
    c = Cluster(root=root, node=nodes[0] if nodes else host, cpus=cpus, gpus=gpus, nodes=nodes,
                ports={"mysql": mysql_port, "slurmdbd": dbd_port, "slurmctld": ctld_port, "slurmd": slurmd_port})
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    values = dict(root=root, controller=host, ctld_addr="127.0.0.1", n_nodes=n_nodes, cpus=cpus, gpus=gpus,
                  last_gpu=gpus - 1, mem_mb=int(mem_kb * 0.9 / 1024), mysql_port=mysql_port, dbd_port=dbd_port,
                  ctld_port=ctld_port, slurmd_port=slurmd_port, db_password=secrets.token_hex(12),
                  slurmd_spool=root / "spool" / "slurmd", slurmd_pid=root / "run" / "slurmd.pid",
                  slurmd_log=root / "log" / "slurmd.log", node_list=c.node,
                  node_lines=f"NodeName={c.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=MEM Gres=gpu:{gpus} "
                             "State=UNKNOWN")
    if nodes:
        net = netns.Net.create(root, nodes)
        (root / "etc" / "hosts").write_text(net.hosts_text(host))
        # %n: slurmd substitutes its node name; slurmd does not create its spool directory
        values.update(ctld_addr=net.gateway, slurmd_spool=root / "spool" / "%n",
                      slurmd_pid=root / "run" / "slurmd-%n.pid", slurmd_log=root / "log" / "slurmd-%n.log",
                      node_list=f"node[1-{n_nodes}]", node_lines="\n".join(
                          f"NodeName={n} NodeAddr={net.addr(n)} CPUs={cpus} RealMemory=MEM Gres=gpu:{gpus} "
                          "State=UNKNOWN" for n in nodes))
    values["node_lines"] = values["node_lines"].replace("MEM", str(values["mem_mb"]))
    for node in c.node_names:
        (root / "spool" / (node if nodes else "slurmd")).mkdir()
    _render("slurm.conf.in", root / "etc" / "slurm.conf", values)
    _render("slurmdbd.conf.in", root / "etc" / "slurmdbd.conf", values, mode=0o600)
    _render("gres.conf.in", root / "etc" / "gres.conf", values)
    for i in range(gpus):
        os.mknod(root / "dev" / f"nvidia{i}", 0o666 | 0o020000, os.makedev(1, 3))  # char dev = /dev/null
    subprocess.run(["mungekey", "--create", f"--keyfile={root / 'munge' / 'munge.key'}"], check=True,
                   capture_output=True, env={**os.environ, "PATH": SBIN_PATH})
    return c, values


def _start_slurmds(c: Cluster) -> None:
    """One slurmd per node (inside its namespaces on a multi-node cluster); waits until all are idle."""
    root, net = c.root, c.net
    for node in c.node_names:
        if net is None:
            c.pids["slurmd"] = spawn(root, "slurmd", ["slurmd", "-D", "-N", node], root / "run" / "slurmd.pid")
        else:
            cmd = net.node_cmd(node, root / "etc" / "hosts", ["slurmd", "-D", "-N", node])
            c.pids[f"slurmd:{node}"] = spawn(root, "slurmd", cmd, root / "run" / f"slurmd-{node}.pid",
                                              log_name=f"slurmd-{node}")
    want = sorted(c.node_names)

    def all_idle() -> bool:
        r = c.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        rows = sorted(ln.split() for ln in r.stdout.splitlines() if ln.strip())
        return [n for n, _ in rows] == want and all(st == "idle" for _, st in rows)

    log = root / "log" / ("slurmd.log" if net is None else f"slurmd-{want[-1]}.log")
    wait_for(f"slurmd ({len(want)} node(s) idle)", all_idle, 60, log)


def _start(root: Path, n_nodes: int, cpus: int, gpus: int) -> Cluster:
    c, values = _configure(root, n_nodes, cpus, gpus)
    try:
        key = root / "munge" / "munge.key"
        c.pids["munged"] = spawn(root, "munged", [
            "munged", "--foreground", "--force", f"--socket={root / 'munge' / 'munge.sock'}",
            f"--key-file={key}", f"--log-file={root / 'log' / 'munged.log'}",
            f"--pid-file={root / 'run' / 'munged.pid'}", f"--seed-file={root / 'munge' / 'seed'}"],
            root / "run" / "munged.pid")
        c.pids["mariadbd"] = _mariadb(root, c.ports["mysql"], values["db_password"])
        c.pids["slurmdbd"] = spawn(root, "slurmdbd", ["slurmdbd", "-D"], root / "run" / "slurmdbd.pid")
        wait_for("slurmdbd", lambda: port_open(c.ports["slurmdbd"]), 60, root / "log" / "slurmdbd.log")
        c.pids["slurmctld"] = spawn(root, "slurmctld", ["slurmctld", "-D"], root / "run" / "slurmctld.pid")
        wait_for("slurmctld", lambda: c.run(["scontrol", "ping"], check=False).returncode == 0, 60,
                  root / "log" / "slurmctld.log")
        _start_slurmds(c)
    except BaseException:
        c.stop()
        raise
    return c


# --- reuse / registry ------------------------------------------------------------------------------
@contextmanager
def _locked(root: Path):
    with open(str(root) + ".lock", "w") as f:  # outside root, which a fresh start wipes
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _live_users(root: Path) -> list[int]:
    users = []
    for f in (root / "users").glob("*"):
        if Path(f"/proc/{f.name}").exists():
            users.append(int(f.name))
        else:
            f.unlink(missing_ok=True)  # a session that died without cleaning up
    return users


def load(root: Path = ROOT_DIR) -> Cluster | None:
    try:
        data = json.loads((root / "state.json").read_text())
    except (OSError, ValueError):
        return None
    known = {f.name for f in fields(Cluster)}  # a state.json written by another version of this file
    return Cluster(**{**{k: v for k, v in data.items() if k in known}, "root": Path(data["root"])})


def missing_tools(n_nodes: int = 1) -> list[str]:
    tools = ["munged", "mungekey", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld",
             "slurmd", "sbatch", "srun", "sacct", "setsid"]
    if n_nodes > 1:
        tools += ["ip", "nsenter", "unshare"]
    return [t for t in tools if shutil.which(t, path=SBIN_PATH) is None]


def start(started_by: str, cpus: int | None = None, gpus: int = 2, nodes: int = 1,
          root: Path = ROOT_DIR) -> Cluster:
    """Reuse the running cluster or start a fresh one. Raises StartError/RuntimeError."""
    if nodes < 1:
        raise StartError(f"--nodes {nodes}: need at least 1")
    if missing := missing_tools(nodes):
        raise StartError(f"missing {', '.join(missing)}: run `bash tests/cluster/install-system.sh`")
    if os.geteuid() != 0:
        raise StartError("starting slurmd/slurmctld needs root (or start it once as root with "
                         "`python tests/cluster/harness.py start`)")
    with _locked(root):
        c = load(root)
        if c is not None and c.alive() and len(c.node_names) != nodes:
            raise StartError(f"a {len(c.node_names)}-node cluster runs at {root}: stop it first "
                             "(harness.py stop) or set HPC_SLURM_DIR to another directory")
        if c is None or not c.alive():
            if c is not None:
                c.stop()  # leftovers of a dead cluster, by PID
            c = _start(root, nodes, cpus or max(4, os.cpu_count() or 1), gpus)
            c.started_by = started_by
            c.save()
    return c


def ensure_cluster(nodes: int = 1, root: Path | None = None) -> tuple[Cluster | None, str]:
    """For the `slurm` (1 node, ROOT_DIR) and `slurm2` (2 nodes, MULTI_DIR) test fixtures: (cluster,
    "") or (None, why). The single-node cluster also sets SLURM_CONF in os.environ so submitit and
    subprocesses of this session talk to it; multi-node tests pass `cluster.env` explicitly."""
    root = root or (ROOT_DIR if nodes == 1 else MULTI_DIR)
    c = load(root)
    try:
        if c is None or not c.alive() or len(c.node_names) != nodes:
            c = start("session", nodes=nodes, root=root)
    except (StartError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return None, str(exc)
    with _locked(root):
        (c.root / "users" / str(os.getpid())).touch()
    c.owned = True
    if nodes == 1:
        os.environ["SLURM_CONF"] = str(c.conf)
    return c, ""


def _status(c: Cluster | None) -> int:
    if c is None or not c.alive():
        print("no test cluster running")
        return 1
    net = c.net
    where = f" subnet={net.subnet}.0/24 bridge={net.bridge}" if net else ""
    print(f"SLURM_CONF={c.conf} nodes={','.join(c.node_names)} cpus={c.cpus} gpus={c.gpus}{where} "
          f"started_by={c.started_by} pids={c.pids}")
    print(c.run(["sinfo"], check=False).stdout, end="")
    return 0


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="harness.py", description=__doc__.splitlines()[0])
    parser.add_argument("cmd", nargs="?", default="status", choices=("start", "stop", "status"))
    parser.add_argument("--nodes", type=int, default=1, help="start: number of nodes (>= 2: namespaces)")
    args = parser.parse_args(argv)
    if args.cmd == "start":
        try:
            t0 = time.monotonic()
            c = start("cli", nodes=args.nodes)
        except (StartError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"harness: cannot start the test cluster: {exc}", file=sys.stderr)
            return 1
        print(f"# {len(c.node_names)} node(s) up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        print(f"export SLURM_CONF={c.conf}")
        return 0
    c = load()
    if args.cmd == "stop":
        with _locked(ROOT_DIR):
            if c is not None:
                c.stop()
            stop_orphans(ROOT_DIR)
        return 0
    return _status(c)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
