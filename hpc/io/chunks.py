"""HDF5 chunks compressed in Python threads and written with ``write_direct_chunk``.

h5py compresses chunks inside HDF5, one at a time, holding its global lock. ``hpc convert``
instead encodes each chunk (one sinogram slice) in a thread pool (numcodecs' blosc and zlib release
the GIL) and hands the finished bytes to ``write_direct_chunk``. The bytes are exactly what the
dataset's own filter pipeline would store, so plain h5py + hdf5plugin read the shards, and
tests/test_chunks.py checks them byte for byte against h5py's pipeline:

- the pipeline is read from the dataset's creation properties (``ChunkCodec.for_dataset``):
  shuffle (2), deflate (1), blosc (32001, hdf5plugin) and fletcher32 (3), in the stored order;
- blosc, which HDF5 gives an output buffer the size of the input, is skipped and flagged in the
  chunk's filter mask when it cannot shrink a chunk, as HDF5 does (deflate always stores its output);
- fletcher32 appends HDF5's checksum of the bytes before it (``fletcher32``), little-endian.

lzf has no implementation outside h5py's filter: ``for_dataset`` returns None and the caller writes
through h5py. Each written chunk also gets an xxh3-64 digest of its stored bytes (``digest``), so a
written file is verified by re-reading its raw chunks (``read_direct_chunk``), not by decompressing
everything again.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import xxhash

FILTER_DEFLATE, FILTER_SHUFFLE, FILTER_FLETCHER32, FILTER_BLOSC = 1, 2, 3, 32001
BLOSC_NAMES = {0: "blosclz", 1: "lz4", 2: "lz4hc", 3: "snappy", 4: "zlib", 5: "zstd"}  # hdf5-blosc's codes
_FLETCHER_BLOCK = 360  # HDF5 reduces its sums every 360 16-bit words


def _hdf5_fletcher32():
    """HDF5's own ``H5_checksum_fletcher32`` from the libhdf5 this process's h5py loaded (found in
    /proc/self/maps), through ctypes (which releases the GIL); None when it cannot be found."""
    import ctypes

    import h5py  # noqa: F401  (loads libhdf5)

    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "libhdf5" in line and "_hl" not in line}
        for path in sorted(paths):
            fn = ctypes.CDLL(path).H5_checksum_fletcher32
            fn.restype, fn.argtypes = ctypes.c_uint32, [ctypes.c_char_p, ctypes.c_size_t]
            return fn
    except (OSError, AttributeError):
        pass
    return None


_H5_FLETCHER32 = _hdf5_fletcher32()


def fletcher32(data: bytes) -> int:
    """HDF5's Fletcher-32 of ``data``: HDF5's own function when it can be called (~30x faster),
    else ``fletcher32_numpy``."""
    if _H5_FLETCHER32 is not None:
        return _H5_FLETCHER32(data, len(data))
    return fletcher32_numpy(data)


def fletcher32_numpy(data: bytes | memoryview) -> int:
    """HDF5's ``H5_checksum_fletcher32`` of ``data``, vectorised.

    HDF5 sums big-endian 16-bit words (an odd last byte is the high byte of a last word) with
    end-around-carry reductions every 360 words. Those reductions keep each sum's value modulo
    65535 and give 0 only for a sum that is exactly 0, so without 32-bit overflow the result is
    ((s - 1) mod 65535) + 1 (0 for 0) of the exact sums s1 = sum w_i, s2 = sum (n - i + 1) w_i.
    Blocks whose second sum could pass 2**32 in HDF5's uint32 (near-0xffff words) are summed by the
    exact block loop instead.
    """
    buf = bytes(data) + (b"\0" if len(data) % 2 else b"")
    w = np.frombuffer(buf, dtype=">u2").astype(np.int64)  # (n,)
    n = len(w)
    if n == 0:
        return 0
    pad = -n % _FLETCHER_BLOCK
    blocks = np.concatenate([w, np.zeros(pad, np.int64)]).reshape(-1, _FLETCHER_BLOCK)  # (B, 360)
    ramp = np.arange(_FLETCHER_BLOCK, 0, -1, dtype=np.int64)  # weights 360 .. 1 within a block
    worst = blocks @ ramp + 361 * 0x1FFFE  # block sum of sum1's, started from the largest reduced sums
    if worst.max() < 2**32:
        s1 = int(w.sum())
        s2 = int((w * np.arange(n, 0, -1, dtype=np.int64)).sum())
        return (_ones(s2) << 16) | _ones(s1)
    return _fletcher32_loop(w)


def _ones(s: int) -> int:
    return 0 if s == 0 else (s - 1) % 65535 + 1


def _fletcher32_loop(w: np.ndarray) -> int:
    """HDF5's loop, block by block (uint32 arithmetic emulated)."""
    sum1 = sum2 = 0
    for k in range(0, len(w), _FLETCHER_BLOCK):
        for word in w[k:k + _FLETCHER_BLOCK].tolist():
            sum1 = (sum1 + word) & 0xFFFFFFFF
            sum2 = (sum2 + sum1) & 0xFFFFFFFF
        sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
        sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
    sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    return (sum2 << 16) | sum1


