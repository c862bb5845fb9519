"""`hpc convert`: round trips for every input kind, pairs, shard sizes, compression, every
bad-input case, resume after a kill, and --workers == serial. Real files, real h5py."""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (reads blosc shards)
import numpy as np
import pytest

from hpc.cli import main
from hpc.io.shards import Dataset, verify_shard
from hpc.io.sinogram import write_sinogram

from helpers import hpc_cmd, run_hpc, shard_differences, write_siemens_tof, write_stir

V, X = 6, 5


def convert(capsys, *args) -> tuple[int, str]:
    """Run the CLI in this process (fast); returns (exit code, stderr)."""
    rc = main(["convert", "--quiet", *map(str, args)])
    return rc, capsys.readouterr().err


def study_arrays(out: Path, study: int = 0) -> dict[str, np.ndarray]:
    """Concatenate each dataset over a study's shards, read with plain h5py + the manifest."""
    m = json.loads((out / "manifest.json").read_text())
    parts: dict[str, list] = {}
    for shard in m["studies"][study]["shards"]:
        with h5py.File(out / shard["path"], "r") as f:
            for name, d in f.items():
                parts.setdefault(name, []).append(d[()])
    return {k: v[0] if v[0].ndim == 2 else np.concatenate(v) for k, v in parts.items()}  # (V, X) mask: shared


def test_raw_round_trip_offset_big_endian(tmp_path, capsys):
    data = np.random.default_rng(0).integers(0, 60000, (2, 5, V, X)).astype(">u2")
    (tmp_path / "scan.raw").write_bytes(b"\1" * 16 + data.tobytes())
    rc, err = convert(capsys, tmp_path / "scan.raw", "--shape", f"2,5,{V},{X}", "--dtype", "uint16",
                      "--endian", "big", "--offset", "16", "-o", tmp_path / "ds", "--shard-slices", "4")
    assert rc == 0, err
    got = study_arrays(tmp_path / "ds")
    assert np.array_equal(got["target"], data.reshape(-1, V, X)) and got["target"].dtype == np.dtype("<u2")
    assert got["tof"].tolist() == [0] * 5 + [1] * 5 and got["axial"].tolist() == list(range(5)) * 2
    ds = Dataset.open(tmp_path / "ds")
    assert ds.studies[0].slice_counts == [4, 4, 2] and ds.scale == data.max()
    assert ds.manifest["options"]["raw"] == {"shape": f"2,5,{V},{X}", "dtype": "uint16", "endian": "big", "offset": 16}
    with h5py.File(ds.studies[0].shards[0].path, "r") as f:
        assert f["target"].chunks == (1, V, X) and f.attrs["format"] == "hpc-sinogram"
        assert f.attrs["format_version"] == 2 and f.attrs["axes"] == "slice,view,bin"
        assert f.attrs["source_sha256"] == hashlib.sha256((tmp_path / "scan.raw").read_bytes()).hexdigest()


@pytest.mark.parametrize("order", ["view", "sinogram"])
def test_stir_multi_segment_round_trip(tmp_path, capsys, order):
    segs = [np.random.default_rng(k).integers(0, 999, (a, V, X)).astype(">u2") for k, a in enumerate([4, 3, 3])]
    header = write_stir(tmp_path, segs, order)
    rc, err = convert(capsys, header, "-o", tmp_path / "ds", "--shard-slices", "3")
    assert rc == 0, err
    got = study_arrays(tmp_path / "ds")
    assert np.array_equal(got["target"], np.concatenate(segs))
    assert got["segment"].tolist() == [0] * 4 + [-1] * 3 + [1] * 3


