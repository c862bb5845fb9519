"""The package's extension points: one registry each, name -> entry.

    SCANNERS   hpc.physics.geometry   scanner presets (STIR's): `corrupt.scanner`, `hpc simulate --scanner`
    MODELS     hpc.train.models       networks: `model.name`
    LOSSES     hpc.train.losses       loss terms: `loss.<name>=<weight>`
    FILLS      hpc.data.fills         what the network sees in the gaps: `data.fill`
    BASELINES  hpc.baselines.*       repairs without learning: validation's and `hpc evaluate`'s methods
    DENOISERS  hpc.baselines.denoise low-dose denoising without learning: `hpc evaluate --task denoise`

An entry is added where it is implemented, in the registry's home module, with a decorator:

    @MODELS.register("unet", multiple=...)
    def unet(cfg: ModelConfig) -> nn.Module: ...

and everything that lists or checks names (hpc.config.validate, `--help` texts, validation, evaluation)
asks the registry, so adding an entry touches one file. A registry imports its home module the first
time it is asked for names (a plugin lookup, not an import of this module: the config stays
importable without torch, and the homes may import the config without a cycle).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered name -> entry map with metadata per entry (``meta(name)``), filled by its home module."""

    def __init__(self, kind: str, *homes: str):
        self.kind, self.homes = kind, homes
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def _load(self) -> None:
        for home in self.homes:  # registers the built-in entries (idempotent)
            importlib.import_module(home)

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name", key=value, ...)``; a name is registered once."""
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{self.kind} name {name!r}: letters, digits, '_' and '-' only")

        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name], self._meta[name] = entry, dict(meta)
            return entry
        return add

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that add a toy entry take it out again)."""
        self._entries.pop(name, None)
        self._meta.pop(name, None)

    def names(self) -> tuple[str, ...]:
        """Registration order, or the entries' ``order`` metadata where given (lowest first)."""
        self._load()
        index = {n: i for i, n in enumerate(self._entries)}
        return tuple(sorted(self._entries, key=lambda n: (self._meta[n].get("order", 1000), index[n])))

    def get(self, name: str, *default: T) -> T:
        """The entry, or a ValueError naming the valid ones (or ``default`` when given, like dict.get)."""
        self._load()
        if name not in self._entries and default:
            return default[0]
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of {' | '.join(self.names())}")
        return self._entries[name]

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    # mapping access: REG[name], REG[name] = entry (no metadata), del REG[name] (tests' monkeypatch.setitem)
    def __getitem__(self, name: str) -> T:
        self._load()
        return self._entries[name]

    def __setitem__(self, name: str, entry: T) -> None:
        self.unregister(name)
        self.register(name)(entry)

    def __delitem__(self, name: str) -> None:
        self.unregister(name)

    def values(self) -> list[T]:
        return [self._entries[n] for n in self.names()]

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._entries[n]) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"


SCANNERS: Registry = Registry("scanner", "hpc.physics.geometry")
MODELS: Registry = Registry("model", "hpc.train.models")
LOSSES: Registry = Registry("loss term", "hpc.train.losses")
FILLS: Registry = Registry("gap fill", "hpc.data.fills")
BASELINES: Registry = Registry("baseline", "hpc.baselines.interp", "hpc.baselines.reproject",
                               "hpc.baselines.reproject3d")
DENOISERS: Registry = Registry("denoiser", "hpc.baselines.denoise")
