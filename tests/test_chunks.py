"""Chunks encoded in Python (hpc.io.chunks) are what HDF5's own filter pipeline stores, and a
written shard is verified from the digests of its chunks.

Reference: the same array written through h5py's pipeline (hdf5plugin's blosc, deflate, shuffle,
fletcher32), compared chunk by chunk with read_direct_chunk, and read back by plain h5py."""
from __future__ import annotations

import h5py
import hdf5plugin
import numpy as np
import pytest

from hpc.io.chunks import _H5_FLETCHER32, ChunkCodec, HashLane, _fletcher32_loop, fletcher32, fletcher32_numpy
from hpc.io.h5write import COMPRESSIONS, ShardWriter, compression_kwargs
from hpc.io.shards import verify_shard

PIPELINES = {
    "blosc lz4 shuffle": dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=1)),
    "blosc lz4 bitshuffle": dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=2)),
    "gzip": dict(compression="gzip", compression_opts=4),
    "shuffle + gzip": dict(compression="gzip", compression_opts=4, shuffle=True),
    "none": {},
}


@pytest.mark.parametrize("n", [0, 1, 2, 3, 719, 720, 721, 4001])
def test_fletcher32_closed_form_equals_hdf5s_loop_and_hdf5s_function(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    words = np.frombuffer(data + b"\0" * (n % 2), ">u2").astype(np.int64)
    assert fletcher32_numpy(data) == _fletcher32_loop(words) == fletcher32(data)
    ones = b"\xff" * n  # the overflow-prone extreme takes the exact loop
    assert fletcher32_numpy(ones) == _fletcher32_loop(np.frombuffer(ones + b"\0" * (n % 2), ">u2").astype(np.int64))
    assert fletcher32(ones) == fletcher32_numpy(ones)


def test_hdf5s_own_checksum_is_found():
    assert _H5_FLETCHER32 is not None  # h5py's libhdf5 exports it (else the slower numpy path runs)


def _arrays():
    rng = np.random.default_rng(0)
    yield "poisson u2", rng.poisson(20, (4, 24, 34)).astype("<u2")
    yield "float f4", rng.normal(0, 1, (4, 24, 34)).astype("<f4")
    yield "incompressible u2", rng.integers(0, 2**16, (4, 24, 34)).astype("<u2")  # filters skipped, flagged


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
@pytest.mark.parametrize("fletcher", [False, True])
def test_encoded_chunks_are_the_bytes_hdf5_stores(tmp_path, pipeline, fletcher):
    for what, a in _arrays():
        path = tmp_path / f"{what}.h5"
        with h5py.File(path, "w") as f:
            kw = dict(chunks=(1, *a.shape[1:]), fletcher32=fletcher, **PIPELINES[pipeline])
            f.create_dataset("h5py", data=a, **kw)
            d = f.create_dataset("direct", a.shape, a.dtype, **kw)
            codec = ChunkCodec.for_dataset(d)
            assert codec.has_fletcher32 == fletcher
            for k in range(len(a)):
                mask, chunk = codec.encode(a[k])
                d.id.write_direct_chunk((k, 0, 0), chunk, filter_mask=mask)
        with h5py.File(path, "r") as f:  # plain h5py + hdf5plugin read it back
            for k in range(len(a)):
                assert f["direct"].id.read_direct_chunk((k, 0, 0)) == f["h5py"].id.read_direct_chunk((k, 0, 0)), \
                    (what, k)
            assert np.array_equal(f["direct"][()], a), what


def test_lzf_has_no_python_codec_and_goes_through_h5py(tmp_path):
    with h5py.File(tmp_path / "l.h5", "w") as f:
        d = f.create_dataset("d", (2, 4, 4), "u2", chunks=(1, 4, 4), compression="lzf")
        assert ChunkCodec.for_dataset(d) is None


def _write(path, data, compression, pool=None):
    arrays = {"target": (data.shape, data.dtype), "tof": ((len(data),), np.int32)}
    with ShardWriter(path, arrays, compression, {"format": "hpc-sinogram", "format_version": 1}, pool) as w:
        w.write(0, target=data[:3], tof=np.zeros(3, np.int32))
        w.write(3, target=data[3:], tof=np.zeros(len(data) - 3, np.int32))
        return w.commit()


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_shards_from_the_thread_pool_equal_serial_ones_and_read_back(tmp_path, compression):
    from concurrent.futures import ThreadPoolExecutor

    data = np.random.default_rng(1).poisson(9, (7, 12, 10)).astype("<u2")
    with ThreadPoolExecutor(2) as pool:
        a = _write(tmp_path / "pool.h5", data, compression, pool)
    b = _write(tmp_path / "serial.h5", data, compression)
    assert a["sha256"] == b["sha256"] and a["max"] == b["max"] == {"target": float(data.max())}
    for p in ("pool.h5", "serial.h5"):
        assert verify_shard(tmp_path / p) == (True, "")
        with h5py.File(tmp_path / p, "r") as f:
            assert np.array_equal(f["target"][()], data)
    if compression != "lzf":  # lzf's bytes are not reproducible (FORMAT.md)
        assert (tmp_path / "pool.h5").read_bytes() == (tmp_path / "serial.h5").read_bytes()


def test_verification_from_chunk_digests_catches_a_changed_chunk(tmp_path, monkeypatch):
    """A chunk whose stored bytes differ from what was encoded (here: the writer is made to
    store a corrupted copy) fails the commit's verification, and no shard appears."""
    import hpc.io.h5write as S
    from hpc.errors import OutputError

    data = np.random.default_rng(2).poisson(9, (5, 12, 10)).astype("<u2")
    real = S.ShardWriter._drain

    def corrupting_drain(self):
        for i, (name, k, job) in enumerate(self._pending):
            mask, chunk = job.result()
            if k == 3:  # what a bad disk or a bug between encoder and file would do
                self._digests[name][k] = (mask, len(chunk), S.digest(chunk))
                self._ids[name].write_direct_chunk((k, 0, 0), chunk[:-1] + bytes([chunk[-1] ^ 1]), filter_mask=mask)
                self._pending[i] = (name, k, None)
        self._pending = [p for p in self._pending if p[2] is not None]
        real(self)

    monkeypatch.setattr(S.ShardWriter, "_drain", corrupting_drain)
    with pytest.raises(OutputError, match="chunk 3 differs from what was written"):
        _write(tmp_path / "bad.h5", data, "blosc")
    assert not (tmp_path / "bad.h5").exists()


def test_hash_lane_equals_a_plain_hash():
    import hashlib

    parts = [np.random.default_rng(i).integers(0, 255, 1000 + i, dtype=np.uint8) for i in range(20)]
    lane = HashLane(hashlib.sha256())
    for p in parts:
        lane.update(p)
    lane.update_now(b"tail")
    assert lane.hexdigest() == hashlib.sha256(b"".join(p.tobytes() for p in parts) + b"tail").hexdigest()


def test_compression_names_cover_the_codecs():
    for name in COMPRESSIONS:
        assert isinstance(compression_kwargs(name), dict)


def test_hash_lane_holds_at_most_a_few_buffers():
    """A hash that falls behind (a loaded machine) makes the caller wait instead of queueing every
    slab of the file (peak RSS flat in the file size)."""
    import hashlib
    import threading

    class Slow:
        def __init__(self):
            self.done, self.h = 0, hashlib.sha256()

        def update(self, buf):
            threading.Event().wait(0.01)
            self.h.update(buf)
            self.done += 1

        def hexdigest(self):
            return self.h.hexdigest()

    slow, want = Slow(), hashlib.sha256()
    lane = HashLane(slow)
    for k in range(20):
        buf = bytes([k]) * 1000
        lane.update(buf)
        want.update(buf)
        assert (k + 1) - slow.done <= HashLane.DEPTH + 1  # the one being hashed + DEPTH queued
    assert lane.hexdigest() == want.hexdigest()
