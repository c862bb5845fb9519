"""The real 2-node Slurm test cluster (tests/cluster/harness.py --nodes 2): each node has its own
hostname and address, resolves the other by name, has no route out of the cluster's subnet, and a
second cluster starts beside it and is removed completely by `stop`, also after its start was killed."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm
HARNESS = Path(__file__).parent / "cluster" / "harness.py"
sys.path.insert(0, str(HARNESS.parent))
import netns  # noqa: E402


def test_nodes_have_own_hostnames_addresses_and_resolve_each_other(slurm2):
    net = slurm2.net
    r = slurm2.srun(["-N2", "--ntasks-per-node=1", "bash", "-c",
                     "echo $SLURM_PROCID $(hostname) $(hostname -i) $(getent hosts node1 node2 | awk '{print $1}')"],
                    env=slurm2.env)
    assert r.returncode == 0, r.stderr
    rows = sorted(r.stdout.split("\n")[:2])
    a1, a2 = net.addr("node1"), net.addr("node2")
    assert [row.split() for row in rows] == [["0", "node1", a1, a1, a2], ["1", "node2", a2, a1, a2]]


def test_nodes_reach_only_the_cluster_subnet(slurm2):
    """No default route and no forwarding: a node cannot address anything outside the bridge."""
    r = slurm2.srun(["-N1", "-w", "node2", "bash", "-c", "ip -4 route; ip route get 192.0.2.1 2>&1 || true"],
                    env=slurm2.env)
    assert r.returncode == 0, r.stderr
    routes = [ln for ln in r.stdout.splitlines() if ln and not ln.startswith(("RTNETLINK", "Error"))]
    assert routes == [f"{slurm2.net.subnet}.0/24 dev eth0 proto kernel scope link src {slurm2.net.addr('node2')} "]
    assert "unreachable" in r.stdout


def _leftovers(root: Path, pids: list[int]) -> list[str]:
    t = netns.tag(root)
    left = [ln for ln in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
            if ln.startswith(f"hpc{t}-")]
    left += [ln for ln in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines()
             if f"hpcbr{t}" in ln or f"hpv{t}" in ln]
    left += [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if f"/run/netns/hpc{t}-" in ln]
    left += [f"pid {p}" for p in pids if Path(f"/proc/{p}").exists()
             and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    return left


@pytest.mark.slow
def test_second_cluster_beside_and_stop_after_an_interrupted_start_leaves_nothing(slurm2):
    """A start killed once both slurmds run (no state.json yet, or just written): `stop` ends every
    daemon by its pid file and removes the namespaces, veths, bridge and mounts; the session's
    2-node cluster beside it keeps running."""
    root = Path(tempfile.mkdtemp(prefix="hpc-mn-", dir="/tmp"))  # short: unix socket paths
    env = {**os.environ, "HPC_SLURM_DIR": str(root)}
    proc = subprocess.Popen([sys.executable, str(HARNESS), "start", "--nodes", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (root / "run" / "slurmd-node2.pid").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "second cluster: slurmd never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        pids = [int(f.read_text().split()[0]) for f in (root / "run").glob("*.pid") if f.read_text().strip()]
        assert len(pids) >= 5 and _leftovers(root, []), "the killed start made nothing to clean up"
        assert slurm2.alive() and slurm2.net.subnet != netns.load(root).subnet
        r = subprocess.run([sys.executable, str(HARNESS), "stop"], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert _leftovers(root, pids) == []
        assert slurm2.alive()
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run([sys.executable, str(HARNESS), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
        Path(str(root) + ".lock").unlink(missing_ok=True)


def test_a_node_link_goes_down_and_up(slurm2):
    """Cluster.link(): what the network-failure tests use. Down: node1 cannot reach node2."""
    port = slurm2.ports["slurmd"]
    probe = ["-N1", "-w", "node1", "bash", "-c", f"timeout 3 bash -c '</dev/tcp/node2/{port}' && echo open"]
    assert slurm2.srun(probe, env=slurm2.env).stdout.strip() == "open"
    slurm2.link("node2", up=False)
    try:
        r = slurm2.srun(probe, env=slurm2.env, timeout=60)
        assert "open" not in r.stdout
    finally:
        slurm2.link("node2", up=True)
    assert slurm2.srun(probe, env=slurm2.env).stdout.strip() == "open"
