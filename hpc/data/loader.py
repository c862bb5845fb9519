"""``Loader``: one rank's view of a split, iterated as ``Batch``es on the device.

    loader = build_loader(cfg, "train", rank, world, device)
    loader.load_state_dict(ckpt["loader"])      # resume mid-epoch, exactly
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)                 # keeps a restored position in that epoch
        for batch in loader:                    # batch.input (B, C, V', X') ...
            ...
            ckpt["loader"] = loader.state_dict()
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from collections.abc import Iterator

import numpy as np
import torch

from hpc.config import Config, check_dataset
from hpc.data.index import SPLITS, SliceIndex, config_split, plan_epoch
from hpc.data.reader import BatchReader, ReadSpec
from hpc.data.select import stored_mask_gaps, stratified_runs
from hpc.data.staging import stage_to
from hpc.data.torch_backend import TorchBatches
from hpc.data.transform import AUX, Batch, DeviceTransform
from hpc.distributed.device import resolve_device
from hpc.errors import ConfigError, HpcError, InputError, OutputError
from hpc.io.shards import Dataset
from hpc.registry import FILLS


def aux_datasets(cfg: Config, ds: Dataset, split: str) -> tuple[str, ...]:
    """The mult / randoms datasets to read: those every study stores, when data.fill=reproject models
    them (a fill with ``aux``, e.g. data.fill=reproject; any split) or the validation's reproject
    baseline does (val); and ``expected`` with data.target=expected (every study must store it)."""
    truth = ("expected",) if cfg.data.target == "expected" else ()
    missing = [s.id for s in ds.studies if truth and "expected" not in s.truth]
    if missing:
        raise InputError(f"{ds.root}: studies {missing} store no noise-free `expected` counts (data.target=expected "
                         f"needs a simulated dataset converted with --expected)")
    if not FILLS.meta(cfg.data.fill).get("aux") and split != "val":
        return truth
    return tuple(n for n in AUX if all(n in s.truth for s in ds.studies)) + truth


class Loader:
    def __init__(self, cfg: Config, ds: Dataset, split: str, rank: int, world: int, device: torch.device,
                 multiple: int = 0, limit: int = 0):
        d = cfg.data
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.cfg, self.split, self.rank, self.world, self.device = cfg, split, rank, world, device
        self.train = split == "train"
        ids = [s.id for s in ds.studies]
        self.studies: list[str] = config_split(ids, d, split)
        if not self.studies:
            raise ConfigError(f"{ds.root}: split {split!r} has no studies ({len(ids)} in the dataset, "
                              f"data.split={d.split})")
        if d.stage_to:
            ds = Dataset.open(stage_to(ds.root, d.stage_to, self.studies))
        self.index = SliceIndex(ds)
        deepest = max(hi - lo for _, lo, hi in self.index.stacks)
        if d.context >= deepest:  # bounded by the data: beyond it every extra channel copies an edge slice
            raise ConfigError(f"data.context={d.context}: must be < {deepest}, the most planes of any segment in "
                              f"{ds.root} (a window of {2 * d.context + 1} slices)")
        self.runs = self.index.runs([ids.index(s) for s in self.studies], d.run_length, d.context)
        spec = ReadSpec(d.context, d.edge, cfg.corrupt.paired, cfg.corrupt.use_stored_mask,
                        aux_datasets(cfg, ds, split))
        self.reader = BatchReader(self.index, self.runs, spec)
        # the padding multiple is the model's (the trainer passes it); else data.pad_multiple, else none
        self.transform = DeviceTransform(cfg, self.index, device, self.train, multiple or d.pad_multiple or 1)
        if limit and not self.train:  # a bounded evaluation: a stratified sample with gaps (hpc.data.select)
            has_gaps = (stored_mask_gaps(self.index) if cfg.corrupt.use_stored_mask
                         else self.transform.has_gaps if self.transform.dead is not None else None)
            self.runs = stratified_runs(self.runs, limit, d.context, has_gaps)
            self.reader = BatchReader(self.index, self.runs, spec)
        self.lanes = max(1, d.workers)  # fixed by the plan; restored by load_state_dict
        self.epoch, self.position = 0, 0
        self._plans: dict[int, list[np.ndarray]] = {}
        self._torch = self._dali = None  # hpc.data.torch_backend.TorchBatches, dali_backend.DaliBatches
        self._bytes = self._windows = 0  # this epoch, for stats()

    def fingerprint(self) -> str:
        """What a validation's baselines depend on (the slices, their corruption and normalization,
        the studies' data): equal fingerprints, equal baseline scores (kept across resumes)."""
        d = self.cfg.data
        keys = {"slices": [(r.lo, r.hi) for r in self.runs], "corrupt": dataclasses.asdict(self.cfg.corrupt),
                "data": [d.context, d.edge, d.normalize, d.nonneg, d.fill, d.seed],
                "studies": [(s.id, s.sha256, s.num_slices) for s in self.index.ds.studies]}
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()

    def planner(self) -> functools.partial:
        """plan_epoch with everything but the epoch bound: picklable, so reader workers compute
        each epoch's plan themselves."""
        d = self.cfg.data
        return functools.partial(plan_epoch, self.runs, seed=d.seed, rank=self.rank, world=self.world,
                                 batch=d.batch_size, lanes=self.lanes, shuffle=self.train,
                                 buffer=d.shuffle_buffer, drop_last=self.train)

    def plan(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._plans:
            self._plans = {epoch: self.planner()(epoch=epoch)}
            if self.train and not self._plans[epoch]:
                raise ConfigError(f"split {self.split!r}: too few slices for data.batch_size="
                                  f"{self.cfg.data.batch_size} on {self.world} rank(s)")
        return self._plans[epoch]

    def __len__(self) -> int:
        return len(self.plan(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, unless it is the epoch a restored state is in."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "lanes": self.lanes,
                "rank": self.rank, "world": self.world, "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("world"), state.get("split")) != (self.world, self.split):
            raise ValueError(f"loader state is for split {state.get('split')!r} on {state.get('world')} "
                             f"rank(s), not {self.split!r} on {self.world}")
        self.epoch, self.position, self.lanes = int(state["epoch"]), int(state["position"]), int(state["lanes"])
        self._plans, self._torch, self._dali = {}, None, None  # the workers' planner changes with the lanes

    def _raw(self, plan: list[np.ndarray], start: int):
        if self.cfg.data.backend == "dali":
            if self._dali is None:  # one pipeline for consecutive passes
                from hpc.data.dali_backend import DaliBatches  # late: DALI is an optional extra
                self._dali = DaliBatches(self.reader, self.planner(), self.cfg, self.rank, self.device, self.train,
                                         self.lanes)
            return self._dali(self.epoch, start)
        if self._torch is None:  # persistent reader workers, started on first use
            self._torch = TorchBatches(self.reader, self.planner(), self.cfg.data.workers, self.device)
        return ((raw, None) for raw in self._torch(self.epoch, start, len(plan)))

    def __iter__(self) -> Iterator[Batch]:
        # Evaluation restarts every pass (a validation may stop early after train.val_batches).
        plan, start = self.plan(self.epoch), self.position if self.train else 0
        if start == 0:
            self._bytes = self._windows = 0
        for j, (raw, flipped) in enumerate(_one_line_errors(self._raw(plan, start)), start):
            self._bytes += int(raw.pop("bytes").sum())
            self._windows += len(plan[j])
            batch = self.transform(raw, self.epoch, j, flipped)
            self.position = j + 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def stats(self) -> dict:
        """I/O of the current (or just finished) epoch: bytes read from shards per byte of the
        slices served (centre slices of each stored dataset read)."""
        ds = self.index.ds
        per_slice = int(np.prod(ds.slice_shape)) * np.dtype(ds.dtype).itemsize
        per_slice *= 1 + self.cfg.corrupt.paired
        served = self._windows * per_slice
        return {"bytes_read": self._bytes, "bytes_served": served,
                "amplification": self._bytes / served if served else float("nan")}


_WORKER_ERROR = re.compile(r"(?:hpc\.errors\.)?(InputError|ConfigError|OutputError): (.+)")


def _one_line_errors(batches: Iterator) -> Iterator:
    """Re-raise an hpc error from a reader worker as the one line it was: DataLoader wraps it in
    "Caught InputError in DataLoader worker process 0. Original Traceback ...", DALI in a
    RuntimeError carrying the worker's traceback."""
    try:
        yield from batches
    except Exception as exc:
        text = str(exc)
        if isinstance(exc, HpcError) and "\n" not in text:
            raise
        found = _WORKER_ERROR.findall(text)
        if not found:
            raise
        kind, message = found[-1]
        raise {"InputError": InputError, "ConfigError": ConfigError, "OutputError": OutputError}[kind](
            message.strip()) from None


def build_loader(cfg: Config, split: str, rank: int = 0, world: int = 1,
                 device: torch.device | None = None, multiple: int = 0, limit: int = 0) -> Loader:
    """The contract in docs/ARCHITECTURE.md (stages the split's shards to ``data.stage_to`` first).
    ``multiple``: views and bins are padded to it (the model's: hpc.train.models.input_multiple;
    0 = data.pad_multiple, or no padding). ``limit`` (val/test): at most this many centre slices
    over all ranks, a stratified sample with gaps (hpc.data.select.stratified_runs)."""
    return Loader(cfg, check_dataset(cfg), split, rank, world, device or resolve_device(cfg.data.device), multiple,
                  limit)
