"""DALI backend: the same planned batches through a DALI pipeline.

DALI has no HDF5 reader, so batches enter through a parallel ``fn.external_source`` whose
callable (batch mode, ``BatchInfo``) reads planned batches with the shared ``BatchReader`` in a DALI
worker process and raises ``StopIteration`` at the end of its lane. One single-worker pipeline per
reader lane (``data.workers`` of them): DALI hands a pipeline's tasks to whichever of its workers is
free (one shared queue), so W workers in one pipeline each read the runs of every lane (the I/O
amplification was ~W: 4.40 with 4 workers), while a pipeline per lane keeps each run in the one
process that reads it; batch j comes from pipeline j mod W, in order. The
rank's share is fixed by the epoch plan (global rank, world size), which plays the role of a DALI
reader's ``shard_id`` / ``num_shards``. The radial mirror (t -> -t: bin i -> X - i, bin 0 of an
even X kept, as ``hpc.data.preprocess.mirror_bins``) runs in DALI (on the GPU when the pipeline has a
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

from hpc.config import Config
from hpc.data import augment as A
from hpc.data.reader import BatchReader
from hpc.data.transform import batch_generator


class _Source:
    """Picklable batch callable for DALI's (spawned) worker processes. A pipeline serves consecutive
    passes: DALI's ``epoch_idx`` counts them, pass p is epoch ``epoch + p`` (from ``start`` for the
    first), and each worker computes an epoch's plan itself from the picklable ``planner``."""

    def __init__(self, reader: BatchReader, planner, epoch: int, start: int, names: list[str], cfg: Config,
                 train: bool, lane: int, lanes: int):
        self.reader, self.planner, self.epoch0, self.start, self.names = reader, planner, epoch, start, names
        self.aug, self.seed, self.train, self.lane, self.lanes = cfg.augment, cfg.augment.seed, train, lane, lanes
        self._epoch, self._plan = None, []

    def batch(self, epoch_idx: int, iteration: int) -> int:
        """The planned batch of this lane's ``iteration``-th call in pass ``epoch_idx``: batches
        lane, lane + lanes, ... (from ``start`` on in the first pass)."""
        first = self.start if epoch_idx == 0 else 0
        return first + (self.lane - first) % self.lanes + iteration * self.lanes

    def flips(self, epoch: int, j: int, b: int, views: int) -> np.ndarray:
        """The torch backend's flip draws for batch j (same generator, same order)."""
        if not (self.train and self.aug.enabled and self.aug.flip_bins):
            return np.zeros(b, np.int32)
        gen = batch_generator(self.seed, epoch, j, torch.device("cpu"))
        return A.draw_augment(self.aug, b, views, gen, torch.device("cpu")).flip.numpy().astype(np.int32)

    def __call__(self, info) -> tuple[list[np.ndarray], ...]:
        epoch = self.epoch0 + info.epoch_idx
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self.planner(epoch=epoch)
            self.reader.set_plan(self._plan, stride=self.lanes)
        j = self.batch(info.epoch_idx, info.iteration)
        if j >= len(self._plan):
            raise StopIteration
        raw = self.reader.read(j)
        b = len(raw["ids"])
        raw["flip"] = self.flips(epoch, j, b, raw["target"].shape[2])
        raw["bytes"] = np.array([raw["bytes"]] + [0] * (b - 1), np.int64)  # the batch's bytes in sample 0
        return tuple([np.ascontiguousarray(a) for a in raw[n]] for n in self.names)


def _mirror(fn, node, flags, bins: int):
    """hpc.data.augment.flip_bins in DALI: flip (z = x + [bin 0]) and keep X bins maps i -> X - i for
    i >= 1 and keeps bin 0 (even X); an odd X is a plain flip."""
    if bins % 2:
        return fn.flip(node, horizontal=flags)
    wide = fn.cat(node, fn.slice(node, start=[0], shape=[1], axis_names="W"), axis_name="W")
    return fn.slice(fn.flip(wide, horizontal=flags), start=[0], shape=[bins], axis_names="W")


