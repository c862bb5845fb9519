"""Slurm host lists (hpc.distributed.nodelist): the parser on the forms Slurm emits and the ones it
refuses, and the parser == `scontrol show hostnames` (real Slurm, only a config file: no daemon) on
every list Slurm accepts."""
from __future__ import annotations

import itertools
import shutil
import subprocess

import pytest

from hpc.distributed import nodelist as N
from hpc.errors import ConfigError

from helpers import require

CASES = [
    ("node7", ["node7"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[9-10],b2,c[008]", ["a9", "a10", "b2", "c008"]),
    ("dgx-[1-2]", ["dgx-1", "dgx-2"]),
    ("a[1-2,5],b-3", ["a1", "a2", "a5", "b-3"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),  # zero padding across a decade
    ("a[00-10]", [f"a{i:02d}" for i in range(11)]),
    ("a[01-3]", ["a01", "a02", "a03"]),  # the low end's width pads
    ("a[1-03]", ["a1", "a2", "a3"]),
    ("a[9-010]", ["a9", "a10"]),
    ("gpu[001-003,010]", ["gpu001", "gpu002", "gpu003", "gpu010"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("a[1-2]-[3-4]", ["a1-3", "a1-4", "a2-3", "a2-4"]),  # left group outermost
    ("a1[1-2]", ["a11", "a12"]),
    ("[1-2]", ["1", "2"]),
    ("a[1]", ["a1"]),
    ("a,b,c", ["a", "b", "c"]),
    ("a b", ["a", "b"]),  # white space separates too
    ("a[1-2],", ["a1", "a2"]),
    (",a", ["a"]),
    ("n1,n1", ["n1", "n1"]),  # duplicates kept, as Slurm keeps them
    ("A[1-2]", ["A1", "A2"]),
    ("", []),
]
# Slurm 22.05 refuses text after a bracket group unless another group follows; real InfiniBand
# host names look like this, so the parser accepts them.
SUFFIXES = [
    ("dgx[01-02]-ib", ["dgx01-ib", "dgx02-ib"]),
    ("n[1-3],m[01-02]-ib,z", ["n1", "n2", "n3", "m01-ib", "m02-ib", "z"]),
    ("dgx[01-02]-ib[1-2]", ["dgx01-ib1", "dgx01-ib2", "dgx02-ib1", "dgx02-ib2"]),
    ("x[9-11]y", ["x9y", "x10y", "x11y"]),
    ("node[1-2].cluster.org", ["node1.cluster.org", "node2.cluster.org"]),
]
BAD = ["n[a-b]", "a[5-3]", "x[1,,2]", "a[1-3:2]", "n[1-2", "n1-2]", "a[[1-2]]", "a[1-2 ]", "a[]", "a[-1]"]


@pytest.mark.parametrize("nodelist, hosts", CASES + SUFFIXES)
def test_expand(nodelist, hosts):
    assert N.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", BAD)
def test_bad_lists_are_one_line_naming_the_list(nodelist):
    with pytest.raises(ConfigError) as exc:
        N.expand_nodelist(nodelist, "SLURM_STEP_NODELIST")
    assert str(exc.value).startswith(f"SLURM_STEP_NODELIST={nodelist!r}: ") and "\n" not in str(exc.value)


def test_bad_range_is_named():
    with pytest.raises(ConfigError, match=r"SLURM_JOB_NODELIST='n\[a-b\]': cannot parse range 'a-b'"):
        N.expand_nodelist("n[a-b]")


def test_hosts_are_lazy_but_the_syntax_is_checked_first():
    """The first of a million hosts costs nothing; an error later in the list is still reported."""
    hosts = N.iter_nodelist("node[000000-999999],gpu[1-2]")
    assert list(itertools.islice(hosts, 3)) == ["node000000", "node000001", "node000002"]
    with pytest.raises(ConfigError, match="cannot parse range 'x'"):
        next(N.iter_nodelist("node[000000-999999],gpu[x]"))


def test_first_host_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin/nonexistent")
    assert N.first_host("dgx[01-02]-ib,x") == "dgx01-ib"
    assert N.hostnames("rack[1-2]-n[1]") == ["rack1-n1", "rack2-n1"]
    with pytest.raises(ConfigError, match="no host names"):
        N.first_host(",")


@pytest.fixture
def scontrol(tmp_path, monkeypatch) -> str:
    """`scontrol show hostnames` needs a slurm.conf to read, not a running controller."""
    path = shutil.which("scontrol")
    require("scontrol", path is not None, "apt-get install slurm-client")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=hostlist\nSlurmctldHost=localhost\nNodeName=localhost\n"
                    "PartitionName=p Nodes=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    return path


def slurm_hosts(scontrol: str, nodelist: str) -> list[str] | None:
    r = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.split() if not r.stderr else None  # None: Slurm refuses the list


def test_parser_equals_scontrol(scontrol):
    """Every list Slurm accepts expands the same way; the lists it refuses are the suffix forms the
    parser accepts on purpose, and the malformed ones the parser refuses too."""
    for nodelist, hosts in CASES:
        assert slurm_hosts(scontrol, nodelist) == hosts == N.expand_nodelist(nodelist), nodelist
        if hosts:
            assert N.hostnames(nodelist) == hosts and N.first_host(nodelist) == hosts[0]
    refused = [nl for nl, _ in SUFFIXES if slurm_hosts(scontrol, nl) is None]
    assert "dgx[01-02]-ib" in refused  # Slurm 22.05; a newer Slurm may accept it, with the same hosts
    for nodelist, hosts in SUFFIXES:
        assert N.hostnames(nodelist) == hosts and N.first_host(nodelist) == hosts[0]  # scontrol, else parser
        assert slurm_hosts(scontrol, nodelist) in (None, hosts)
    for nodelist in ("n[a-b]", "a[5-3]", "x[1,,2]", "a[1-3:2]", "a[1-2 ]"):
        assert slurm_hosts(scontrol, nodelist) is None, nodelist
