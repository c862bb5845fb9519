"""Slurm host lists: "gpu[01-03,07],cpu5" -> gpu01 gpu02 gpu03 gpu07 cpu5.

    hostnames("dgx[01-02]-ib")     # ['dgx01-ib', 'dgx02-ib']   (scontrol when it can, else the parser)
    first_host(os.environ["SLURM_JOB_NODELIST"])
    expand_nodelist("rack[1-2]-n[01-02]")   # the parser alone, always

The parser follows `scontrol show hostnames` where Slurm accepts a list: hosts separated by commas
or white space; any number of bracket groups per host, each a comma-separated list of `N` or `LO-HI`
ranges, expanded left group outermost; the width of LO sets the zero padding (`a[01-3]` -> a01 a02
a03, `a[9-010]` -> a9 a10). It also accepts text after the last group (`dgx[01-02]-ib`), which
Slurm 22.05 refuses and InfiniBand host names use. Descending or non-numeric ranges, empty entries
and unbalanced brackets are errors naming the list. Hosts are produced lazily, so a list of
`node[0-99999]` costs nothing when only the first host is needed.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator

from hpc.errors import ConfigError

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
Piece = str | list[tuple[int, int, int]]  # literal text, or the ranges (lo, hi, width) of one bracket group


def _hosts_patterns(nodelist: str, name: str) -> list[list[Piece]]:
    """Split at top-level commas / white space and parse each host pattern (all errors raised here)."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{name}={nodelist!r}: {why}")

    tokens, cur, depth = [], "", 0
    for ch in nodelist:
        if ch == "[":
            if depth:
                raise bad("nested '['")
            depth = 1
        elif ch == "]":
            if not depth:
                raise bad("']' without '['")
            depth = 0
        if not depth and (ch == "," or ch.isspace()):
            tokens.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise bad("'[' without ']'")
    tokens.append(cur)
    patterns = []
    for token in filter(None, tokens):
        pieces: list[Piece] = []
        for i, text in enumerate(re.split(r"\[([^\]]*)\]", token)):  # literal, group, literal, ...
            if i % 2 == 0:
                pieces.append(text)
                continue
            group = []
            for part in text.split(","):
                m = _RANGE.fullmatch(part)
                if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
                    raise bad(f"cannot parse range {part!r}")
                lo = m.group(1)
                group.append((int(lo), int(m.group(2) or lo), len(lo)))
            pieces.append(group)
        patterns.append(pieces)
    return patterns


def _expand(pieces: list[Piece], prefix: str = "") -> Iterator[str]:
    if not pieces:
        yield prefix
        return
    head, rest = pieces[0], pieces[1:]
    if isinstance(head, str):
        yield from _expand(rest, prefix + head)
        return
    for lo, hi, width in head:
        for n in range(lo, hi + 1):
            yield from _expand(rest, f"{prefix}{n:0{width}d}")


def iter_nodelist(nodelist: str, name: str = "SLURM_JOB_NODELIST") -> Iterator[str]:
    """The host names of a compressed list, in order (syntax checked before the first is produced)."""
    patterns = _hosts_patterns(nodelist, name)
    for pieces in patterns:
        yield from _expand(pieces)


def expand_nodelist(nodelist: str, name: str = "SLURM_JOB_NODELIST") -> list[str]:
    """All host names of a compressed list (the parser; ``name`` is what errors call the list)."""
    return list(iter_nodelist(nodelist, name))


def _scontrol(nodelist: str) -> list[str] | None:
    """`scontrol show hostnames` (needs only a readable slurm.conf), or None when it cannot say."""
    if not shutil.which("scontrol"):
        return None
    try:
        r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    hosts = r.stdout.split()
    return hosts if r.returncode == 0 and hosts else None  # a list Slurm refuses prints nothing


def hostnames(nodelist: str, name: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Slurm's own expansion when scontrol runs here, else the parser's (the same for every list
    Slurm accepts; tests/test_nodelist.py compares them)."""
    return _scontrol(nodelist) or expand_nodelist(nodelist, name)


def first_host(nodelist: str, name: str = "SLURM_JOB_NODELIST") -> str:
    """The first host of a list: where rank 0 runs under srun, so MASTER_ADDR."""
    hosts = _scontrol(nodelist)
    first = hosts[0] if hosts else next(iter_nodelist(nodelist, name), None)
    if not first:
        raise ConfigError(f"{name}={nodelist!r}: no host names")
    return first
