"""Issue 27, part 2: hangs on special files, bounded configs, one line instead of a traceback or
warnings, and nothing left behind (temporary files of killed writers, skeletons of failed starts).

Cases that could hang or allocate run `python -m hpc` in a child with a timeout (and an
address-space limit where memory is the point): on the old code they hung or died with a
traceback, which is what these tests catch.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc.cli import main
from hpc.io.sinogram import write_sinogram

from helpers import (
    AXIAL,
    ROOT,
    TINY,
    V,
    X,
    flip_chunk_byte,
    hidden_temporaries,
    hpc_cmd,
    make_checkpoint,
    make_dataset,
    refuse,
    refuse_subprocess,
    snapshot,
    study,
)

LOUD = {"PYTHONWARNINGS": "default"}  # library warnings shown, as a user sees them


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A gapped Siemens study with its mask, a float mask with a NaN, a tiny checkpoint and the
    study converted; shared read-only."""
    w = tmp_path_factory.mktemp("world")
    study(w, "siemens", "<u2")  # in_siemens.s.hdr/.s, mask_siemens.s.hdr/.s
    fmask = (np.random.default_rng(0).random((1, sum(AXIAL), V, X)) > 0.2).astype("<f4")
    fmask[0, 3, 2, 2] = np.nan
    write_sinogram(w / "nanmask", fmask, axial_counts=AXIAL)
    make_checkpoint(w / "m.pt")
    assert main(["convert", "--quiet", str(w / "in_siemens.s.hdr"), "--mask", str(w / "mask_siemens.s.hdr"),
                 "-o", str(w / "ds"), "--compression", "none"]) == 0
    return w


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("train") / "ds", studies=3, views=16, bins=16, mask=True, counts=True)


def train_args(data: Path, run: Path, *overrides: str) -> list:
    return ["train", "--config", TINY, f"data.path={data}", f"train.run_dir={run}", *overrides]


def predict(world: Path, *args, checkpoint: Path | None = None) -> list:
    return ["predict", "--checkpoint", checkpoint or world / "m.pt", "--quiet", "--device", "cpu", *args]


def repair(world: Path, out: Path, checkpoint: Path | None = None) -> list:
    """predict of the world's study with its mask into ``out``."""
    return predict(world, world / "in_siemens.s.hdr", "--mask", world / "mask_siemens.s.hdr", "-o", out,
                   checkpoint=checkpoint)


# ---------------------------------------------------------------- 27.6: special files are refused, not waited on
def test_a_fifo_as_checkpoint_or_shard_is_refused(world, tmp_path):
    """`hpc predict --checkpoint ck/fifo.pt` and `hpc inspect o/fifo.h5` blocked forever in open()."""
    os.mkfifo(tmp_path / "fifo.pt")
    os.mkfifo(tmp_path / "fifo.h5")
    refuse_subprocess(repair(world, tmp_path / "o.s.hdr", tmp_path / "fifo.pt"), sources=[world],
                      outputs=[tmp_path / "o.s.hdr"], names=[tmp_path / "fifo.pt"],
                      words=["named pipe"], timeout=60)
    refuse_subprocess(["inspect", tmp_path / "fifo.h5"], names=[tmp_path / "fifo.h5"], words=["named pipe"],
                      timeout=60)


def _lock(run: Path, kind: str) -> None:
    run.mkdir()
    lock = run / "train.lock"
    if kind == "fifo":
        os.mkfifo(lock)
    elif kind == "/dev/zero":
        lock.symlink_to("/dev/zero")
    else:
        lock.write_text(json.dumps({"host": os.uname().nodename, "pid": {"pid abc": "abc", "pid 1e30": 1e30}[kind],
                                    "start": "", "job": "", "restart": 0, "since": "then"}))


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "pid abc", "pid 1e30"])
def test_a_hostile_train_lock_is_one_line(train_data, tmp_path, kind):
    """A FIFO as train.lock blocked (SIGTERM did not stop it), a link to /dev/zero was read until
    MemoryError, a pid of "abc" or 1e30 was a traceback. Now one line telling what to delete."""
    run = tmp_path / "run"
    _lock(run, kind)
    refuse_subprocess(train_args(train_data, run, "train.samples=8"), sources=[train_data], names=[run / "train.lock"],
                      words=["delete it if no hpc train uses this run directory"], mem_gb=3, timeout=120)
    assert sorted(p.name for p in run.iterdir()) == ["train.lock"]


