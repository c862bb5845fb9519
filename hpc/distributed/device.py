"""The one device resolver: a config's or a command line's `auto | cpu | cuda` -> torch.device.

Training (hpc.distributed.dist.init), the loader's default, `hpc predict`, `hpc evaluate` and
`hpc demo` all resolve through it, so every rank of every verb lands on the same kind of device.
"""
from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

import torch

from hpc.config import Device, choices
from hpc.errors import ConfigError

DEVICES = choices(Device)  # auto | cpu | cuda: hpc.config validates data.device, argparse --device


def resolve_device(name: str = "auto", local_rank: int | None = None, what: str = "data.device") -> torch.device:
    """``auto`` -> cuda:<local rank> when a GPU is visible, else cpu. A CUDA device becomes the
    process's current one (NCCL and cuDNN work on the current device). ``local_rank`` defaults to
    LOCAL_RANK (0 alone); ``what`` names the setting in errors (``--device`` for the CLIs)."""
    if name not in DEVICES:  # a caller's bug: configs and command lines are checked before this
        raise ValueError(f"resolve_device: {name!r} is not one of {', '.join(DEVICES)}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{what}=cuda but no CUDA device is visible")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK") or 0)
    dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    return dev


def device_memory(device: torch.device) -> int | None:
    """Bytes this process can ever have on ``device`` (None: unknown): a GPU's total memory; on the
    CPU the physical memory, lowered by a cgroup (Slurm, containers) or address-space limit."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type != "cpu":
        return None
    limits = []
    with contextlib.suppress(OSError, ValueError):
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    with contextlib.suppress(OSError, ValueError):
        limits.append(int(Path("/sys/fs/cgroup/memory.max").read_text().strip()))  # "max": no limit
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    return min(limits) if limits else None