class DaliBatches:
    """One DALI pipeline per reader lane (see the module doc), kept for consecutive passes of a loader
    (built again only when a pass does not continue the previous one: a resumed position, or a pass
    left early).

    - Workers are spawned, not forked: by the time the loader runs, the trainer has initialised CUDA,
      and DALI refuses to fork a process that has.
    - ``prefetch_queue_depth`` 2 per pipeline: its worker reads the lane's next batch while this
      process consumes one (DALI's default of 1 kept one batch in flight in total).
    """

    def __init__(self, reader: BatchReader, planner, cfg: Config, rank: int, device: torch.device, train: bool,
                 lanes: int):
        self.reader, self.planner, self.cfg, self.rank, self.device, self.train, self.lanes = \
            reader, planner, cfg, rank, device, train, lanes
        self.its: list | None = None  # one DALIGenericIterator per lane
        self.next: tuple[int, int] | None = None  # the (epoch, start) these pipelines serve next
        self.names = ["target", "ids", "flip", "bytes"] + ["input"] * cfg.corrupt.paired + \
            ["mask"] * cfg.corrupt.use_stored_mask
        self.names += list(reader.spec.aux)  # mult / randoms: mirrored with the data they belong to

    def _pipeline(self, source: _Source):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        cfg, names, gpu = self.cfg, self.names, self.device.type == "cuda"
        data = ("target", "input", "mask", *self.reader.spec.aux)
        layouts = {n: "CHW" for n in data}
        bins = int(self.reader.index.ds.slice_shape[1])

        @pipeline_def(batch_size=cfg.data.batch_size, num_threads=2, py_num_workers=1,
                      py_start_method="spawn", device_id=(self.device.index or 0) if gpu else None,
                      seed=cfg.data.seed + 7919 * self.rank)
        def pipeline():
            outs = fn.external_source(source=source, num_outputs=len(names), parallel=True, batch=True,
                                      batch_info=True, prefetch_queue_depth=2,
                                      layout=[layouts.get(n, "") for n in names])
            outs = dict(zip(names, outs, strict=True))
            for n in data:
                if n in outs:
                    node = outs[n].gpu() if gpu else outs[n]  # stored dtype over PCIe, float on the device
                    outs[n] = _mirror(fn, fn.cast(node, dtype=types.FLOAT), outs["flip"], bins)  # masks: fractions
            return tuple(outs[n] for n in names)

        pipe = pipeline()
        pipe.start_py_workers()  # spawned now, before this process touches DALI's GPU side
        return DALIGenericIterator([pipe], output_map=names, last_batch_policy=LastBatchPolicy.PARTIAL,
                                   auto_reset=False, prepare_first_batch=False)

    def _build(self, epoch: int, start: int) -> None:
        self.close()
        self.its = [self._pipeline(_Source(self.reader, self.planner, epoch, start, self.names, self.cfg,
                                           self.train, lane, self.lanes)) for lane in range(self.lanes)]

    def __call__(self, epoch: int, start: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """(raw batch on the device, per-sample flip flags already applied) for one pass."""
        if self.its is None or self.next != (epoch, start):
            self._build(epoch, start)
        else:
            for it in self.its:
                it.reset()
        self.next = None  # unless this pass runs to its end
        j = start
        while True:
            try:
                (out,) = next(self.its[j % self.lanes])  # batch j is lane j mod lanes'
            except StopIteration:
                break
            raw = {n: t if n == "bytes" else t.to(self.device, non_blocking=True) for n, t in out.items()}
            flipped = raw.pop("flip").bool()
            yield raw, flipped
            j += 1
        for k in range(1, self.lanes):  # the other lanes are past their ends too: let each see it
            extra = next(self.its[(j + k) % self.lanes], None)  # (next(), not iter(): DALI's iter() resets)
            if extra is not None:
                raise RuntimeError(f"DALI lane {(j + k) % self.lanes} has batches after batch {j} ended the pass")
        self.next = (epoch + 1, 0)

    def close(self) -> None:
        self.its = None  # DALI stops the pipelines' worker processes with them
