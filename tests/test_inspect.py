"""`hpc inspect`: dataset and shard summaries, checksum verification, PNG rendering, and the
dispatch of checkpoints / run dirs to hpc.train.checkpoint.describe."""
from __future__ import annotations

import sys
import types

import h5py
import numpy as np
import pytest
from PIL import Image

from hpc.cli import main
from hpc.io.sinogram import write_sinogram

V, X = 24, 32


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    sino = rng.poisson(50, (2, 6, V, X)).astype("<u2")
    write_sinogram(tmp_path / "p01", sino, axial_counts=[4, 1, 1], fields={"originating system": "demo"})
    write_sinogram(tmp_path / "p01_low", sino // 3, axial_counts=[4, 1, 1])
    mask = np.ones((2, 6, V, X), "u1")
    mask[:, :, 5:9, :] = 0  # a gap of missing views
    write_sinogram(tmp_path / "p01_mask", mask, axial_counts=[4, 1, 1])
    write_sinogram(tmp_path / "p02", sino[:1], axial_counts=[4, 1, 1], fields={"originating system": "demo"})
    assert main(["convert", "--quiet", str(tmp_path / "p01.s.hdr"), str(tmp_path / "p02.s.hdr"),
                 "--input", str(tmp_path / "p01_low.s.hdr"), str(tmp_path / "p02.s.hdr"),
                 "-o", str(tmp_path / "ds"), "--shard-slices", "5"]) == 0
    assert main(["convert", "--quiet", str(tmp_path / "p01.s.hdr"), "--input", str(tmp_path / "p01_low.s.hdr"),
                 "--mask", str(tmp_path / "p01_mask.s.hdr"), "-o", str(tmp_path / "masked")]) == 0
    return tmp_path


def test_dataset_summary_and_verify(dataset, capsys):
    assert main(["inspect", str(dataset / "ds"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "2 studies, 18 slices of (24, 32) uint16" in out and "scanner demo" in out
    assert "compression blosc, 5 shards" in out  # the default codec
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith("p0")}
    assert rows["p01"][1:4] == ["12", "3", "2"] and rows["p01"][-1] == "ok"
    assert rows["p02"][1] == "6" and rows["p02"][5] == "yes"  # has input


def test_verify_reports_corrupt_and_missing_shards(dataset, capsys):
    with h5py.File(dataset / "ds" / "shards" / "p01-0001.h5", "r+") as f:
        f["input"][0, 0, 0] += 1
    (dataset / "ds" / "shards" / "p02-0000.h5").unlink()
    assert main(["inspect", str(dataset / "ds")]) == 2  # missing is found even without --verify
    assert main(["inspect", str(dataset / "ds"), "--verify"]) == 2
    captured = capsys.readouterr()
    assert "BAD (dataset 'input': checksum mismatch)" in captured.out and "MISSING" in captured.out
    assert "2 shard(s) missing or failing checksum verification" in captured.err


def test_blosc_shard_summary(tmp_path, capsys):
    write_sinogram(tmp_path / "a", np.arange(3 * V * X, dtype="<u2").reshape(3, V, X))
    assert main(["convert", "--quiet", str(tmp_path / "a.s.hdr"), "-o", str(tmp_path / "ds"),
                 "--compression", "blosc"]) == 0
    assert main(["inspect", str(tmp_path / "ds" / "shards" / "a-0000.h5"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "/target: (3, 24, 32) uint16 chunks=(1, 24, 32) filters=blosc" in out and "checksums: ok" in out


def test_shard_summary(dataset, capsys):
    assert main(["inspect", str(dataset / "ds" / "shards" / "p01-0000.h5"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "/target: (5, 24, 32) uint16 chunks=(1, 24, 32) filters=blosc" in out
    assert "study = p01" in out and "checksums: ok" in out


def test_png_shows_slices_of_each_role(dataset, capsys):
    png = dataset / "masked.png"
    assert main(["inspect", str(dataset / "masked"), "--png", str(png), "--slices", "3"]) == 0
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] > 3 * 250 and img.shape[1] > 3 * 250  # target/input/mask rows x 3 slices
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # an actual picture, not a blank
    assert "wrote" in capsys.readouterr().out


def test_not_a_dataset(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "not a converted dataset (no manifest.json" in capsys.readouterr().err


def test_checkpoint_and_run_dir_go_to_checkpoint_describe(tmp_path, capsys, monkeypatch):
    # hpc.train.checkpoint belongs to the training stage (tested there); a stand-in module checks that
    # inspect hands it checkpoints and run dirs, and reports clearly when it is missing.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("train: {}\n")
    (tmp_path / "step.pt").write_bytes(b"")
    fake = types.ModuleType("hpc.train.checkpoint")
    fake.describe = lambda path: f"described {path.name}"
    monkeypatch.setitem(sys.modules, "hpc.train.checkpoint", fake)
    assert main(["inspect", str(tmp_path / "run")]) == 0 and main(["inspect", str(tmp_path / "step.pt")]) == 0
    assert capsys.readouterr().out.splitlines() == ["described run", "described step.pt"]
    monkeypatch.setitem(sys.modules, "hpc.train.checkpoint", None)  # import fails
    assert main(["inspect", str(tmp_path / "step.pt")]) == 2
    assert "need hpc.train.checkpoint.describe" in capsys.readouterr().err
