"""The one device resolver: a config's or a command line's `auto | cpu | cuda` -> torch.device.

Training (hpc.distributed.dist.init), the loader's default, `hpc predict`, `hpc evaluate` and
`hpc demo` all resolve through it, so every rank of every verb lands on the same kind of device.
"""
from __future__ import annotations

import os

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
