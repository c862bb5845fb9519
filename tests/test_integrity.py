"""Integrity on read and the guards behind issue 12, at the library level: per-chunk fletcher32
(and the helper for writers that bypass HDF5's filters), checkpoint payload checksums and finite
weights with fallback, the run-directory lock, bounded YAML. The command-line cases are in
tests/test_hostile.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from hpc.errors import ConfigError, InputError, OutputError
from hpc.io.chunks import fletcher32_numpy
from hpc.io.h5write import ShardWriter
from hpc.io.shards import FORMAT, read_slab
from hpc.train import checkpoint as ck
from hpc.train import runlock

from helpers import flip_chunk_byte, make_checkpoint


# ---------------------------------------------------------------- shards
@pytest.mark.parametrize("compression", ["none", "lzf", "gzip", "blosc"])
def test_fletcher32_helper_equals_what_hdf5_stores(tmp_path, compression):
    """For issue 15's write_direct_chunk: the 4 bytes HDF5 appends to each (compressed) chunk."""
    rng = np.random.default_rng(1)
    data = rng.poisson(20, (3, 7, 9)).astype("<u2")  # 126 bytes per slice; zeros and odd sizes below
    data[2] = 0
    with ShardWriter(tmp_path / "s.h5", {"target": (data.shape, data.dtype), "odd": ((3, 1, 5), np.uint8)},
                     compression, {"format": FORMAT}) as w:
        w.write(0, target=data, odd=np.arange(15, dtype=np.uint8).reshape(3, 1, 5))
        w.commit()
    with h5py.File(tmp_path / "s.h5", "r") as f:
        for name in ("target", "odd"):
            for k in range(3):
                _, raw = f[name].id.read_direct_chunk((k, 0, 0))
                assert fletcher32_numpy(raw[:-4]).to_bytes(4, "little") == raw[-4:], (name, k)


def test_read_slab_names_shard_dataset_and_slice(tmp_path):
    data = np.arange(5 * 4 * 6, dtype="<u2").reshape(5, 4, 6)
    with ShardWriter(tmp_path / "s.h5", {"target": (data.shape, data.dtype)}, "none", {"format": FORMAT}) as w:
        w.write(0, target=data)
        w.commit()
    flip_chunk_byte(tmp_path / "s.h5", "target", 3)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert np.array_equal(read_slab(f["target"], 0, 3, tmp_path / "s.h5"), data[:3])  # good chunks read
        with pytest.raises(InputError, match=r"s\.h5: dataset 'target' slice 3 \(study slice 13\) checksum mismatch"):
            read_slab(f["target"], 1, 5, tmp_path / "s.h5", first_slice=10)


# ---------------------------------------------------------------- checkpoints
def _state(tmp_path, step: int = 1) -> dict:
    make_checkpoint(tmp_path / "m.pt")
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    state["step"] = step
    return state


def test_payload_checksum_catches_a_changed_tensor_and_resume_falls_back(tmp_path):
    c = ck.Checkpointer(tmp_path / "run", keep=3)
    for step in (1, 2):
        c.save(_state(tmp_path, step), step)
    newest = c.path(2)
    state = torch.load(newest, weights_only=True)
    assert state["checksum"] == ck.payload_digest({k: v for k, v in state.items() if k != "checksum"})
    raw = bytearray(newest.read_bytes())
    tensor = next(iter(state["model"].values())).numpy().tobytes()
    raw[bytes(raw).find(tensor[:16]) + 5] ^= 1  # one bit of a stored weight: still a valid zip and pickle
    newest.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="payload checksum mismatch"):
        ck.load(newest)
    reports = []
    got, path = c.resume(report=reports.append)
    assert path == c.path(1) and got["step"] == 1 and "checksum mismatch" in reports[0]
    assert newest.with_name(newest.name + ".bad").exists() and not newest.exists()  # out of the rotation


def test_non_finite_weights_are_never_saved_and_never_resumed(tmp_path):
    c = ck.Checkpointer(tmp_path / "run", keep=1)
    c.save(_state(tmp_path, 1), 1)
    bad = _state(tmp_path, 2)
    next(iter(bad["model"].values()))[0] = float("nan")
    with pytest.raises(ck.NonFiniteError, match=r"step 2: model\.\S+ holds NaN or inf; checkpoint not written"):
        c.save(bad, 2)
    assert [p.name for p in c.list()] == ["step-00000001.pt"]  # keep=1: the finite one survives
    torch.save(bad, c.path(3))  # written by an older version, before the guard
    reports = []
    got, path = c.resume(report=reports.append)
    assert path == c.path(1) and "not finite" in reports[0]


def test_rotation_never_deletes_the_file_it_just_wrote(tmp_path):
    c = ck.Checkpointer(tmp_path / "run", keep=1)
    c.save(_state(tmp_path, 5), 5)
    (c.dir / "step-00000009.pt").write_bytes(b"corrupt, from a crashed run")
    c.save(_state(tmp_path, 6), 6)  # sorts after step 9, but is the newest good one
    assert c.path(6).exists()


def test_every_checkpoint_unreadable_says_starting_fresh(tmp_path):
    c = ck.Checkpointer(tmp_path / "run")
    c.dir.mkdir(parents=True)
    c.path(1).write_bytes(b"junk")
    reports = []
    assert c.resume(report=reports.append) == (None, None)
    assert reports[-1].endswith("starting fresh")


# ---------------------------------------------------------------- run-directory lock
def _holder(run_dir, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / runlock.NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                     "start": runlock._start_time(os.getpid()), "job": "",
                                                     "restart": 0, "since": "then", **fields}))


def test_a_live_holder_is_refused_naming_host_pid_and_job(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _holder(tmp_path, pid=sleeper.pid, start=runlock._start_time(sleeper.pid), job="4242")
        with pytest.raises(OutputError, match=rf"pid {sleeper.pid} on {socket.gethostname()}, Slurm job 4242"):
            runlock.RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("case", ["dead pid", "reused pid", "requeued job"])
def test_a_dead_holder_is_taken_over_with_a_message(tmp_path, monkeypatch, case):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    fields = {"dead pid": {"pid": int(dead)}, "reused pid": {"start": "1"},  # our pid, another start time
              "requeued job": {"host": "othernode", "job": "77", "restart": 0}}[case]
    if case == "requeued job":
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _holder(tmp_path, **fields)
    reports = []
    with runlock.RunLock(tmp_path, report=reports.append) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert len(reports) == 1 and "taking over the lock" in reports[0]
    assert not (tmp_path / runlock.NAME).exists() and not list(tmp_path.glob(".train.lock*"))


def test_another_host_without_slurm_is_not_guessed_dead(tmp_path):
    _holder(tmp_path, host="othernode", pid=1)
    with pytest.raises(OutputError, match="another hpc train is using this run directory"):
        runlock.RunLock(tmp_path).acquire()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    lock = runlock.RunLock(tmp_path).acquire()
    _holder(tmp_path, pid=1)  # taken over meanwhile by someone else
    lock.release()
    assert (tmp_path / runlock.NAME).exists()


# ---------------------------------------------------------------- bounded YAML
def test_yaml_expansion_is_bounded():
    from hpc.io.yamlsafe import load_yaml

    laughs = "a: &a [1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True))
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        load_yaml(laughs, "x.yaml", ConfigError)
    assert load_yaml("a: &x [1, 2]\nb: *x\n", "ok.yaml") == {"a": [1, 2], "b": [1, 2]}  # aliases themselves are fine