def test_siemens_tof_with_pair_and_single_slice_mask(tmp_path, capsys):
    rng = np.random.default_rng(1)
    full = rng.integers(0, 3000, (3, 9, V, X)).astype("<i2")
    low = (full // 4).astype("<i2")
    write_siemens_tof(tmp_path, full, [5, 2, 2], name="full")
    write_siemens_tof(tmp_path, low, [5, 2, 2], name="low")
    gap = (rng.random((1, V, X)) > 0.2).astype("u1") * 7  # any non-zero value means measured
    write_sinogram(tmp_path / "gap", gap)
    rc, err = convert(capsys, tmp_path / "full.s.hdr", "--input", tmp_path / "low.s.hdr",
                      "--mask", tmp_path / "gap.s.hdr", "-o", tmp_path / "ds", "--shard-slices", "10")
    assert rc == 0, err
    got = study_arrays(tmp_path / "ds")
    assert np.array_equal(got["target"], full.reshape(-1, V, X))
    assert np.array_equal(got["input"], low.reshape(-1, V, X))
    assert got["mask"].shape == (V, X) and np.array_equal(got["mask"], gap[0] != 0)
    assert got["tof"].tolist() == [0] * 9 + [1] * 9 + [2] * 9
    s = Dataset.open(tmp_path / "ds").studies[0]
    assert (s.has_input, s.has_mask, s.scanner, s.tof_bins, s.max) == (True, True, "1104", 3, full.max())


def test_truth_datasets_are_stored_as_float32(tmp_path, capsys):
    """--expected/--randoms/--mult: the simulator's noise-free parts, one file per study, kept as
    optional float32 datasets (any source dtype), read back by ShardArray and listed in the manifest."""
    from hpc.io.shards import ShardArray

    rng = np.random.default_rng(2)
    full = rng.integers(0, 50, (2, 7, V, X)).astype("<u2")
    parts = {"expected": rng.random((2, 7, V, X)) * 50, "randoms": rng.random((2, 7, V, X)).astype("<f4"),
             "mult": rng.random((2, 7, V, X)).astype(">f8")}
    write_sinogram(tmp_path / "full", full)
    for role, arr in parts.items():
        write_sinogram(tmp_path / role, arr)
    rc, err = convert(capsys, tmp_path / "full.s.hdr", *[a for r in parts for a in (f"--{r}", tmp_path / f"{r}.s.hdr")],
                      "-o", tmp_path / "ds", "--shard-slices", "5")
    assert rc == 0, err
    got = study_arrays(tmp_path / "ds")
    s = Dataset.open(tmp_path / "ds").studies[0]
    assert s.truth == ("expected", "randoms", "mult") and not s.has_mask
    for role, arr in parts.items():
        assert got[role].dtype == np.float32
        np.testing.assert_array_equal(got[role], arr.reshape(-1, V, X).astype(np.float32))
        with ShardArray(s, role) as a:
            np.testing.assert_array_equal(a.read(3, 9), arr.reshape(-1, V, X)[3:9].astype(np.float32))
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())["studies"][0]
    assert manifest["has_expected"] and manifest["mult_source"].endswith("mult.s.hdr")
    rc, err = convert(capsys, tmp_path / "full.s.hdr", "--expected", tmp_path / "full.s.hdr", tmp_path / "full.s.hdr",
                      "-o", tmp_path / "ds2")
    assert rc == 2 and "--expected: 2 files for 1 inputs" in err


def test_shard_mb_sets_slices_per_shard(tmp_path, capsys):
    write_sinogram(tmp_path / "a", np.zeros((10, V, X), "<u2"))
    per_slice = V * X * 2
    rc, err = convert(capsys, tmp_path / "a.s.hdr", "-o", tmp_path / "ds", "--shard-mb", str(3.5 * per_slice / 1e6))
    assert rc == 0, err
    assert Dataset.open(tmp_path / "ds").studies[0].slice_counts == [3, 3, 3, 1]


@pytest.mark.parametrize("compression,filters", [("none", [3]), ("lzf", [32000, 3]), ("gzip", [1, 3]),
                                                 ("blosc", [32001, 3])])
def test_compressions(tmp_path, capsys, compression, filters):
    data = np.random.default_rng(2).integers(0, 50, (6, V, X)).astype("<f4")
    write_sinogram(tmp_path / "a", data)
    rc, err = convert(capsys, tmp_path / "a.s.hdr", "-o", tmp_path / "ds", "--compression", compression)
    assert rc == 0, err
    with h5py.File(tmp_path / "ds" / "shards" / "a-0000.h5", "r") as f:
        d = f["target"]
        plist = d.id.get_create_plist()  # HDF5 filter ids: 1 deflate, 32000 lzf, 32001 blosc, 3 fletcher32
        assert [plist.get_filter(i)[0] for i in range(plist.get_nfilters())] == filters
        assert np.array_equal(d[()], data)


def _bad_truncated(tmp):
    h = write_sinogram(tmp / "a", np.ones((4, V, X), "<u2"))
    (tmp / "a.s").write_bytes((tmp / "a.s").read_bytes()[:-7])
    return [h], "a.s: data file is truncated"


def _bad_size_mismatch(tmp):
    h = write_sinogram(tmp / "a", np.ones((4, V, X), "<u2"))
    (tmp / "a.s").write_bytes((tmp / "a.s").read_bytes() + b"\0" * V * X * 2)
    return [h], "a.s: header/data size mismatch"


def _bad_number_format(tmp):
    h = write_sinogram(tmp / "a", np.ones((4, V, X), "<u2"))
    h.write_text(h.read_text().replace("unsigned integer", "complex float"))
    return [h], "a.s.hdr: unsupported number format 'complex float'"


def _bad_missing_key(tmp):
    h = write_sinogram(tmp / "a", np.ones((4, V, X), "<u2"))
    h.write_text("".join(ln for ln in h.read_text().splitlines(True) if "name of data file" not in ln))
    return [h], "a.s.hdr: missing required key 'name of data file'"