# ---------------------------------------------------------------- 27.7: one line, not a traceback
def test_a_dtype_numpy_cannot_read_is_one_line(world, tmp_path, capsys):
    """`--dtype '(-1,)u2'` (convert, predict's --mask-dtype) was a ValueError traceback."""
    raw = world / "in_siemens.s"
    refuse(capsys, ["convert", "--quiet", raw, "--shape", f"1,{sum(AXIAL)},{V},{X}", "--dtype", "(-1,)u2", "-o",
                    tmp_path / "ds"], sources=[world], outputs=[tmp_path / "ds"], names=[raw],
           words=["unknown --dtype '(-1,)u2'"])
    refuse(capsys, predict(world, raw, "--shape", f"1,{sum(AXIAL)},{V},{X}", "--dtype", "uint16", "--mask",
                           world / "mask_siemens.s", "--mask-dtype", "(-1,)u2", "-o", tmp_path / "o.raw"),
           sources=[world], outputs=[tmp_path / "o.raw"], names=[world / "mask_siemens.s"],
           words=["unknown --mask-dtype '(-1,)u2'"])


def test_a_checkpoint_whose_config_describes_a_huge_network_is_refused(world, tmp_path):
    """A valid checksum over a stored config of model.base=200000 made predict allocate 1.4 TB."""
    from hpc.train.checkpoint import load, payload_digest

    state = load(world / "m.pt")
    for base, words in ((200000, ["model.base=200000", "<= 65536"]),
                        (5, ["weights do not match its own config", "model.base=5"])):
        state["config"]["model"]["base"] = base
        path = tmp_path / f"base{base}.pt"
        torch.save({**state, "checksum": payload_digest(state)}, path)
        refuse_subprocess(repair(world, tmp_path / "o.s.hdr", path), sources=[world], outputs=[tmp_path / "o.s.hdr"],
                          names=[path], words=words, mem_gb=3,
                          timeout=120)


@pytest.mark.parametrize("override,words", [
    ("data.context=1000000000", ["data.context=1000000000", "<= 1024"]),  # 288 GB of first layer
    ("model.base=100000000", ["model.base=100000000", "<= 65536"]),
])
def test_configs_have_sizes_beyond_any_use_refused(train_data, tmp_path, capsys, override, words):
    """Were 288 GB allocation tracebacks; now the config itself is refused (validate: every loader)."""
    refuse(capsys, [*train_args(train_data, tmp_path / "run", override), "--print-config"], sources=[train_data],
           outputs=[tmp_path / "run"], words=words)


@pytest.mark.parametrize("override,words", [
    ("model.base=60000", ["model.base=60000", "parameters", "GiB, more than"]),  # fits the cap, not memory
    ("data.context=8", ["data.context=8", "must be < 8", "most planes of any segment"]),  # from the data
])
def test_configs_are_bounded_by_the_data_and_the_memory(train_data, tmp_path, override, words):
    """A width the memory cannot hold was an allocation traceback, a context deeper than any
    segment trained on copies of edge slices; now one line before anything is allocated, under a
    3 GB address-space limit."""
    run = tmp_path / "run"
    refuse_subprocess(train_args(train_data, run, override), sources=[train_data], outputs=[run], words=words,
                      mem_gb=3, timeout=120)


def test_submit_without_slurm_is_one_line_with_the_hint(train_data, tmp_path, capsys, monkeypatch):
    """Printed ~40 lines of submitit traceback ("Could not detect srun")."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    refuse(capsys, ["submit", "--config", TINY, f"data.path={train_data}", f"train.run_dir={tmp_path / 'run'}",
                    "--log-dir", tmp_path / "logs"], outputs=[tmp_path / "run", tmp_path / "logs"],
           words=["launch.cluster=slurm", "--cluster local"])


def test_submit_log_dir_that_cannot_be_used_is_one_line(train_data, tmp_path, tmpfs, capsys):
    """--log-dir /proc/sub was a FileNotFoundError traceback; a full disk was a traceback that
    left a partly written .pkl behind."""
    base = ["submit", "--config", TINY, f"data.path={train_data}", f"train.run_dir={tmp_path / 'run'}", "--cluster",
            "local"]
    refuse(capsys, [*base, "--log-dir", "/proc/sub"], outputs=[tmp_path / "run"], names=["/proc/sub"],
           words=["launch.log_dir"])
    disk = tmpfs("64k")
    (disk / "logs").mkdir()
    fd = os.open(disk / "fill", os.O_WRONLY | os.O_CREAT)  # every block taken: submitit's first write fails
    try:
        while os.write(fd, bytes(4096)):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    refuse(capsys, [*base, "--log-dir", disk / "logs"], outputs=[tmp_path / "run"], names=[disk / "logs"],
           words=["no space left on device", "nothing submitted"])
    assert list((disk / "logs").iterdir()) == []


# ---------------------------------------------------------------- 27.8: no warnings before the one line
def test_export_says_nothing_but_what_it_wrote(world, tmp_path):
    """Tracing printed TracerWarnings (and ONNX export FutureWarnings and log lines); the TorchScript
    model's parameters had requires_grad=True."""
    out = tmp_path / "m.pt"
    r = subprocess.run(hpc_cmd("export", "--checkpoint", world / "m.pt", "--format", "torchscript", "-o", out),
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, **LOUD})
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("wrote"), r.stderr
    params = list(torch.jit.load(out).parameters())
    assert params and not any(p.requires_grad for p in params)