def digest(chunk: bytes) -> int:
    """What a stored chunk is verified against after writing: xxh3-64 of its bytes."""
    return xxhash.xxh3_64_intdigest(chunk)


@dataclass(frozen=True)
class _Step:
    kind: int  # filter id
    optional: bool
    opts: tuple[int, ...]


class ChunkCodec:
    """Encode one chunk (a C-contiguous array of the dataset's dtype) -> (filter mask, bytes)."""

    def __init__(self, steps: list[_Step], typesize: int):
        self.steps, self.typesize = steps, typesize
        self._blosc = {}
        for i, s in enumerate(steps):
            if s.kind == FILTER_BLOSC:
                from numcodecs import Blosc

                clevel, shuffle, code = s.opts[4:7] if len(s.opts) >= 7 else (5, 1, 0)  # hdf5-blosc cd_values
                self._blosc[i] = Blosc(cname=BLOSC_NAMES[code], clevel=clevel, shuffle=shuffle, blocksize=0)

    @classmethod
    def for_dataset(cls, dset) -> ChunkCodec | None:
        """The dataset's filter pipeline as a codec, or None when it has a filter this module does
        not implement (lzf, szip, scale-offset, ...)."""
        plist = dset.id.get_create_plist()
        steps = []
        for i in range(plist.get_nfilters()):
            kind, flags, opts, _ = plist.get_filter(i)
            if kind not in (FILTER_DEFLATE, FILTER_SHUFFLE, FILTER_FLETCHER32, FILTER_BLOSC):
                return None
            steps.append(_Step(kind, bool(flags & 1), tuple(int(o) for o in opts)))  # H5Z_FLAG_OPTIONAL
        return cls(steps, dset.dtype.itemsize)

    @property
    def has_fletcher32(self) -> bool:
        return any(s.kind == FILTER_FLETCHER32 for s in self.steps)

    def encode(self, chunk: np.ndarray) -> tuple[int, bytes]:
        data, mask = np.ascontiguousarray(chunk).tobytes(), 0
        for i, step in enumerate(self.steps):
            out = self._apply(i, step, data)
            if out is None:  # an optional filter that would not shrink the chunk: skipped, flagged
                mask |= 1 << i
            else:
                data = out
        return mask, data

    def _apply(self, i: int, step: _Step, data: bytes) -> bytes | None:
        if step.kind == FILTER_FLETCHER32:
            return data + fletcher32(bytes(data)).to_bytes(4, "little")
        if step.kind == FILTER_SHUFFLE:
            n = len(data) // self.typesize * self.typesize
            body = np.frombuffer(data, np.uint8, n).reshape(-1, self.typesize).T.tobytes()
            return body + data[n:]
        if step.kind == FILTER_DEFLATE:  # HDF5 gives zlib room to grow: never skipped
            return zlib.compress(data, step.opts[0] if step.opts else 6)
        else:  # blosc: its shuffle works on elements of the dataset's type size (hdf5-blosc's cd_values[2])
            size = step.opts[2] if len(step.opts) > 2 and step.opts[2] else self.typesize
            out = self._blosc[i].encode(np.frombuffer(data, np.dtype(f"u{size}")) if size in (1, 2, 4, 8) else data)
        return None if len(out) > len(data) and step.optional else out


class HashLane:
    """A hash fed in order by one background thread: ``update(buf)`` returns at once (``buf`` must
    not change afterwards), ``hexdigest()`` waits for the queue. hashlib releases the GIL, so the
    SHA-256s of a conversion run beside the reading and compressing instead of after them."""

    DEPTH = 2  # slabs queued per hash

    def __init__(self, hasher):
        import collections
        from concurrent.futures import ThreadPoolExecutor

        self.hasher = hasher
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="hpc-hash")
        self._last = None
        self._queued = collections.deque()

    def update(self, buf) -> None:
        """Queue ``buf``; at most ``DEPTH`` buffers wait (the caller waits for the oldest), so a
        hash that falls behind on a loaded machine holds a few slabs, not the file."""
        self._queued.append(self._thread.submit(self.hasher.update, buf))
        self._last = self._queued[-1]
        while len(self._queued) > self.DEPTH:
            self._queued.popleft().result()

    def update_now(self, buf) -> None:
        """For buffers that will not stay valid (a memory map's pages about to be released)."""
        self.wait()
        self.hasher.update(buf)

    def wait(self) -> None:
        if self._last is not None:
            self._last.result()

    def hexdigest(self) -> str:
        self.wait()
        self._thread.shutdown()
        return self.hasher.hexdigest()

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)
