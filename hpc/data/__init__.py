"""The loader: converted dataset (shard format v1) -> corrupted, augmented, normalized, padded
batches on the device, for one process or any rank of a DDP job (docs/ARCHITECTURE.md).

    loader = build_loader(cfg, "train", rank, world, device)
    for batch in loader: batch.input, batch.target, batch.mask, batch.index, batch.norm, batch.pad
"""
from hpc.data.loader import Loader, build_loader
from hpc.data.transform import Batch

__all__ = ["Batch", "Loader", "build_loader"]