def _bad_data_missing(tmp):
    h = write_sinogram(tmp / "a", np.ones((4, V, X), "<u2"))
    (tmp / "a.s").unlink()
    return [h], "a.s.hdr: data file not found"


def _bad_pair_shape(tmp):
    a = write_sinogram(tmp / "a", np.ones((4, V, X), "<u2"))
    b = write_sinogram(tmp / "b", np.ones((4, V, X + 1), "<u2"))
    return [a, "--input", b], "b.s.hdr: input shape 4x6x6 does not match"


def _bad_pair_count(tmp):
    a = write_sinogram(tmp / "a", np.ones((4, V, X), "<u2"))
    b = write_sinogram(tmp / "b", np.ones((4, V, X), "<u2"))
    return [a, b, "--mask", a], "--mask: 1 files for 2 inputs"


def _bad_raw_without_shape(tmp):
    np.ones((4, V, X), "<u2").tofile(tmp / "a.raw")
    return [tmp / "a.raw"], "a.raw: binary file, not an Interfile header"


def _bad_nan(tmp):
    data = np.ones((6, V, X), "<f4")
    data[3, 1, 2] = np.nan
    return [write_sinogram(tmp / "a", data)], "a.s.hdr: slice 3 contains NaN or inf"


@pytest.mark.parametrize("make", [_bad_truncated, _bad_size_mismatch, _bad_number_format, _bad_missing_key,
                                  _bad_data_missing, _bad_pair_shape, _bad_pair_count, _bad_raw_without_shape,
                                  _bad_nan], ids=lambda f: f.__name__[5:])
def test_bad_input_one_line_error_and_no_dataset(tmp_path, capsys, make):
    args, message = make(tmp_path)
    rc, err = convert(capsys, *args, "-o", tmp_path / "ds", "--shard-slices", "2")
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "ds" / "manifest.json").exists()
    assert not list(tmp_path.glob("ds/shards/.*.tmp"))


def test_output_dir_not_empty_needs_resume_or_overwrite(tmp_path, capsys):
    h = write_sinogram(tmp_path / "a", np.ones((4, V, X), "<u2"))
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    rc, err = convert(capsys, h, "-o", tmp_path / "ds")
    assert rc == 2 and "output directory is not empty" in err and "ds" in err
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["notes.txt"]
    assert convert(capsys, h, "-o", tmp_path / "ds", "--overwrite")[0] == 0
    assert (tmp_path / "ds" / "notes.txt").read_text() == "mine"  # only our own files are replaced


