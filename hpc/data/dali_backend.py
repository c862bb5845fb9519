"""DALI backend: the same planned batches through a DALI pipeline.

DALI has no HDF5 reader, so batches enter through a parallel ``fn.external_source`` whose
callable (batch mode, ``BatchInfo``) reads planned batch ``start + iteration`` with the shared
``BatchReader`` in DALI's worker processes and raises ``StopIteration`` at the epoch's end. The
rank's share is fixed by the epoch plan (global rank, world size), which plays the role of a DALI
reader's ``shard_id`` / ``num_shards``. The radial mirror (t -> -t: bin i -> X - i, bin 0 of an
even X kept, as ``hpc.augment.mirror_bins``) runs in DALI (on the GPU when the pipeline has a
device): bin 0 appended after the last bin, ``fn.flip`` with per-sample flags drawn from the same
seeded generator as the torch backend, the first X bins kept; so both backends produce identical
batches; the remaining transforms (view rotation,
dead-block masks from geometry, binomial thinning: none of them a DALI operator) run batched in
torch on the device. ``device_id=None`` runs the pipeline on the CPU (tests, CPU nodes).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from hpc import augment as A
from hpc.config import Config
from hpc.data.reader import BatchReader
from hpc.data.transform import batch_generator


class _Source:
    """Picklable batch callable for DALI's worker processes."""

    def __init__(self, reader: BatchReader, plan: list[np.ndarray], start: int, names: list[str],
                 cfg: Config, epoch: int, train: bool):
        self.reader, self.plan, self.start, self.names = reader, plan, start, names
        self.aug, self.seed, self.epoch, self.train = cfg.augment, cfg.augment.seed, epoch, train

    def flips(self, j: int, b: int, views: int) -> np.ndarray:
        """The torch backend's flip draws for batch j (same generator, same order)."""
        if not (self.train and self.aug.enabled and self.aug.flip_bins):
            return np.zeros(b, np.int32)
        gen = batch_generator(self.seed, self.epoch, j, torch.device("cpu"))
        return A.draw_augment(self.aug, b, views, gen, torch.device("cpu")).flip.numpy().astype(np.int32)

    def __call__(self, info) -> tuple[list[np.ndarray], ...]:
        j = self.start + info.iteration
        if j >= len(self.plan):
            raise StopIteration
        raw = self.reader.read(j)
        b = len(raw["ids"])
        raw["flip"] = self.flips(j, b, raw["target"].shape[2])
        raw["bytes"] = np.array([raw["bytes"]] + [0] * (b - 1), np.int64)  # the batch's bytes in sample 0
        return tuple([np.ascontiguousarray(a) for a in raw[n]] for n in self.names)


def dali_batches(reader: BatchReader, plan: list[np.ndarray], start: int, cfg: Config, rank: int,
                 world: int, device: torch.device, train: bool,
                 epoch: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """(raw batch on ``device``, per-sample flip flags already applied) for batches start.. of plan."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    workers = max(1, cfg.data.workers)
    reader.set_plan(plan, stride=workers)
    names = ["target", "ids", "flip", "bytes"] + ["input"] * cfg.corrupt.paired + ["mask"] * cfg.corrupt.use_stored_mask
    names += list(reader.spec.aux)  # mult / randoms: mirrored with the data they belong to
    layouts = {n: "CHW" for n in ("target", "input", "mask", *reader.spec.aux)}
    gpu = device.type == "cuda"

    def mirror(node, flags, bins: int):
        """hpc.augment.flip_bins in DALI: flip (z = x + [bin 0]) and keep X bins maps i -> X - i for
        i >= 1 and keeps bin 0 (even X); an odd X is a plain flip."""
        if bins % 2:
            return fn.flip(node, horizontal=flags)
        wide = fn.cat(node, fn.slice(node, start=[0], shape=[1], axis_names="W"), axis_name="W")
        return fn.slice(fn.flip(wide, horizontal=flags), start=[0], shape=[bins], axis_names="W")

    bins = int(reader.index.ds.slice_shape[1])

    @pipeline_def(batch_size=cfg.data.batch_size, num_threads=2, py_num_workers=workers,
                  py_start_method="fork", device_id=(device.index or 0) if gpu else None,
                  seed=cfg.data.seed + 7919 * rank)
    def pipeline():
        outs = fn.external_source(source=_Source(reader, plan, start, names, cfg, epoch, train),
                                  num_outputs=len(names), parallel=True, batch=True, batch_info=True,
                                  layout=[layouts.get(n, "") for n in names])
        outs = dict(zip(names, outs, strict=True))
        for n in ("target", "input", "mask", *reader.spec.aux):
            if n in outs:
                node = outs[n].gpu() if gpu else outs[n]  # stored dtype over PCIe, float on the device
                outs[n] = mirror(fn.cast(node, dtype=types.FLOAT), outs["flip"], bins)  # masks: fractions
        return tuple(outs[n] for n in names)

    pipe = pipeline()
    it = DALIGenericIterator([pipe], output_map=names, last_batch_policy=LastBatchPolicy.PARTIAL,
                             auto_reset=False, prepare_first_batch=False)
    try:
        for (out,) in it:
            raw = {n: t if n == "bytes" else t.to(device, non_blocking=True) for n, t in out.items()}
            flipped = raw.pop("flip").bool()
            yield raw, flipped
    finally:
        del it, pipe  # stops DALI's worker processes before the next epoch forks new ones
