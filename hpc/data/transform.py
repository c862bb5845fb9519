"""Corruption, augmentation and preprocessing of a read batch, batched on its device.

Everything random is a function of (seed, epoch, batch position) or of the slice id, so a resumed
epoch replays the same batches and validation corrupts a slice the same way every time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from hpc import augment as A
from hpc.config import Config, validate_scanner
from hpc.data.index import SliceIndex
from hpc.errors import ConfigError


@dataclass
class Batch:
    input: torch.Tensor  # (B, C, V', X') float32, corrupted, augmented, normalized, padded
    target: torch.Tensor  # (B, 1, V', X') float32, same normalization and padding
    mask: torch.Tensor  # (B, 1, V', X') float32 measured fraction: 1 measured, 0 a gap (padding: 1)
    index: torch.Tensor  # (B,) int64 global slice ids of the centre slices
    norm: torch.Tensor  # (B,) normalization divisor per sample (Preprocess.inverse)
    pad: tuple[int, int, int, int]  # view before/after, bin left/right (crop back with augment.crop)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # centre slices' mult/randoms (B, 1, V, X), counts
    valid: torch.Tensor | None = None  # (B, 1, V', X') float32: 1 = a real LOR, 0 = virtual crystals only

    def state(self) -> A.PreState:
        return A.PreState(self.norm, self.pad)


def batch_generator(seed: int, epoch: int, j: int, device: torch.device) -> torch.Generator:
    """The generator of batch j of an epoch: all of a batch's random draws come from it."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, epoch, j]).generate_state(1)[0]))
    return g


def _known(name: str) -> bool:
    from hpc import geometry as G

    try:
        G.get_scanner(name)
        return True
    except ValueError:
        return False


