"""torch backend: persistent DataLoader workers read planned batches -> pinned memory -> device.

Batches are addressed as ``(epoch, j)``: each worker computes an epoch's plan itself from the
picklable ``planner`` (a pure function of the epoch, hpc.data.index.plan_epoch), so the workers
start once per loader and live across epochs (``persistent_workers``) instead of being forked
again every epoch. DataLoader hands positions to its workers round-robin, so with
``workers == lanes`` each worker reads exactly one lane (its own runs), also from a resumed
position. The reader sends every slice of a batch once (``window`` indexes them); the context
stacks are built on the device (hpc.data.transform).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hpc.data.reader import BatchReader

Planner = Callable[..., list[np.ndarray]]  # planner(epoch=e) -> the epoch's batches


class EpochBatches(Dataset):
    def __init__(self, reader: BatchReader, planner: Planner, stride: int):
        self.reader, self.planner, self.stride = reader, planner, stride
        self._epoch: int | None = None

    def __len__(self) -> int:  # positions come from the sampler; DataLoader only asks for warnings
        return 0

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, j = key
        if epoch != self._epoch:  # this process's first batch of the epoch
            self.reader.set_plan(self.planner(epoch=epoch), stride=self.stride)
            self._epoch = epoch
        return {k: torch.from_numpy(np.asarray(v)) for k, v in self.reader.read(j, stacked=False).items()}


class _Positions(Sampler):
    """(epoch, j) for j in [start, stop): set before each pass, read by the DataLoader's iterator."""

    def __init__(self):
        self.epoch = self.start = self.stop = 0

    def __iter__(self):
        return iter([(self.epoch, j) for j in range(self.start, self.stop)])

    def __len__(self) -> int:
        return self.stop - self.start


class TorchBatches:
    """One DataLoader for the loader's lifetime; ``__call__(epoch, start, stop)`` is one pass."""

    def __init__(self, reader: BatchReader, planner: Planner, workers: int, device: torch.device):
        self.device, self.sampler = device, _Positions()
        self.dataset = EpochBatches(reader, planner, max(1, workers))
        self.loader = DataLoader(self.dataset, batch_size=None, sampler=self.sampler, num_workers=workers,
                                 pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                                 persistent_workers=workers > 0)

    def __call__(self, epoch: int, start: int, stop: int) -> Iterator[dict[str, torch.Tensor]]:
        self.sampler.epoch, self.sampler.start, self.sampler.stop = epoch, start, stop
        for raw in self.loader:
            # `bytes` stays on the host: reading it back from the GPU would sync every batch.
            yield {k: v if k == "bytes" else v.to(self.device, non_blocking=True) for k, v in raw.items()}