def test_sources_are_never_modified(tmp_path, capsys):
    full = np.random.default_rng(3).integers(0, 3000, (2, 4, V, X)).astype("<i2")
    write_siemens_tof(tmp_path, full, [4], name="full")
    write_siemens_tof(tmp_path, full // 2, [4], name="low")
    before = {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    rc, err = convert(capsys, tmp_path / "full.s.hdr", "--input", tmp_path / "low.s.hdr", "-o", tmp_path / "ds")
    assert rc == 0, err
    after = {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
             for p in tmp_path.iterdir() if p.is_file()}
    assert after == before


def test_resume_keeps_verified_shards_and_redoes_bad_ones(tmp_path, capsys):
    write_sinogram(tmp_path / "a", np.random.default_rng(4).integers(0, 99, (12, V, X)).astype("<u2"))
    args = [tmp_path / "a.s.hdr", "-o", tmp_path / "ds", "--shard-slices", "3"]
    assert convert(capsys, *args)[0] == 0
    shutil.copytree(tmp_path / "ds", tmp_path / "ref")
    shards = sorted((tmp_path / "ds" / "shards").glob("*.h5"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    with h5py.File(shards[1], "r+") as f:  # silent corruption: data changes, stored checksum does not
        f["target"][0, 0, 0] += 1
    shards[2].unlink()
    time.sleep(0.01)
    assert convert(capsys, *args, "--resume")[0] == 0
    assert shard_differences(tmp_path / "ref", tmp_path / "ds", exact=False) == []  # lzf: see conftest
    assert shards[0].stat().st_mtime_ns == mtimes[shards[0].name]  # verified, not rewritten
    assert shards[1].stat().st_mtime_ns != mtimes[shards[1].name]
    assert all(verify_shard(p)[0] for p in shards)


def _big_sources(tmp_path: Path, n: int = 2) -> list[Path]:
    """Studies big enough that gzip conversion takes a moment (to be killed half-way)."""
    rng = np.random.default_rng(5)
    out = []
    for k in range(n):
        data = rng.normal(100, 30, (96, 96, 128)).astype("<f4")  # ~4.7 MB
        out.append(write_sinogram(tmp_path / f"big{k}", data))
    return out


def test_kill_during_conversion_then_resume_gives_identical_shards(tmp_path):
    sources = _big_sources(tmp_path)
    args = [*sources, "--shard-slices", "4", "--compression", "gzip", "--quiet"]
    proc = subprocess.Popen(hpc_cmd("convert", *args, "-o", tmp_path / "killed"), stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list((tmp_path / "killed" / "shards").glob("*.h5")) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "manifest.json").exists()  # a killed run is never a dataset
    done = len(list((tmp_path / "killed" / "shards").glob("*.h5")))
    assert 0 < done < 48
    run_hpc("convert", *args, "-o", tmp_path / "killed", "--resume", check=True)
    run_hpc("convert", *args, "-o", tmp_path / "fresh", check=True)
    assert shard_differences(tmp_path / "killed", tmp_path / "fresh") == []
    assert not list((tmp_path / "killed" / "shards").glob(".*.tmp"))
    m_killed, m_fresh = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("killed", "fresh"))
    assert m_killed["studies"] == m_fresh["studies"]


def test_workers_pool_equals_serial(tmp_path, capsys):
    sources = [write_sinogram(tmp_path / f"s{k}", np.random.default_rng(k).integers(0, 9, (5 + k, V, X)).astype("<u2"))
               for k in range(3)]
    opts = ["--shard-slices", "2", "--compression", "gzip"]  # gzip: byte-reproducible (lzf is not)
    assert convert(capsys, *sources, "-o", tmp_path / "serial", *opts)[0] == 0
    assert convert(capsys, *sources, "-o", tmp_path / "pool", *opts, "--processes", "2")[0] == 0
    assert shard_differences(tmp_path / "pool", tmp_path / "serial") == []
    m = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("serial", "pool")]
    assert m[0]["studies"] == m[1]["studies"] and [s["id"] for s in m[0]["studies"]] == ["s0", "s1", "s2"]


@pytest.fixture
def tiny_disk(tmpfs):
    return tmpfs("1m")


def test_disk_full_is_a_clear_error_with_nothing_partial(tmp_path, capsys, tiny_disk):
    data = np.random.default_rng(6).integers(0, 60000, (64, 96, 100)).astype("<u2")  # 1.2 MB
    h = write_sinogram(tmp_path / "a", data)
    rc, err = convert(capsys, h, "-o", tiny_disk / "ds", "--compression", "none", "--shard-slices", "16")
    assert rc == 2 and "no space left on device" in err and "ds/shards/a-00" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tiny_disk / "ds" / "manifest.json").exists()
    assert not [p for p in (tiny_disk / "ds" / "shards").iterdir() if p.name.startswith(".")]


def test_resume_with_other_options_rewrites_the_shards(tmp_path, capsys):
    write_sinogram(tmp_path / "a", np.random.default_rng(7).integers(0, 99, (6, V, X)).astype("<u2"))
    args = [tmp_path / "a.s.hdr", "-o", tmp_path / "ds", "--shard-slices", "3"]
    assert convert(capsys, *args, "--compression", "lzf")[0] == 0
    assert convert(capsys, *args, "--compression", "none", "--resume")[0] == 0
    for shard in Dataset.open(tmp_path / "ds").studies[0].shards:
        with h5py.File(shard.path, "r") as f:
            assert f["target"].compression is None and f.attrs["compression"] == "none"


def test_progress_reports_slices_and_throughput_in_logs(tmp_path):
    write_sinogram(tmp_path / "a", np.zeros((7, V, X), "<u2"))
    r = run_hpc("convert", tmp_path / "a.s.hdr", "-o", tmp_path / "ds", check=True)
    last = r.stderr.strip().splitlines()[-1]  # not a terminal: plain lines, no bar
    assert "7/7 slices (100%)" in last and "MB/s" in last and "\r" not in r.stderr
    assert "1 studies, 7 slices, 1 shards" in r.stdout


def test_workers_progress_counts_every_slice(tmp_path):
    sources = [write_sinogram(tmp_path / f"s{k}", np.zeros((9, V, X), "<u2")) for k in range(2)]
    r = run_hpc("convert", *sources, "-o", tmp_path / "ds", "--processes", "2", "--shard-slices", "2", check=True)
    assert "18/18 slices (100%)" in r.stderr.strip().splitlines()[-1]


def test_balance_splits_files_by_size():
    from hpc.convert.convert import balance

    sizes = [50, 10, 10, 10, 40, 5, 5]
    groups = balance(sizes, 3)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))  # each file exactly once
    loads = [sum(sizes[i] for i in g) for g in groups]
    assert max(loads) - min(loads) <= 10 and max(loads) == 50  # the biggest file alone on one rank
    assert balance([3], 2) == [[0], []]  # more ranks than files: the others idle
