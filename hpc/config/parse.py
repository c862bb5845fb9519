"""Text -> typed config fields: YAML (true/false the only booleans) and ``section.key=value``
overrides applied to a tree of section dataclasses (hpc.config.Config), each value converted to its
field's type. Unknown sections or keys are errors that list the valid ones. Choices, ranges and
cross-field rules are not checked here: that is hpc.config.validate's job, run by every loader.

    apply_overrides(apply_dict(Config(), read_yaml(path, "config"), origin=path), ["optim.lr=3e-4"])
"""
from __future__ import annotations

import re
import typing
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from hpc.errors import ConfigError, HpcWarning
from hpc.io.yamlsafe import load_yaml, read_yaml_file

T = TypeVar("T")
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on"), ("false", "no", "off")


# ---------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false (any case) are booleans, so a
    string field given ``off``/``no`` keeps the word (YAML 1.1 would make it False)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def parse_yaml(text: str) -> Any:
    """YAML text -> Python values, with true/false as the only booleans (see ``_Loader``)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)


def read_yaml(path: str | Path, what: str, error: type[Exception] = ConfigError):
    """A YAML file's tree ({} when empty); ``error`` naming the file when it is missing, not a
    regular file, invalid, or too big (size and alias expansion bounded: hpc.io.yamlsafe)."""

    return read_yaml_file(path, what, error, parse_yaml) or {}


# ---------------------------------------------------------------- types
def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one parsed YAML value against a dataclass field type (choices and ranges are
    ``validate``'s job)."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, key_tp, where): _coerce(v, item_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str or origin is Literal:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported field type {tp}")  # pragma: no cover


def field_types(section_cls: type) -> dict[str, Any]:
    """{field name: resolved type} of a dataclass (a config section)."""
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in fields(section_cls)}


def _is_text(tp: Any) -> bool:
    return tp is str or typing.get_origin(tp) is Literal


def _sections(cfg: Any) -> list[str]:
    return [f.name for f in fields(cfg)]


def _set(cfg: Any, section: str, key: str, value: Any, origin: str) -> None:
    if section not in _sections(cfg):
        raise ConfigError(f"{origin}: unknown section {section!r}; valid sections: {', '.join(_sections(cfg))}")
    sec = getattr(cfg, section)
    types = field_types(type(sec))
    extra = getattr(type(sec), "EXTRA", None)  # a dict field that takes the section's other keys
    if key not in types and extra:
        item_tp = typing.get_args(types[extra])[1]
        getattr(sec, extra)[key] = _coerce(value, item_tp, f"{origin}: {section}.{key}")
        return
    if key not in types:
        raise ConfigError(
            f"{origin}: unknown key {section}.{key}; valid keys: {', '.join(sorted(types))}"
        )
    setattr(sec, key, _coerce(value, types[key], f"{origin}: {section}.{key}"))


def apply_dict(cfg: T, tree: dict, origin: str = "config", lenient: bool = False) -> T:
    """Set every ``section: {key: value}`` of ``tree``. ``lenient`` (configs stored by older code):
    sections and keys that no longer exist are skipped with an ``HpcWarning`` instead of an error."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {type(tree).__name__}")
    for section, values in tree.items():
        if section not in _sections(cfg):
            if lenient:
                warnings.warn(f"{origin}: section {section!r} no longer exists; ignored", HpcWarning, stacklevel=2)
                continue
            raise ConfigError(f"{origin}: unknown section {section!r}; valid sections: {', '.join(_sections(cfg))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping")
        sec_type = type(getattr(cfg, section))
        known = field_types(sec_type)
        for key, value in values.items():
            if lenient and key not in known and not getattr(sec_type, "EXTRA", None):
                warnings.warn(f"{origin}: key {section}.{key} no longer exists; ignored", HpcWarning, stacklevel=2)
                continue
            _set(cfg, section, key, value, origin)
    return cfg


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Set every ``section.key=value`` (the value parsed as a YAML scalar or list)."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected section.key=value (e.g. optim.lr=3e-4)")
        dotted, raw = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)

        value = load_yaml(raw, f"override {item[:80]!r}", ConfigError, parse_yaml) if raw.strip() else ""
        sec = getattr(cfg, section, None)
        tp = field_types(type(sec)).get(key) if section in _sections(cfg) else None
        if _is_text(tp) and isinstance(value, (bool, int, float)):
            value = raw.strip()  # a string field keeps the text as typed: log.name=1.10 is "1.10", not "1.1"
        _set(cfg, section, key, value, f"override {item!r}")
    return cfg
