"""Corruption, augmentation and preprocessing of a read batch, batched on its device.

Everything random is a function of (seed, epoch, batch position) or of the slice id, so a resumed
epoch replays the same batches and validation corrupts a slice the same way every time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from hpc.config import Config, validate_scanner
from hpc.data import augment as A
from hpc.data.fills import build_preprocess
from hpc.data.index import SliceIndex
from hpc.data.preprocess import PreState, mirror_bins
from hpc.errors import ConfigError
from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.physics.geometry import find_scanner
from hpc.registry import FILLS


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

    def state(self) -> PreState:
        return PreState(self.norm, self.pad)


def batch_generator(seed: int, epoch: int, j: int, device: torch.device) -> torch.Generator:
    """The generator of batch j of an epoch: all of a batch's random draws come from it."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, epoch, j]).generate_state(1)[0]))
    return g


class LayoutGeometry:
    """The dataset's sinogram layout (hpc.physics.projdata) on the device: per global slice id its plane,
    the dead-block tables (measured fractions of span-compressed / view-mashed pixels) and which
    pixels are lines of response at all (virtual crystals and rings are not)."""

    def __init__(self, scanner_name: str, index: SliceIndex, device: torch.device):

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
        return self.tables.fractions(self.plane[ids], dead)

    def valid(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, C) -> (B, C, V, X) float: 1 where the pixel holds a real line of response."""
        return (self.valid_planes[self.plane[ids]][..., None, None] & self.valid_bins).float()

    def reached(self, ids: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """ids (n,) slice ids, dead (n, D) block ids -> (n,) bool: a ring pair of the slice's plane
        (between real rings) has a ring in a dead block's axial range, so the block takes some of its
        lines of response (without building the (V, X) fractions)."""
        t = self.tables
        planes = self.plane[ids]
        d_ax = torch.where(dead >= 0, dead.div(self.n_trans, rounding_mode="floor"), -1)[:, None]  # (n, 1, D)
        a, b, real = t.block_a[planes][..., None], t.block_b[planes][..., None], t.real[planes] > 0  # (n, K, 1)
        return (((a == d_ax) | (b == d_ax)).any(-1) & real).any(-1)


AUX = ("mult", "randoms")  # optional shard datasets the reproject fill and baseline model (hpc.physics.recon)


def _segments(shift: int, v: int) -> list[tuple[int, int, int, bool]]:
    """(first output row, end, first source row, mirrored by the wrap) of the at most two runs of
    rows of ``rotate_views`` by ``shift``: output row r comes from row (r - shift) mod V, mirrored
    for an odd number of wraps past 180 degrees."""
    out, r = [], 0
    while r < v:
        src = r - shift
        wraps, row = divmod(src, v)
        n = min(v - r, v - row)
        out.append((r, r + n, row, wraps % 2 == 1))
        r += n
    return out


def stack_rows_float(slices: torch.Tensor, window: torch.Tensor, prm: A.AugmentParams | None = None,
                     with_max: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """``stack_rows(slices, window, prm).float()``, bit for bit, as float32 (B, C, V, X). On the CPU
    each output row is written once: copies of whole row runs with the cast fused in (torch's
    index_select + flip + scatter + cast made four passes over the batch, the loader's largest cost
    on CPU). Mirrored rows are copied from one radially flipped copy of the unique slices (torch's
    vectorised flip): numpy's casting copy from negative strides is ~5x slower than from contiguous rows.
    ``with_max``: also each sample's maximum (B,) float32 (rotation and mirror only permute
    pixels), from one maximum per unique slice (None off the CPU)."""
    if slices.device.type != "cpu":
        out = stack_rows(slices, window, prm).float()
        return (out, None) if with_max else out
    slices = slices.contiguous()
    src = slices.numpy()  # (U, V, X)
    u, v, x = src.shape
    win = window.cpu().numpy()
    b, c = win.shape
    out = np.empty((b, c, v, x), np.float32)
    shift = prm.shift.cpu().numpy() if prm is not None and prm.shift is not None else np.zeros(b, np.int64)
    flip = prm.flip.cpu().numpy().astype(bool) if prm is not None and prm.flip is not None else np.zeros(b, bool)
    runs = [[(r0, r1, s0, wrapped ^ bool(flip[i])) for r0, r1, s0, wrapped in _segments(int(shift[i]), v)]
            for i in range(b)]  # per sample: (first output row, end, first source row, mirrored)
    mirror = None
    if any(m for sample_runs in runs for *_, m in sample_runs):
        # mirror[..., k] = src[..., X - 1 - k]: bins 1..X-1 of an even X's mirror are mirror[..., :X - 1]
        bits = slices.view(torch.int16) if slices.dtype == torch.uint16 else slices  # torch's flip lacks uint16
        mirror = bits.flip(-1).numpy().view(src.dtype)

    # One thread: the copies are bound by memory bandwidth (a thread pool over the samples was
    # 8-12 % slower on 2 cores, bench/loader.py); torch's flip above uses its intra-op threads.
    for i, ch in np.ndindex(b, c):
        w = win[i, ch]
        for r0, r1, s0, mirrored in runs[i]:
            s1, dst = s0 + r1 - r0, out[i, ch, r0:r1]
            if not mirrored:
                dst[...] = src[w, s0:s1]
            elif x % 2:  # odd X: a plain flip
                dst[...] = mirror[w, s0:s1]
            else:  # even X: bin 0 stays, bins 1..X-1 reversed (hpc.data.preprocess.mirror_index)
                dst[:, 0] = src[w, s0:s1, 0]
                dst[:, 1:] = mirror[w, s0:s1, :x - 1]
    if not with_max:
        return torch.from_numpy(out)
    peak = src.reshape(u, -1).max(1)[win].max(1).astype(np.float32)  # (B,): one reduction per unique slice
    return torch.from_numpy(out), torch.from_numpy(peak)


def stack_rows(slices: torch.Tensor, window: torch.Tensor, prm: A.AugmentParams | None = None) -> torch.Tensor:
    """(U, V, X) unique slices -> (B, C, V, X) context stacks ``slices[window]``, with the view
    rotation and radial mirror of ``prm`` (``apply_augment``'s result, bit for bit) folded into the
    same gather of whole rows: rows come from ``slices`` or from its mirrored copy."""
    dtype = slices.dtype
    if dtype == torch.uint16:  # torch's CPU index and flip kernels lack uint16: move the same bits as int16
        return stack_rows(slices.view(torch.int16), window, prm).view(dtype)
    if prm is None or (prm.shift is None and prm.flip is None):
        return slices[window]
    u, v, x = slices.shape
    b = window.shape[0]
    src = torch.arange(v, device=slices.device).view(1, v).expand(b, v)  # (B, V): source view of each row
    if prm.shift is not None:
        src = src - prm.shift.view(b, 1)
    mirrored = torch.div(src, v, rounding_mode="floor").remainder(2) == 1  # odd wraps past 180 degrees
    if prm.flip is not None:
        mirrored = mirrored ^ prm.flip.view(b, 1).bool()
    rows = window.view(b, -1, 1) * v + src.remainder(v).view(b, 1, v)  # (B, C, V) source rows
    out = slices.reshape(u * v, x).index_select(0, rows.view(-1))  # (B * C * V, X): whole rows, one copy
    flip = mirrored.view(b, 1, v).expand(rows.shape).reshape(-1).nonzero().view(-1)  # rows to mirror
    if len(flip):
        out[flip] = mirror_bins(out[flip])
    return out.view(*rows.shape, x)


class DeviceTransform:
    """``__call__(raw, epoch, j) -> Batch`` for a batch ``raw`` already on the device:
    ``target`` (B, C, V, X) context stack, ``ids`` (B, C), optional ``input``, ``mask``."""

    def __init__(self, cfg: Config, index: SliceIndex, device: torch.device, train: bool, multiple: int):
        self.cfg, self.device, self.train = cfg, device, train
        self.pre = build_preprocess(cfg, multiple, scale=index.ds.scale, scanner=index.ds.scanner)
        c = cfg.corrupt
        self.geometry = self.dead = None
        name = c.scanner or index.ds.scanner
        if c.dead_blocks > 0 and not c.use_stored_mask:
            if not name:
                raise ConfigError(f"corrupt.scanner: {index.ds.root} records no scanner; set corrupt.scanner "
                                  f"(or corrupt.dead_blocks=0)")
            validate_scanner(cfg, name)  # the manifest's scanner, when corrupt.scanner does not name one
            self.geometry = self.dead = LayoutGeometry(name, index, device)
        elif find_scanner(name) is not None:  # virtual crystals: known from the geometry even without dead blocks
            try:
                self.geometry = LayoutGeometry(name, index, device)
            except ConfigError:
                self.geometry = None  # a layout the preset cannot have (e.g. hand-made test data): all valid

    def _generator(self, epoch: int, j: int) -> torch.Generator:
        if self.train:
            return batch_generator(self.cfg.augment.seed, epoch, j, self.device)
        return batch_generator(self.cfg.data.seed, 0, j, self.device)  # the same every validation

    def _foldable(self) -> bool:
        """Whether the view rotation and mirror may move before the corruption, into the gather that
        builds the stacks, with identical results: they are permutations of pixels, so they commute
        with everything per pixel (dead-block fractions, valid LORs, stored masks, zeroed gaps), but
        not with random draws from the batch's generator (dose thinning, the binomial thinning of a
        stored mask on a clean input or of partly dead span/mashed bins: the draws would land on
        other pixels, and draw_augment would come first), the radial interpolation of
        data.fill=linear (its edge bins), the reconstruction of data.fill=reproject or the affine
        option."""
        a, c = self.cfg.augment, self.cfg.corrupt
        if not (self.train and a.enabled and not a.affine and c.dose >= 1.0):
            return False
        if c.use_stored_mask and not c.paired:
            return False
        if self.dead is not None and self.dead.partial:
            return False
        has_mask = c.use_stored_mask or self.dead is not None
        fold = FILLS.meta(self.cfg.data.fill).get("fold")
        return fold == "always" or (fold == "without_gaps" and not has_mask)

    def dead_blocks(self, centre: torch.Tensor, epoch: int) -> torch.Tensor:
        """(B, corrupt.dead_blocks) dead block ids of samples with centre slices ``centre`` (B,).
        Training draws new blocks each epoch; validation the same blocks for a slice every time."""
        seed = self.cfg.data.seed * 1_000_003 + (epoch + 1 if self.train else 0)
        return A.choose_blocks(seed, centre, self.dead.n_blocks, self.cfg.corrupt.dead_blocks)

    def has_gaps(self, centres) -> np.ndarray | None:
        """(n,) bool for centre slice ids (n,): the corruption takes lines of response from the slice
        (validation's blocks: epoch-independent); None when gaps come from stored masks or nowhere."""
        if self.dead is None or self.train:
            return None
        ids = torch.as_tensor(np.asarray(centres, np.int64), device=self.device)
        return self.dead.reached(ids, self.dead_blocks(ids, 0)).cpu().numpy()

    def corrupt(self, raw: dict[str, torch.Tensor], epoch: int, gen: torch.Generator,
                flipped: torch.Tensor | None, folded: A.AugmentParams | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(input, per-channel measured fractions or None when nothing is missing, valid or None),
        each (B, C, V, X), from the clean stack. ``folded``: the stacks are already rotated/mirrored
        by these draws; the masks made here from the geometry follow them."""
        c, stack = self.cfg.corrupt, raw["target"]
        inp = raw["input"].float() if c.paired else stack
        if c.dose < 1.0:
            kept = A.thin(inp, c.dose, gen)
            if c.dose_target == "rest" and not c.paired:  # the counts not kept: independent of the input
                k = stack.shape[1] // 2
                raw["rest"] = (stack[:, k:k + 1].round().clamp_min(0) - kept[:, k:k + 1]) / (1 - c.dose)  # (B, 1, V, X)
            inp = kept / c.dose  # back to the full-dose scale of the target
        valid = None
        if self.geometry is not None:
            valid = self.geometry.valid(raw["ids"])  # (B, C, V, X)
            if flipped is not None:  # the reader already mirrored these samples' data
                valid = A.flip_bins(valid, flipped)
            if folded is not None:
                valid = A.apply_augment(valid, folded, is_mask=True)
        if c.use_stored_mask:  # fractions; the stored input (paired) already lost them, a clean one is thinned
            mask = raw["mask"].float()
            if not c.paired:
                inp = A.thin_fraction(inp, mask, gen)
        elif self.dead is not None:
            dead = self.dead_blocks(raw["ids"][:, raw["ids"].shape[1] // 2], epoch)
            mask = self.dead.masks(raw["ids"], dead)
            if flipped is not None:
                mask = A.flip_bins(mask, flipped)
            if folded is not None:
                mask = A.apply_augment(mask, folded, is_mask=True)
            if self.dead.partial:  # a partly lost bin keeps each count with its surviving fraction
                inp = A.thin_fraction(inp, mask, gen)
        elif valid is None and not FILLS.meta(self.cfg.data.fill).get("aux"):
            return inp, None, None  # nothing missing or invalid: gaps() would be the identity
        else:  # a fill that models mult/randoms (reproject) runs even without gaps; virtual-crystal LORs are zeroed
            mask = torch.ones_like(stack)
        aux = {k: raw[k].float() for k in AUX if k in raw}  # mult / randoms (B, C, V, X) when read
        return self.pre.gaps(inp, mask, aux, valid), mask, valid

    def __call__(self, raw: dict[str, torch.Tensor], epoch: int, j: int,
                 flipped: torch.Tensor | None = None) -> Batch:
        gen = self._generator(epoch, j)
        prm = folded = peak = None
        if "window" in raw:  # the reader sent each slice once: build the context stacks here, on the device
            window = raw.pop("window")  # (B, C) positions in the batch's unique slices
            if self._foldable():  # view rotation + mirror ride along in the same row gather
                v = raw["target"].shape[1]
                folded = prm = A.draw_augment(self.cfg.augment, window.shape[0], v, gen, self.device)
            raw["target"], peak = stack_rows_float(raw["target"], window, prm, with_max=True)
            for name in ("input", "mask", "expected", *AUX):
                if name in raw:  # (U, V, X) -> (B, C, V, X) float32 (every use below casts to float)
                    raw[name] = stack_rows_float(raw[name], window, prm)
        stack = raw["target"] = raw["target"].float()  # (B, C, V, X)
        k = stack.shape[1] // 2
        inp, mask_c, valid_c = self.corrupt(raw, epoch, gen, flipped, folded)
        target = raw.pop("rest", stack[:, k:k + 1])  # (B, 1, V, X), normalized out of place by like()
        if self.cfg.data.target == "expected":  # the noise-free counts (simulations), same scale and pixels
            target = raw["expected"][:, k:k + 1].float()
        ones = torch.ones(1, 1, 1, 1, device=self.device).expand_as(target)  # a broadcast view, no memory
        mask = mask_c[:, k:k + 1] if mask_c is not None else ones
        valid = valid_c[:, k:k + 1] if valid_c is not None else ones
        if self.train and self.cfg.augment.enabled and folded is None:
            prm = A.draw_augment(self.cfg.augment, stack.shape[0], stack.shape[2], gen, self.device)
            if flipped is not None:
                prm.flip = None  # applied by the reader (DALI)
            inp, target = A.apply_augment(inp, prm), A.apply_augment(target, prm)
            mask, valid = A.apply_augment(mask, prm, is_mask=True), A.apply_augment(valid, prm, is_mask=True)
        st = self.pre.state(inp, peak if inp is stack else None)  # the stack's maxima: one read less
        target = self.pre.like(target, st)  # first: `target` may be a view of `inp`, normalized in place next
        x = self.pre.like(inp, st, inplace=True)  # `inp` is this batch's own tensor: one pass less
        aux = {} if self.train else {n: raw[n][:, k:k + 1].float() for n in AUX if n in raw}  # validation's reproject
        return Batch(x, target, self.pre.pad_mask(mask, st),
                     raw["ids"][:, k].clone(), st.norm, st.pad, aux, self.pre.pad_mask(valid, st))
