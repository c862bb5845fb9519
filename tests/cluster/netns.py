"""Network namespaces that turn one machine into several Slurm nodes (tests/cluster/harness.py).

    net = Net.create(root, ["node1", "node2"])   # bridge + one namespace and veth pair per node
    net.node_cmd("node1", hosts, ["slurmd", "-D", "-N", "node1"])   # argv that runs inside the node
    net.link("node2", up=False)                 # cut a node off (network failure tests)
    teardown(root)                              # processes in the namespaces, namespaces, bridge

Each node is a network namespace (`ip netns add`) joined to a bridge in the root namespace by a
veth pair, with an address in a private /24 that no route of the machine uses yet. The root
namespace holds the bridge's address (the gateway), so slurmctld and the client commands (sbatch,
srun, salloc, mpirun) run from the machine's own shell. Node namespaces get no default route and
the harness neither enables forwarding nor NAT: traffic stays between these namespaces.

A node's processes are started with `nsenter --net` plus `unshare --uts --mount` (own hostname, its
own bind mount of the cluster's hosts file over /etc/hosts). Not `ip netns exec`: it remounts /sys
and hides /sys/fs/cgroup, without which slurmd does not start (ENV-FACTS.md). The mounts live in
the node's private mount namespace and end with its last process.

Every name (bridge, namespaces, veths) is derived from the cluster's root directory, so two
clusters can run side by side and `teardown` finds what an interrupted start left behind.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SUBNETS = [f"10.{a}.{b}" for a in (213, 214, 215) for b in range(256)]  # /24 candidates
NODE_HOST0 = 11  # node i (0-based) is SUBNET.(11 + i); the gateway (root namespace) is SUBNET.1


def tag(root: Path) -> str:
    """6 hex digits that name this cluster's interfaces and namespaces (IFNAMSIZ is 15 bytes)."""
    return hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:6]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the machine has an address or a route in."""
    nets = []
    for line in _ip("-4", "-o", "addr", "show").stdout.splitlines():
        nets.append(ipaddress.ip_interface(line.split()[3]).network)
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("local", "broadcast", "unreachable", "prohibit", "blackhole", "throw"):
            first = line.split()[1]
        if first != "default":
            try:
                nets.append(ipaddress.ip_network(first, strict=False))
            except ValueError:
                pass
    return nets


def _free_subnet(start: int) -> str:
    used = _used_networks()
    for k in range(len(SUBNETS)):
        prefix = SUBNETS[(start + k) % len(SUBNETS)]
        net = ipaddress.ip_network(f"{prefix}.0/24")
        if not any(net.overlaps(u) for u in used):
            return prefix
    raise RuntimeError("no free private /24 for the test cluster's bridge")


@dataclass
class Net:
    root: str
    tag: str
    subnet: str  # "10.213.7": the cluster's /24
    nodes: list[str]

    # --- names and addresses ----------------------------------------------------------------------
    @property
    def bridge(self) -> str:
        return f"hpcbr{self.tag}"

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    def netns(self, node: str) -> str:
        return f"hpc{self.tag}-{node}"

    def veth(self, node: str) -> str:
        return f"hpv{self.tag}{self.nodes.index(node)}"

    def addr(self, node: str) -> str:
        return f"{self.subnet}.{NODE_HOST0 + self.nodes.index(node)}"

    def hosts_text(self, controller: str) -> str:
        """/etc/hosts of every node: each node and the controller (the root namespace) by name."""
        rows = ["127.0.0.1 localhost", f"{self.gateway} {controller}"]
        rows += [f"{self.addr(n)} {n}" for n in self.nodes]
        return "\n".join(rows) + "\n"

    # --- lifetime ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, nodes: list[str]) -> Net:
        """Bridge + namespaces + veths. Writes root/net.json first: teardown needs no more than the
        root's tag, but `status` reports the subnet."""
        t = tag(root)
        net = cls(str(root), t, _free_subnet(int(t, 16)), list(nodes))
        (Path(root) / "net.json").write_text(json.dumps(asdict(net)))
        _ip("link", "add", net.bridge, "type", "bridge")
        _ip("addr", "add", f"{net.gateway}/24", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        for node in nodes:
            ns, veth = net.netns(node), net.veth(node)
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", net.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{net.addr(node)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return net

    def node_cmd(self, node: str, hosts: Path, argv: list[str]) -> list[str]:
        """argv run inside `node`: its network namespace, its own UTS namespace (hostname = node) and
        mount namespace (hosts bind-mounted over /etc/hosts). exec all the way down: the PID is argv's."""
        script = 'set -e; hostname "$0"; mount --bind "$1" /etc/hosts; shift; exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.netns(node)}", "unshare", "--uts", "--mount",
                "--propagation", "private", "sh", "-c", script, node, str(hosts), *argv]

    def link(self, node: str, up: bool) -> None:
        """Take a node's link (its veth on the bridge) down or bring it back up."""
        _ip("link", "set", self.veth(node), "up" if up else "down")


def load(root: Path) -> Net | None:
    try:
        return Net(**json.loads((Path(root) / "net.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _pids_in(ns: str) -> list[int]:
    r = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def teardown(root: Path, grace: float = 10) -> list[str]:
    """Remove what Net.create made for `root` (found by its tag, so also after an interrupted start):
    end the processes left in its namespaces (job steps, a slurmd whose pid file was never written:
    TERM, then KILL), delete the namespaces (their veth pairs go with them), then the bridge.
    Returns the names removed."""
    t = tag(root)
    ours = [ln.split()[0] for ln in _ip("netns", "list", check=False).stdout.splitlines()
            if ln.split() and ln.split()[0].startswith(f"hpc{t}-")]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for ns in ours for p in _pids_in(ns)]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5)
        while pids and time.monotonic() < deadline and any(_pids_in(ns) for ns in ours):
            time.sleep(0.2)
    removed = []
    for ns in ours:
        _ip("netns", "del", ns, check=False)
        removed.append(ns)
    links = _ip("-o", "link", "show", check=False).stdout
    for name in (f"hpcbr{t}", *(f"hpv{t}{i}" for i in range(64))):
        if f": {name}:" in links or f": {name}@" in links:
            _ip("link", "del", name, check=False)
            removed.append(name)
    (Path(root) / "net.json").unlink(missing_ok=True)
    return removed
