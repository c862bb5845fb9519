"""YAML from users (configs, sweep files, override values), read with bounds.

``yaml.safe_load`` never runs code, but a "billion laughs" file (nine anchors, each a list of nine
aliases of the previous) loads in microseconds into a few shared lists that *expand* to 9**9
values: any later walk, copy or repr of it (an error message naming the value) takes minutes and
gigabytes. Here the text is bounded (a regular file of at most 1 MiB) and the loaded tree is
walked once with a budget of values, counting every path through shared (aliased) nodes.

    tree = read_yaml_file(path, "config", ConfigError)      # or load_yaml(text, where, ConfigError)
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from hpc.errors import HpcError, InputError
from hpc.io.interfile import read_bounded

MAX_BYTES = 1 << 20
MAX_VALUES = 100_000  # a config has a few hundred; a sweep grid a few thousand


def _expands_beyond(tree, budget: int) -> bool:
    """True when walking ``tree`` (aliases followed every time they occur) visits more than ``budget`` values."""
    stack, seen = [tree], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > budget:
            return True
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return False


def load_yaml(text: str, where: str, error: type[HpcError] = InputError, parse: Callable = yaml.safe_load):
    """The YAML tree of ``text`` (``parse``: yaml.safe_load or a SafeLoader variant); ``error`` (one
    line naming ``where``) when it is invalid or too big."""
    if len(text) > MAX_BYTES:
        raise error(f"{where}: {len(text)} bytes of YAML is more than the {MAX_BYTES} accepted")
    try:
        tree = parse(text)
    except yaml.YAMLError as exc:
        raise error(f"{where}: invalid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise error(f"{where}: YAML nested too deeply") from None
    if _expands_beyond(tree, MAX_VALUES):
        raise error(f"{where}: YAML expands to more than {MAX_VALUES} values (nested anchors/aliases?); refused")
    return tree


def read_yaml_file(path: str | Path, what: str, error: type[HpcError] = InputError,
                   parse: Callable = yaml.safe_load):
    """A YAML file's tree: a regular file of bounded size (not a FIFO or /dev/zero), then load_yaml."""

    p = Path(path)
    try:
        raw = read_bounded(p, what, MAX_BYTES)
    except InputError as exc:
        raise error(str(exc)) from None
    return load_yaml(raw.decode("utf-8", errors="replace"), str(p), error, parse)