class LayoutGeometry:
    """The dataset's sinogram layout (hpc.projdata) on the device: per global slice id its plane,
    the dead-block tables (measured fractions of span-compressed / view-mashed pixels) and which
    pixels are lines of response at all (virtual crystals and rings are not)."""

    def __init__(self, scanner_name: str, index: SliceIndex, device: torch.device):
        from hpc import geometry as G  # late: only runs with a known scanner need it
        from hpc import projdata as P

        try:
            sc = G.get_scanner(scanner_name)
            layouts = [s.layout(sc.name) for s in index.ds.studies]
        except ValueError as exc:  # unknown scanner, or planes / slices the scanner does not have
            raise ConfigError(f"corrupt.scanner: {index.ds.root}: {exc}") from None
        lay = layouts[0]
        if any(other != lay for other in layouts[1:]):
            raise ConfigError(f"corrupt.scanner: {index.ds.root}: the studies have different sinogram layouts "
                              "(segments, span, views); convert them into separate datasets")
        plane = np.concatenate([lay.plane_of(index.segment[lo:hi], index.axial[lo:hi])
                                for lo, hi in zip(index.offsets[:-1], index.offsets[1:], strict=True)])
        self.layout, self.scanner = lay, sc
        self.partial = lay.span > 1 or lay.view_mashing > 1  # fractions strictly between 0 and 1 exist
        self.n_trans, self.n_blocks = G.block_counts(sc)
        self.plane = torch.as_tensor(plane, device=device)  # (N,) per global slice id
        self.tables = P.DeadBlockTables(lay, device)
        self.valid_planes = torch.as_tensor(lay.valid_planes, device=device)  # (P,)
        self.valid_bins = torch.as_tensor(lay.valid_bins, device=device)  # (V, X)

    def masks(self, ids: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """ids (B, C) slice ids, dead (B, D) block ids per sample -> (B, C, V, X) measured fractions."""
        b, c = ids.shape
        m = self.tables.fractions(self.plane[ids.reshape(-1)], dead.repeat_interleave(c, dim=0))
        return m.view(b, c, *m.shape[-2:])

    def valid(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, C) -> (B, C, V, X) float: 1 where the pixel holds a real line of response."""
        return (self.valid_planes[self.plane[ids]][..., None, None] & self.valid_bins).float()


AUX = ("mult", "randoms")  # optional shard datasets the reproject fill and baseline model (hpc.recon)


class DeviceTransform:
    """``__call__(raw, epoch, j) -> Batch`` for a batch ``raw`` already on the device:
    ``target`` (B, C, V, X) context stack, ``ids`` (B, C), optional ``input``, ``mask``."""

    def __init__(self, cfg: Config, index: SliceIndex, device: torch.device, train: bool):
        self.cfg, self.device, self.train = cfg, device, train
        self.pre = A.Preprocess(cfg, scale=index.ds.scale, scanner=index.ds.scanner)
        c = cfg.corrupt
        self.geometry = self.dead = None
        name = c.scanner or index.ds.scanner
        if c.dead_blocks > 0 and not c.use_stored_mask:
            if not name:
                raise ConfigError(f"corrupt.scanner: {index.ds.root} records no scanner; set corrupt.scanner "
                                  f"(or corrupt.dead_blocks=0)")
            validate_scanner(cfg, name)  # the manifest's scanner, when corrupt.scanner does not name one
            self.geometry = self.dead = LayoutGeometry(name, index, device)
        elif name and _known(name):  # virtual crystals: known from the geometry even without dead blocks
            try:
                self.geometry = LayoutGeometry(name, index, device)
            except ConfigError:
                self.geometry = None  # a layout the preset cannot have (e.g. hand-made test data): all valid

    def _generator(self, epoch: int, j: int) -> torch.Generator:
        if self.train:
            return batch_generator(self.cfg.augment.seed, epoch, j, self.device)
        return batch_generator(self.cfg.data.seed, 0, j, self.device)  # the same every validation

    def corrupt(self, raw: dict[str, torch.Tensor], epoch: int, gen: torch.Generator, flipped: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input, per-channel measured fractions, valid or None), each (B, C, V, X), from the clean stack."""
        c, stack = self.cfg.corrupt, raw["target"]
        inp = raw["input"].float() if c.paired else stack
        if c.dose < 1.0:
            inp = A.thin(inp, c.dose, gen) / c.dose  # back to the full-dose scale of the target
        valid = None
        if self.geometry is not None:
            valid = self.geometry.valid(raw["ids"])  # (B, C, V, X)
            if flipped is not None:  # the reader already mirrored these samples' data
                valid = A.flip_bins(valid, flipped)
        if c.use_stored_mask:  # fractions; the stored input (paired) already lost them, a clean one is thinned
            mask = raw["mask"].float()
            if not c.paired:
                inp = A.thin_fraction(inp, mask, gen)
        elif self.dead is not None:
            # Training draws new blocks each epoch; validation the same blocks for a slice every time.
            seed = self.cfg.data.seed * 1_000_003 + (epoch + 1 if self.train else 0)
            centre = raw["ids"][:, raw["ids"].shape[1] // 2]
            dead = A.choose_blocks(seed, centre, self.dead.n_blocks, c.dead_blocks)
            mask = self.dead.masks(raw["ids"], dead)
            if flipped is not None:
                mask = A.flip_bins(mask, flipped)
            if self.dead.partial:  # a partly lost bin keeps each count with its surviving fraction
                inp = A.thin_fraction(inp, mask, gen)
        else:
            mask = torch.ones_like(stack)
        aux = {k: raw[k].float() for k in AUX if k in raw}  # mult / randoms (B, C, V, X) when read
        return self.pre.gaps(inp, mask, aux, valid), mask, valid

    def __call__(self, raw: dict[str, torch.Tensor], epoch: int, j: int,
                 flipped: torch.Tensor | None = None) -> Batch:
        stack = raw["target"] = raw["target"].float()  # (B, C, V, X)
        k = stack.shape[1] // 2
        gen = self._generator(epoch, j)
        inp, mask_c, valid_c = self.corrupt(raw, epoch, gen, flipped)
        target, mask = stack[:, k:k + 1], mask_c[:, k:k + 1]
        valid = valid_c[:, k:k + 1] if valid_c is not None else torch.ones_like(mask)
        if self.train and self.cfg.augment.enabled:
            prm = A.draw_augment(self.cfg.augment, stack.shape[0], stack.shape[2], gen, self.device)
            if flipped is not None:
                prm.flip = None  # applied by the reader (DALI)
            inp, target = A.apply_augment(inp, prm), A.apply_augment(target, prm)
            mask, valid = A.apply_augment(mask, prm, is_mask=True), A.apply_augment(valid, prm, is_mask=True)
        x, st = self.pre.forward(inp)
        aux = {} if self.train else {n: raw[n][:, k:k + 1].float() for n in AUX if n in raw}  # validation's reproject
        return Batch(x, self.pre.like(target, st), self.pre.pad_mask(mask, st),
                     raw["ids"][:, k].clone(), st.norm, st.pad, aux, self.pre.pad_mask(valid, st))