def test_export_into_an_existing_directory_is_one_line_and_leaves_nothing(world, tmp_path):
    """Printed 6-8 TracerWarning lines, then the error after the work, and left ./.ex.<hex>.tmp."""
    (tmp_path / "ex").mkdir()
    refuse_subprocess(["export", "--checkpoint", world / "m.pt", "--format", "torchscript", "-o", "ex"],
                      names=["ex"], words=["is a directory"], cwd=tmp_path, env=LOUD, timeout=300)
    assert hidden_temporaries(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["ex"]


def test_a_damaged_checkpoint_is_one_line_without_torch_warnings(world, tmp_path):
    """torch.load warned ("Detected pickle protocol 4 ...") before the error line."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(pickle.dumps({"model": "not a tensor"}))
    refuse_subprocess(repair(world, tmp_path / "o.s.hdr", bad), sources=[world], outputs=[tmp_path / "o.s.hdr"],
                      names=[bad],
                      words=["refused", "weights only"], env=LOUD, timeout=120)


# ---------------------------------------------------------------- 27.9-10: temporary files of killed writers
WRITER = """
import os, signal, sys, time
from hpc.io.atomic import AtomicFile
af = AtomicFile(sys.argv[1])
af.write_all(b"x" * 100000)
print(af.tmp, flush=True)
if sys.argv[2] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(300)
"""


def writer(target: Path, how: str) -> tuple[subprocess.Popen, Path]:
    """A real process writing ``target`` through the atomic writer: killed (kill -9) half-way, or
    still at work; returns it and its temporary file."""
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(target), how], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    tmp = Path(p.stdout.readline().strip())
    if how == "die":
        p.wait(timeout=30)
    assert tmp.exists()
    return p, tmp


@pytest.mark.parametrize("skip", [False, True], ids=["rerun", "rerun --skip-existing"])
def test_predict_removes_what_a_killed_predict_left(world, tmp_path, capsys, skip):
    """After kill -9 of predict, the rerun (with or without --skip-existing) left the killed run's
    19.7 MB `.out.raw.<hex>.tmp` forever. A temporary file still being written is left alone."""
    out = tmp_path / "o.s.hdr"
    if skip:
        assert main([str(a) for a in repair(world, out)]) == 0
    _, dead = writer(tmp_path / "o.s", "die")
    live, busy = writer(tmp_path / "o.s", "live")
    try:
        rc = main([str(a) for a in repair(world, out) + (["--skip-existing"] if skip else [])])
        assert rc == 0, capsys.readouterr().err
        assert not dead.exists() and busy.exists()
    finally:
        live.kill()
        live.wait()
    assert (tmp_path / "o.s").stat().st_size == sum(AXIAL) * V * X * 2


def test_resume_removes_what_a_killed_save_left(tmp_path):
    from hpc.train.checkpoint import Checkpointer

    c = Checkpointer(tmp_path)
    c.dir.mkdir(parents=True)
    _, dead = writer(c.path(16), "die")
    assert c.resume() == (None, None)
    assert not dead.exists() and list(c.dir.iterdir()) == []


# ---------------------------------------------------------------- 27.11: nothing left after a failed start
def test_a_failed_convert_leaves_no_skeleton(world, tmp_path, capsys):
    """Left .hpc-dataset and an empty shards/, so the same command then failed with "not empty"."""
    out = tmp_path / "new" / "ds"
    argv = ["convert", "--quiet", world / "in_siemens.s.hdr", "--mask", world / "nanmask.s.hdr", "-o", out]
    for _ in range(2):  # the same error both times
        refuse(capsys, argv, sources=[world], outputs=[tmp_path / "new"], names=[world / "nanmask.s.hdr"],
               words=["NaN"])


def test_a_failed_predict_leaves_no_output_directory(world, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(world / "ds", ds)
    flip_chunk_byte(next((ds / "shards").glob("*.h5")), "target", 2)
    before = snapshot(ds)
    refuse(capsys, predict(world, ds, "--format", "h5", "-o", tmp_path / "out" / "fixed"), names=["slice 2"],
           outputs=[tmp_path / "out"])
    assert snapshot(ds) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]

