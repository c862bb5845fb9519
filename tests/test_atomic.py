"""The one atomic writer (hpc.io.atomic): unpredictable exclusive temporary names that never follow
a symlink, umask permissions, disk errors as one line naming the file, nothing partial, the old
target intact after a crash."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
import torch

from hpc.errors import OutputError
from hpc.io import atomic
from hpc.io.atomic import AtomicFile, atomic_open, atomic_path, atomic_write_text
from hpc.io.h5write import RepairedH5Writer, ShardWriter
from hpc.io.shards import FORMAT
from hpc.io.sinogram import SinogramWriter
from hpc.io.spec import raw_spec


def hidden(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_temporary_names_are_unpredictable_and_hidden(tmp_path):
    names = set()
    for _ in range(3):
        with AtomicFile(tmp_path / "out.txt") as af:
            names.add(af.tmp.name)
            assert af.tmp.parent == tmp_path and af.tmp.name.startswith(".out.txt.") and af.tmp.name.endswith(".tmp")
    assert len(names) == 3 and hidden(tmp_path) == []


def test_planted_symlinks_are_never_written_through(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    # every name an attacker could predict: the old fixed name, the next random name, the target
    draws = iter(["a" * 16, "b" * 16])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(draws))
    for name in (".out.txt.tmp", f".out.txt.{'a' * 16}.tmp", "out.txt"):
        (tmp_path / name).symlink_to(victim)
    atomic_write_text(tmp_path / "out.txt", "new")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "out.txt").is_symlink() and (tmp_path / "out.txt").read_text() == "new"
    assert (tmp_path / f".out.txt.{'a' * 16}.tmp").is_symlink()  # not ours: left alone, not followed
    assert not (tmp_path / f".out.txt.{'b' * 16}.tmp").exists()  # ours: renamed away


def test_h5_output_refuses_a_planted_temporary_symlink(tmp_path, monkeypatch):
    """Issue 12.3: a symlink at `.<name>.tmp` made predict --format h5 overwrite an arbitrary file."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"x" * 100)
    draws = iter(["c" * 16, "d" * 16])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(draws))
    for name in (".r.h5.tmp", f".r.h5.{'c' * 16}.tmp"):
        (tmp_path / name).symlink_to(victim)
    spec = raw_spec(_raw(tmp_path / "in.raw"), (1, 2, 4, 6), "uint16")
    with RepairedH5Writer(spec, tmp_path / "r.h5", "test") as w:
        w.write(0, np.ones((2, 4, 6), np.uint16))
        w.commit()
    assert victim.read_bytes() == b"x" * 100
    with h5py.File(tmp_path / "r.h5", "r") as f:
        assert f["repaired"][()].sum() == 48


def _raw(path, n=2, v=4, x=6):
    np.arange(n * v * x, dtype="<u2").tofile(path)
    return path


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_permissions_follow_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        spec = raw_spec(_raw(tmp_path / "in.raw"), (1, 2, 4, 6), "uint16")
        outs = [atomic_write_text(tmp_path / "a.txt", "x")]
        with atomic_open(tmp_path / "c.pt") as fh:
            torch.save({"w": torch.zeros(2)}, fh)
        outs.append(tmp_path / "c.pt")
        for cls, name in ((RepairedH5Writer, "r.h5"), (SinogramWriter, "r.raw")):
            with cls(spec, tmp_path / name, "test") as w:  # were 0600 (mkstemp) before
                w.write(0, np.zeros((2, 4, 6), np.uint16))
                outs.append(w.commit())
        with ShardWriter(tmp_path / "s.h5", {"tof": ((2,), np.int32)}, "none", {"format": FORMAT}) as w:
            w.write(0, tof=np.zeros(2, np.int32))
            w.commit()
        outs.append(tmp_path / "s.h5")
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in outs} == {p.name: oct(mode) for p in outs}


def _fill(kind, target, src):
    if kind == "text":
        atomic_write_text(target, "x" * 3_000_000)
    elif kind == "torch":
        with atomic_open(target) as fh:
            torch.save({"w": torch.zeros(800_000)}, fh)  # torch wraps ENOSPC in a RuntimeError
    elif kind == "h5":
        spec = raw_spec(_raw(src / "in.raw", 40, 100, 100), (1, 40, 100, 100), "uint16")
        with RepairedH5Writer(spec, target, "test") as w:
            for k in range(40):
                w.write(k, np.full((1, 100, 100), k, np.uint16))
            w.commit()
    elif kind == "sinogram":  # space is reserved up front: the error comes before any write
        spec = raw_spec(_raw(src / "in.raw", 40, 100, 100), (1, 40, 100, 100), "uint16")
        with SinogramWriter(spec, target, "test") as w:
            w.write(0, np.zeros((40, 100, 100), np.uint16))
            w.commit()
    elif kind == "shard":
        with ShardWriter(target, {"target": ((40, 100, 100), np.uint16)}, "none", {"format": FORMAT}) as w:
            for k in range(40):
                w.write(k, target=np.full((1, 100, 100), k, np.uint16))
            w.commit()


@pytest.mark.parametrize("kind", ["text", "torch", "h5", "sinogram", "shard"])
def test_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, tmpfs, kind):
    disk = tmpfs("256k")
    target = disk / "out" / f"x.{kind}"
    with pytest.raises(OutputError) as err:
        _fill(kind, target, tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{target}: no space left on device") and "\n" not in msg, msg
    assert list((disk / "out").iterdir()) == []  # no temporary file, no target


def test_read_only_filesystem_is_one_line(tmpfs):
    disk = tmpfs("64k", readonly=True)
    with pytest.raises(OutputError, match=r"x\.txt: read-only file system"):
        atomic_write_text(disk / "x.txt", "x")


def test_an_error_while_writing_keeps_the_old_target(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="crashed"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crashed")
    assert target.read_bytes() == b"old" and hidden(tmp_path) == []


def test_kill_9_mid_write_leaves_the_old_target_intact(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old" * 1000)
    code = textwrap.dedent(f"""
        import os, sys, time
        from hpc.io.atomic import AtomicFile
        af = AtomicFile({str(target)!r})
        os.write(af.fd, b"new" * 100000)
        print("written", flush=True)
        time.sleep(60)
        af.commit()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "written"
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert target.read_bytes() == b"old" * 1000
    left = hidden(tmp_path)  # a killed process cannot clean up; its temporary file stays hidden
    assert len(left) == 1 and left[0].startswith(".data.bin.") and left[0].endswith(".tmp")


def test_a_swapped_temporary_name_is_not_renamed_onto_the_target(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(OutputError, match="replaced while writing"), AtomicFile(target) as af:
        os.write(af.fd, b"mine")
        os.unlink(af.tmp)
        (tmp_path / "evil").write_text("evil")
        os.symlink(tmp_path / "evil", af.tmp)
        time.sleep(0)
        af.commit()
    assert not target.exists() and (tmp_path / "evil").read_text() == "evil"
