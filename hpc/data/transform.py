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
    mask: torch.Tensor  # (B, 1, V', X') float32, 1 = measured, 0 = missing (padding counts as measured)
    index: torch.Tensor  # (B,) int64 global slice ids of the centre slices
    norm: torch.Tensor  # (B,) normalization divisor per sample (Preprocess.inverse)
    pad: tuple[int, int, int, int]  # view before/after, bin left/right (crop back with augment.crop)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # centre slices' mult/randoms (B, 1, V, X), counts

    def state(self) -> A.PreState:
        return A.PreState(self.norm, self.pad)


def batch_generator(seed: int, epoch: int, j: int, device: torch.device) -> torch.Generator:
    """The generator of batch j of an epoch: all of a batch's random draws come from it."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, epoch, j]).generate_state(1)[0]))
    return g


class BlockGeometry:
    """Dead-block masks for any batch of planes: the scanner's transaxial block masks on the
    device plus, per global slice id, the axial block of each ring of its plane."""

    def __init__(self, scanner_name: str, index: SliceIndex, device: torch.device):
        from hpc import geometry as G  # late: only runs with dead-block corruption need it

        try:
            sc = G.get_scanner(scanner_name)
            ra, rb = G.plane_rings(sc, index.segment, index.axial)
        except ValueError as exc:  # unknown scanner, or planes the scanner does not have
            raise ConfigError(f"corrupt.scanner: {index.ds.root}: {exc}") from None
        if tuple(index.ds.slice_shape) != (sc.views, sc.bins):
            raise ConfigError(f"corrupt.scanner: {index.ds.root} has slices of {tuple(index.ds.slice_shape)}, "
                              f"scanner {sc.name!r} has (views, bins) = ({sc.views}, {sc.bins})")
        self.scanner = sc
        self.n_trans, self.n_blocks = G.block_counts(sc)
        self.block_a = torch.as_tensor(G.axial_block(sc, ra), device=device)  # (N,) per global slice id
        self.block_b = torch.as_tensor(G.axial_block(sc, rb), device=device)
        self.tmasks = torch.as_tensor(G.transaxial_block_masks(sc), device=device)  # (T, 2, V, X) bool

    def masks(self, ids: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """ids (B, C) slice ids, dead (B, D) block ids per sample -> (B, C, V, X) float masks."""
        b, c = ids.shape
        flat = ids.reshape(-1)
        m = A.dead_block_masks(self.tmasks, self.block_a[flat], self.block_b[flat],
                               dead.repeat_interleave(c, dim=0), self.n_trans)
        return m.view(b, c, *m.shape[-2:])


AUX = ("mult", "randoms")  # optional shard datasets the reproject fill and baseline model (hpc.recon)


class DeviceTransform:
    """``__call__(raw, epoch, j) -> Batch`` for a batch ``raw`` already on the device:
    ``target`` (B, C, V, X) context stack, ``ids`` (B, C), optional ``input``, ``mask``."""

    def __init__(self, cfg: Config, index: SliceIndex, device: torch.device, train: bool):
        self.cfg, self.device, self.train = cfg, device, train
        self.pre = A.Preprocess(cfg, scale=index.ds.scale, scanner=index.ds.scanner)
        c = cfg.corrupt
        self.geometry = None
        if c.dead_blocks > 0 and not c.use_stored_mask:
            name = c.scanner or index.ds.scanner
            if not name:
                raise ConfigError(f"corrupt.scanner: {index.ds.root} records no scanner; set corrupt.scanner "
                                  f"(or corrupt.dead_blocks=0)")
            validate_scanner(cfg, name)  # the manifest's scanner, when corrupt.scanner does not name one
            self.geometry = BlockGeometry(name, index, device)

    def _generator(self, epoch: int, j: int) -> torch.Generator:
        if self.train:
            return batch_generator(self.cfg.augment.seed, epoch, j, self.device)
        return batch_generator(self.cfg.data.seed, 0, j, self.device)  # the same every validation

    def corrupt(self, raw: dict[str, torch.Tensor], epoch: int, gen: torch.Generator,
                flipped: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input (B, C, V, X), per-channel mask (B, C, V, X)) from the clean stack."""
        c, stack = self.cfg.corrupt, raw["target"]
        inp = raw["input"].float() if c.paired else stack
        if c.dose < 1.0:
            inp = A.thin(inp, c.dose, gen) / c.dose  # back to the full-dose scale of the target
        if c.use_stored_mask:
            mask = raw["mask"].float()
        elif self.geometry is not None:
            # Training draws new blocks each epoch; validation the same blocks for a slice every time.
            seed = self.cfg.data.seed * 1_000_003 + (epoch + 1 if self.train else 0)
            centre = raw["ids"][:, raw["ids"].shape[1] // 2]
            dead = A.choose_blocks(seed, centre, self.geometry.n_blocks, c.dead_blocks)
            mask = self.geometry.masks(raw["ids"], dead)
            if flipped is not None:  # the reader already mirrored these samples' data
                mask = A.flip_bins(mask, flipped)
        else:
            mask = torch.ones_like(stack)
        aux = {k: raw[k].float() for k in AUX if k in raw}  # mult / randoms (B, C, V, X) when read
        return self.pre.gaps(inp, mask, aux), mask

    def __call__(self, raw: dict[str, torch.Tensor], epoch: int, j: int,
                 flipped: torch.Tensor | None = None) -> Batch:
        stack = raw["target"] = raw["target"].float()  # (B, C, V, X)
        k = stack.shape[1] // 2
        gen = self._generator(epoch, j)
        inp, mask_c = self.corrupt(raw, epoch, gen, flipped)
        target, mask = stack[:, k:k + 1], mask_c[:, k:k + 1]
        if self.train and self.cfg.augment.enabled:
            prm = A.draw_augment(self.cfg.augment, stack.shape[0], stack.shape[2], gen, self.device)
            if flipped is not None:
                prm.flip = None  # applied by the reader (DALI)
            inp, target = A.apply_augment(inp, prm), A.apply_augment(target, prm)
            mask = A.apply_augment(mask, prm, is_mask=True)
        x, st = self.pre.forward(inp)
        aux = {} if self.train else {n: raw[n][:, k:k + 1].float() for n in AUX if n in raw}  # validation's reproject
        return Batch(x, self.pre.like(target, st), self.pre.pad_mask(mask, st),
                     raw["ids"][:, k].clone(), st.norm, st.pad, aux)
