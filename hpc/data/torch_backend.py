"""torch backend: DataLoader workers read planned batches -> pinned memory -> non-blocking copy.

The planned batches are a map-style dataset indexed by batch position. DataLoader hands positions
to its workers round-robin, so with ``workers == lanes`` each worker reads exactly one lane (its
own runs) and a resumed epoch (positions from ``start``) keeps that property.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hpc.data.reader import BatchReader


class PlannedBatches(Dataset):
    def __init__(self, reader: BatchReader, size: int):
        self.reader, self.size = reader, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.asarray(v)) for k, v in self.reader.read(j).items()}


def torch_batches(reader: BatchReader, plan: list[np.ndarray], start: int, workers: int,
                  device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Batches ``start..len(plan)-1`` of ``plan`` as dicts of tensors on ``device``."""
    reader.set_plan(plan, stride=max(1, workers))
    loader = DataLoader(PlannedBatches(reader, len(plan)), batch_size=None,
                        sampler=range(start, len(plan)), num_workers=workers,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                        persistent_workers=False)
    for raw in loader:
        # `bytes` stays on the host: reading it back from the GPU would sync every batch.
        yield {k: v if k == "bytes" else v.to(device, non_blocking=True) for k, v in raw.items()}
