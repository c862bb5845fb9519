"""Node-local staging (``data.stage_to``): copy the shards a split needs to a fast local disk
(DGX ``/raid``, ``$TMPDIR``) before the first epoch, as DGX users do by hand.

Each shard is copied to a temporary sibling, its datasets' SHA-256 are re-computed and compared
with the manifest's, and only then is it renamed into place; a copy already there whose recorded
checksums match the manifest is kept. Ranks of one node may stage concurrently: every rename
installs identical, verified content.

    local = stage_to("/lustre/data/demo", "/raid/me", studies=["p01", "p02"])   # -> /raid/me/demo
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py

from hpc.errors import InputError
from hpc.io.atomic import atomic_path
from hpc.io.shards import Dataset, ShardInfo, verify_shard


def _recorded(path: Path) -> dict[str, str]:
    with h5py.File(path, "r") as f:
        return {name: str(d.attrs.get("sha256", "")) for name, d in f.items()}


def _copy_verified(shard: ShardInfo, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(shard.path, tmp)
        ok, why = verify_shard(tmp)
        if ok and _recorded(tmp) != shard.sha256:
            ok, why = False, "checksums differ from manifest.json"
        if not ok:
            raise InputError(f"{shard.path}: not staged: {why}")


def stage_to(root: str | os.PathLike, dest: str | os.PathLike, studies: list[str] | None = None) -> Path:
    """Copy ``root``'s manifest and the shards of ``studies`` (all when None) to
    ``dest/<dataset name>``; returns that directory."""
    ds = Dataset.open(root)
    out = Path(dest) / ds.root.resolve().name
    for study in ds.studies:
        if studies is not None and study.id not in studies:
            continue
        for shard in study.shards:
            local = out / shard.path.relative_to(ds.root)
            if local.is_file() and local.stat().st_size == shard.path.stat().st_size \
                    and _recorded(local) == shard.sha256:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            _copy_verified(shard, local)
    with atomic_path(out / "manifest.json") as tmp:
        shutil.copyfile(ds.root / "manifest.json", tmp)
    return out
