"""Writing HDF5: shards (:class:`ShardWriter`, the codecs ``--compression`` names) and ``hpc predict``'s
repaired ``.h5`` (:class:`RepairedH5Writer`). The format is in docs/FORMAT.md; reading and
verifying shards is :mod:`hpc.io.shards`.

:class:`ShardWriter` fills a hidden temporary file slab by slab, records a SHA-256 of every
dataset's values, re-reads and verifies it, then renames it into place.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from hpc.errors import OutputError
from hpc.io.atomic import AtomicFile, output_error
from hpc.io.chunks import ChunkCodec, HashLane, digest
from hpc.io.shards import verify_shard

# blosc*: hdf5plugin's Blosc filter (readers need `import hdf5plugin`): blosc = lz4 + byte shuffle,
# blosc-bitshuffle = lz4 + bit shuffle, blosc-zstd = zstd level 1 + bit shuffle. The default is
# chosen by measurement on Poisson counts (bench/codecs.py, docs/BENCHMARKS.md).
COMPRESSIONS = ("none", "lzf", "gzip", "blosc", "blosc-bitshuffle", "blosc-zstd")
DEFAULT_COMPRESSION = "blosc"


def compression_kwargs(name: str) -> dict:
    """h5py ``create_dataset`` keywords for a compression name."""
    if name == "none":
        return {}
    if name == "lzf":
        return {"compression": "lzf"}
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    if name == "blosc":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    if name == "blosc-bitshuffle":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.BITSHUFFLE))
    if name == "blosc-zstd":
        return dict(hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.BITSHUFFLE))
    raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {name!r}")


def dataset_kwargs(shape: tuple[int, ...], compression: str) -> dict:
    """h5py ``create_dataset`` keywords of a shard dataset of ``shape``: per-slice arrays
    ``(N, V, X)`` are chunked one slice per chunk, compressed, then checksummed by HDF5's fletcher32 (of the
    compressed bytes; verified by HDF5 on every read of the chunk); other arrays are contiguous."""
    if len(shape) != 3:
        return {}
    return {"chunks": (1, *shape[1:]), "fletcher32": True, **compression_kwargs(compression)}


class _Done:
    """A finished result with a future's ``result()`` (encoding without a pool)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def discard(out: AtomicFile, f: h5py.File | None) -> None:
    """Give up a partly written HDF5 file ``f`` open on ``out``'s temporary file. It is emptied
    first: on a full disk HDF5's closing flush would fail again and print tracebacks; with the space
    freed it closes cleanly, then the temporary file goes."""
    if f is not None and f.id.valid:
        with contextlib.suppress(OSError):
            os.ftruncate(out.fd, 0)
        with contextlib.suppress(Exception):
            f.close()
    out.abort()


