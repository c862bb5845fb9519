"""The list-mode kernel on torch tensors (CPU or CUDA): the same decode and address map as
:func:`hpc.io.listmode.histogram_words`, with ``index_add_`` as the accumulation.

On a GPU the accumulators (prompts + delayeds + trash plane, int32: mMR span 11 ~580 MB) live in
device memory: each chunk of words goes host -> device once (a pinned buffer), is decoded there and
added with atomic increments, and only the finished histogram comes back. On the CPU it measured
slower than numpy's ``np.add.at`` (docs/BENCHMARKS.md, "List mode"); it is kept selectable so the
comparison can be rerun. Tags (~0.3 % of the words) are copied back to the host and checked by
the numpy code (:func:`hpc.io.listmode.tag_marks`), so time marks are handled identically.

    k = TorchKernel(hdr, bin_map(hdr.layout, target), None, "cuda", 1 << 22)
    acc, fans, stats = k.run(0, hdr.words)          # numpy arrays, as hpc.io.lmhistogram.Workers.run
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from hpc.errors import InputError
from hpc.io.listmode import ADDRESS_MASK, BinMap, ListModeHeader, WordFile, new_stats, refuse_addresses, tag_marks

INT32_MAX = 2**31 - 1


class TorchKernel:
    """Histograms word ranges of one list-mode file on ``device`` ("cpu" or "cuda")."""

    def __init__(self, hdr: ListModeHeader, bmap: BinMap, tabs, device: str, chunk: int,
                 check: Callable[[], None] | None = None):
        if device == "cuda" and not torch.cuda.is_available():
            raise InputError(f"{hdr.path}: histogram device cuda: torch sees no GPU here (use numpy or cpu)")
        self.hdr, self.bmap, self.tabs, self.chunk, self.check = hdr, bmap, tabs, chunk, check
        self.dev = torch.device(device)
        # a bin never holds more counts than there are words: int32 unless the file could overflow it
        self.dtype = torch.int32 if hdr.words <= INT32_MAX else torch.int64
        as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=self.dev)  # noqa: E731
        self.plane_lut, self.rem_lut = as_t(bmap.plane_lut), as_t(bmap.rem_lut)
        self.plane_shift = as_t(bmap.plane_shift)
        if tabs is not None:
            rings, crystals, n = tabs
            self.fan_rings, self.fan_crystals, self.n_det = as_t(rings), as_t(crystals), n
        self.n_fans = hdr.layout.scanner.rings * hdr.layout.scanner.detectors_per_ring if tabs else 0
        pin = self.dev.type == "cuda"
        self.host = torch.empty(max(1, chunk), dtype=torch.int32, pin_memory=pin)  # (chunk,) words as read

    def run(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None, list[dict]]:
        """(accumulator (2 * size,), fan sums (rings * N,) or None, [stats]) of words [start, stop)."""
        acc = torch.zeros(2 * self.bmap.size, dtype=self.dtype, device=self.dev)
        fans = torch.zeros(self.n_fans, dtype=self.dtype, device=self.dev) if self.tabs else None
        st = new_stats()
        buf = self.host.numpy().view(np.uint32)  # the pinned buffer, filled in place by pread
        with WordFile(self.hdr) as wf:
            for pos in range(start, stop, buf.size):
                if self.check is not None:
                    self.check()
                n = min(buf.size, stop - pos)
                wf.read(pos, buf[:n])
                w = self.host[:n].to(self.dev, non_blocking=False)  # (n,) int32: tags are negative
                self._chunk(wf, w, pos, acc, fans, st)
        out = acc.cpu().numpy().view(np.uint32 if self.dtype == torch.int32 else np.uint64)
        f = None if fans is None else fans.cpu().numpy().view(out.dtype)
        return out, f, [st]

    def _chunk(self, wf: WordFile, w: torch.Tensor, pos: int, acc: torch.Tensor, fans: torch.Tensor | None,
               st: dict[str, int]) -> None:
        is_tag = w < 0  # bit 31 set
        at = torch.nonzero(is_tag).reshape(-1)
        if at.numel():  # a few per chunk: checked on the host by the numpy code
            tags = w[at].cpu().numpy().view(np.uint32)
            tag_marks(wf, at.cpu().numpy(), tags, pos, st)
        ev = w[~is_tag]  # (E,) events
        delayed = (ev >> 30) == 0  # bit 30 = 0
        addr = (ev & int(ADDRESS_MASK)).long()
        if addr.numel() and int(addr.max()) >= self.bmap.addresses:
            refuse_addresses(wf, pos, w.numel(), self.bmap)
        key = self._keys(addr)
        key += delayed.long() * self.bmap.size
        acc.index_add_(0, key, torch.ones(1, dtype=acc.dtype, device=self.dev).expand(key.numel()))
        if fans is not None:
            self._fan_sums(addr[delayed], fans)

    def _keys(self, addr: torch.Tensor) -> torch.Tensor:
        """(E,) int64 histogram index of each address (file layout -> target layout)."""
        b = self.bmap
        if b.identity:
            return addr.clone()
        q = torch.div(addr, b.stride, rounding_mode="floor")
        if b.rem_identity:
            return self.plane_shift[q] + addr
        return self.plane_lut[q] + self.rem_lut[addr - q * b.stride]

    def _fan_sums(self, addr: torch.Tensor, fans: torch.Tensor) -> None:
        q = torch.div(addr, self.bmap.stride, rounding_mode="floor")
        r, c = self.fan_rings[q], self.fan_crystals[addr - q * self.bmap.stride]  # (E, 2) each
        ones = torch.ones(1, dtype=fans.dtype, device=self.dev).expand(addr.numel())
        for end in (0, 1):
            fans.index_add_(0, r[:, end] * self.n_det + c[:, end], ones)

    def close(self) -> None:
        self.host = torch.empty(0, dtype=torch.int32)

