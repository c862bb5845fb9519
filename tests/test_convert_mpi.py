"""`mpirun -np 2 hpc convert` with real Open MPI: ranks split the files, rank 0 writes the manifest,
and the result equals a serial conversion byte for byte."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from hpc.io.sinogram import write_sinogram

from helpers import hpc_cmd, mpirun_cmd, run_hpc, shard_differences

pytestmark = pytest.mark.mpi


def _sources(tmp_path):
    rng = np.random.default_rng(0)
    return [write_sinogram(tmp_path / f"s{k}", rng.integers(0, 500, (3 + 4 * k, 6, 5)).astype("<u2"),
                           fmt="stir" if k % 2 else "siemens") for k in range(4)]


def test_mpirun_two_ranks_equals_serial(tmp_path):
    sources = _sources(tmp_path)
    args = [*map(str, sources), "--shard-slices", "4", "--compression", "gzip", "--quiet"]  # byte-reproducible
    r = subprocess.run([*mpirun_cmd(2), *hpc_cmd("convert", *args, "-o", tmp_path / "mpi")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("4 studies") == 1  # only rank 0 reports
    run_hpc("convert", *args, "-o", tmp_path / "serial", check=True)
    assert shard_differences(tmp_path / "mpi", tmp_path / "serial") == []
    assert len(list((tmp_path / "serial" / "shards").glob("*.h5"))) == 10
    m = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("mpi", "serial")]
    assert m[0]["studies"] == m[1]["studies"] and m[0]["shards"] == m[1]["shards"]


def test_mpirun_error_on_one_rank_fails_all_with_one_line(tmp_path):
    data = np.ones((4, 6, 5), "<f4")
    sources = [write_sinogram(tmp_path / f"ok{k}", data) for k in range(2)]
    data[2, 0, 0] = np.inf
    sources.append(write_sinogram(tmp_path / "bad", data))  # one rank fails half-way
    r = subprocess.run([*mpirun_cmd(2), *hpc_cmd("convert", *map(str, sources), "--quiet", "-o", tmp_path / "mpi")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if "hpc convert: error" in line]
    assert len(errors) == 1 and "bad.s.hdr: slice 2 contains NaN or inf" in errors[0], r.stderr
    assert not (tmp_path / "mpi" / "manifest.json").exists()