class ShardWriter:
    """Write one shard (slices of one study) in slabs to a temporary file, then
    verify and rename. ``arrays`` maps dataset name -> (shape, dtype); ``attrs`` are root
    attributes. Leaving the ``with`` block without ``commit()`` removes the temporary file.

    How a shard is made (what another writer must reproduce, see FORMAT.md): per-slice datasets
    ``(N, V, X)`` get chunks ``(1, V, X)`` and the filter pipeline compression then fletcher32
    (``dataset_kwargs``: h5py adds the checksum last), so each stored chunk is the compressed bytes
    plus the Fletcher-32 of those bytes; ``(V, X)`` masks and ``(N,)`` metadata are contiguous (no
    filters); every dataset's ``sha256`` attribute is of its whole little-endian values.

    Slices of datasets whose filters hpc.io.chunks implements are encoded by ``pool``'s threads and
    written with ``write_direct_chunk`` (the bytes HDF5's own pipeline would store); each chunk's
    xxh3 digest is kept, and after closing, the file's raw chunks are read back and compared with
    them: the verification reads the compressed bytes once and decompresses nothing. Datasets
    without such a codec (lzf) go through h5py and are verified by their values' SHA-256."""

    def __init__(self, path: Path, arrays: dict[str, tuple[tuple[int, ...], np.dtype]],
                 compression: str, attrs: dict, pool: ThreadPoolExecutor | None = None):
        self.path = Path(path)
        self._hash = {name: hashlib.sha256() for name in arrays}
        self._max: dict[str, float] = {}
        self._file = None
        self._out = AtomicFile(self.path)
        try:
            # No chunk cache: each slice is one whole chunk, written once, so caching gains nothing,
            # and a write error (disk full) surfaces in write() instead of at some later close.
            self._file = h5py.File(self._out.path, "w", rdcc_nbytes=0)
            for name, (shape, dtype) in arrays.items():
                self._file.create_dataset(name, shape, np.dtype(dtype).newbyteorder("<"), track_times=False,
                                          **dataset_kwargs(shape, compression))
        except OSError as exc:
            self._fail(exc)
        self._codecs = {name: codec for name, d in self._file.items()
                        if d.ndim == 3 and (codec := ChunkCodec.for_dataset(d)) is not None}
        self._digests: dict[str, list] = {name: [None] * self._file[name].shape[0] for name in self._codecs}
        self._ids = {name: d.id for name, d in self._file.items()}  # h5py's group lookup is slow per chunk
        self._dsets = {name: self._file[name] for name in arrays}  # ... and per slab (0.6 s per GB converted)
        self._dtypes = {name: d.dtype for name, d in self._dsets.items()}
        # (N,) metadata gathered here and written once by finish(): a tiny h5py write per slab cost
        # more than the slab's chunks
        self._small = {name: np.zeros(d.shape, d.dtype) for name, d in self._dsets.items() if d.ndim == 1}
        # the slice datasets' SHA-256s run in their own threads (hashlib releases the GIL)
        self._hash = {name: HashLane(h) if self._file[name].ndim == 3 else h for name, h in self._hash.items()}
        self._pending: list = []  # (dataset, slice, future) encoded, not yet written
        self._maxes: list = []  # (dataset, future of a slab's maximum)
        self._pool = pool  # the caller's threads (None: encode in this thread)
        self._attrs = dict(attrs)  # written by commit(): the same bytes whenever their values are known
        self._sums: dict[str, str] | None = None  # set by finish()

    @property
    def tmp(self) -> Path:
        """The temporary file's real name (hidden, random, in the shard's directory)."""
        return self._out.tmp

    def write(self, start: int, **slabs: np.ndarray) -> None:
        """``write(k, target=(n, V, X), tof=(n,), ...)``: slices ``[k, k+n)`` of the named datasets.
        Slabs must arrive in order (the checksums are computed as they stream). A dataset without
        a slice axis (a ``(V, X)`` mask) is written whole with ``start=0``."""
        try:
            self._drain()  # the previous slab's chunks: encoded meanwhile by the pool
            for name, slab in slabs.items():
                slab = np.ascontiguousarray(slab, dtype=self._dtypes[name])  # hash what is stored
                if name in self._codecs:
                    codec = self._codecs[name]
                    for i, one in enumerate(slab):
                        job = (self._pool.submit(codec.encode, one) if self._pool else _Done(codec.encode(one)))
                        self._pending.append((name, start + i, job))
                elif name in self._small:
                    self._small[name][start:start + len(slab)] = slab
                elif slab.ndim == 2:  # a (V, X) mask shared by all slices
                    self._dsets[name][...] = slab
                else:
                    self._dsets[name][start:start + len(slab)] = slab
                self._hash[name].update(slab)
                if name in ("target", "input") and slab.size:  # (in a pool thread when there is one)
                    self._maxes.append((name, self._pool.submit(slab.max) if self._pool else _Done(slab.max())))
        except OSError as exc:
            self._fail(exc)

    def _drain(self) -> None:
        """Write the encoded chunks in order (h5py calls stay in this thread)."""
        for name, job in self._maxes:
            self._max[name] = max(self._max.get(name, -np.inf), float(job.result()))
        self._maxes = []
        for name, k, job in self._pending:
            mask, chunk = job.result()
            self._ids[name].write_direct_chunk((k, 0, 0), chunk, filter_mask=mask)
            self._digests[name][k] = (mask, len(chunk), digest(chunk))
        self._pending = []

    def _verify_chunks(self) -> tuple[bool, str]:
        """The closed file's stored chunks against the digests of what was written; other datasets
        by their values' SHA-256 (verify_shard)."""
        try:
            with h5py.File(self._out.path, "r") as f:
                for name, want in self._digests.items():
                    dset = f[name]
                    for k, (mask, size, dig) in enumerate(want):
                        got_mask, chunk = dset.id.read_direct_chunk((k, 0, 0))
                        if (got_mask, len(chunk), digest(chunk)) != (mask, size, dig):
                            return False, f"dataset {name!r}: chunk {k} differs from what was written"
        except (OSError, KeyError, TypeError) as exc:
            return False, f"unreadable: {exc}"
        return verify_shard(self._out.path, skip=set(self._digests))

    def finish(self) -> None:
        """Every slice is written: the datasets' checksum and maximum attributes, then the file is
        closed (its HDF5 memory goes). A converter that learns the root attributes later (the
        source's checksum) keeps many finished shards without holding them open."""
        if self._sums is not None:
            return
        try:
            self._drain()
            for name, values in self._small.items():
                self._dsets[name][...] = values
            self._sums = {name: h.hexdigest() for name, h in self._hash.items()}
            for name, value in self._sums.items():
                self._file[name].attrs["sha256"] = value
                if name in self._max:
                    self._file[name].attrs["max"] = self._max[name]
            self._file.close()
        except OSError as exc:
            self._fail(exc)

    def commit(self, attrs: dict | None = None) -> dict:
        """Finish, add the root attributes (``attrs``: those known only now), verify, rename.
        Returns {"sha256": {name: hex}, "max": {name: value}, "bytes": n}."""
        self.finish()
        try:
            with h5py.File(self._out.path, "r+") as f:  # the same steps whenever the values are known
                for key, value in {**self._attrs, **(attrs or {})}.items():
                    f.attrs[key] = value
        except OSError as exc:
            self._fail(exc)
        ok, why = self._verify_chunks()
        if not ok:
            self.abort()
            raise OutputError(f"{self.path}: verification after writing failed: {why}")
        self._out.commit()
        return {"sha256": self._sums, "max": dict(self._max), "bytes": self.path.stat().st_size}

    def _fail(self, exc: OSError) -> None:
        self.abort()
        raise output_error(self.path, exc, "shard not written") or \
            OutputError(f"{self.path}: cannot write shard: {str(exc).splitlines()[0]}") from None

    def abort(self) -> None:
        for h in getattr(self, "_hash", {}).values():
            if isinstance(h, HashLane):
                h.close()
        for _, _, job in getattr(self, "_pending", []):
            if hasattr(job, "cancel"):
                job.cancel()
        self._pending = []
        discard(self._out, self._file)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


