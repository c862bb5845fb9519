"""The package's shape: no import cycles (between modules or between sub-packages), internal imports
at module top unless a comment says why, and docs/ARCHITECTURE.md's map names every module."""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from helpers import ROOT

PKG = ROOT / "hpc"


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, ast.stmt, bool]]:
    """(imported hpc module, statement, at module top) for every import of an hpc module in ``path``."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hpc") and not node.level:
            for a in node.names:  # `from hpc.physics import geometry` imports the module hpc.physics.geometry
                sub = f"{node.module}.{a.name}"
                out.append((sub if sub in known else node.module, node, id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, node, id(node) in top) for a in node.names if a.name.startswith("hpc")]
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        for target, _, _ in imports(path, known):
            if target != "hpc" and target != name:
                edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def package(module: str) -> str:
    """The room a module lives in: hpc.train.losses -> train; hpc.cli -> cli."""
    return module.split(".")[1] if "." in module else module


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    assert cycles(graph()) == []


def test_no_import_cycle_between_sub_packages():
    """The sub-packages form layers (physics below io below config ... below evaluate): a stage may
    use an earlier one, never a later one."""
    rooms: dict[str, set[str]] = defaultdict(set)
    for a, targets in graph().items():
        for b in targets:
            if package(a) != package(b):
                rooms[package(a)].add(package(b))
    assert cycles(rooms) == []


def test_internal_imports_inside_functions_say_why():
    """An hpc import below module level (deferring torch, h5py, DALI ...) carries a comment saying why."""
    known, bad = modules(), []
    for path in known.values():
        lines = path.read_text().splitlines()
        for _, node, top in imports(path, known):
            if not top and "#" not in lines[node.lineno - 1]:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert bad == []


def test_architecture_map_names_every_module():
    """docs/ARCHITECTURE.md's map lists every module file of the package and nothing that is gone."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("```", 2)[1]  # the first code block: the map
    listed, folder = set(), ""
    for line in block.splitlines():  # "  name.py  text", "  room/  text", "    name.py, other.py  text"
        m = re.match(r"^  ( *)([\w/]+\.py|[\w]+/)((?:, [\w]+\.py)*)(\s|$)", line)
        if not m:
            continue
        nested, first = bool(m.group(1)), m.group(2)
        if first.endswith("/"):
            folder = first if not nested else folder
            continue
        names = [first] + [n.strip() for n in m.group(3).split(",") if n.strip()]
        listed.update(folder + n if nested else n for n in names)
    on_disk = {str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert sorted(on_disk - listed) == [], "modules missing from docs/ARCHITECTURE.md's map"
    assert sorted(n for n in listed - on_disk if n.endswith(".py")) == [], "the map names modules that are gone"


def test_the_demos_default_output_is_ignored_by_git():
    """`make demo` then `make test` in one clone: the demo's output (51 MB) must not count as part of
    the working tree, which the GPU check's rehearsal carries to the device (64 MiB per call)."""
    import argparse
    import subprocess

    from hpc import demo

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    out = p.parse_args([]).output
    r = subprocess.run(["git", "check-ignore", "-q", f"{out}/run/checkpoints/best.pt"], cwd=ROOT)
    assert r.returncode == 0, f"{out}/ is not in .gitignore"