class RepairedH5Writer:
    """``repaired`` (N, V, X) in the source dtype plus tof/segment/axial, renamed into place on
    commit (through the atomic writer: nothing at ``path`` until every slice is written)."""

    def __init__(self, spec, path: Path, comment: str):  # spec: hpc.io.spec.SinogramSpec
        self.path = Path(path)
        self.f = None
        self._out = AtomicFile(self.path)
        try:
            self.f = h5py.File(self._out.path, "w", rdcc_nbytes=0)
            self.f.attrs.update({"format": "hpc-repaired", "axes": "slice,view,bin",
                                 "source": str(spec.source), "comment": comment})
            self.ds = self.f.create_dataset("repaired", (spec.num_slices, *spec.slice_shape),
                                            dtype=spec.dtype.newbyteorder("<"), chunks=(1, *spec.slice_shape),
                                            fletcher32=True)
            for name, values in zip(("tof", "segment", "axial"), spec.meta(), strict=True):
                self.f.create_dataset(name, data=values)
        except OSError as exc:
            self._fail(exc)

    def write(self, start: int, slices: np.ndarray) -> None:
        try:
            self.ds[start:start + len(slices)] = slices
        except OSError as exc:
            self._fail(exc)

    def commit(self) -> Path:
        try:
            self.f.close()
        except OSError as exc:
            self._fail(exc)
        return self._out.commit()

    def _fail(self, exc: OSError) -> None:
        self.abort()
        raise output_error(self.path, exc) or \
            OutputError(f"{self.path}: cannot write: {str(exc).splitlines()[0]}") from None

    def abort(self) -> None:
        discard(self._out, self.f)

    def __enter__(self) -> RepairedH5Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()
