"""hpc.repair.inference and hpc.repair.files as a library: explicit arguments only (no argparse), the same
bytes as `hpc predict`, gap masks chosen from a mask file / dead blocks / none, raw layouts, jobs checked
before writing."""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc.errors import InputError
from hpc.io.headers import read_header
from hpc.io.sinogram import SinogramReader
from hpc.repair import files as IO
from hpc.repair import inference as I

from helpers import AXIAL, V, X, make_checkpoint, run_hpc, study


def test_library_functions_take_no_namespace():
    for module in (I, IO):
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ == module.__name__:
                assert "args" not in inspect.signature(fn).parameters, name
                assert "Namespace" not in str(inspect.signature(fn)), name


def test_library_repair_equals_the_cli(tmp_path):
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt)
    inp, msk, _, mask = study(tmp_path, "siemens", "<u2")
    rep = I.load_repairer(ckpt, torch.device("cpu"))
    spec = read_header(inp)
    I.check_compatible(rep, spec)
    gaps = I.gap_mask(rep, spec, mask_spec=read_header(msk))
    path, counts = IO.predict_file(rep, spec, tmp_path / "lib.s.hdr", "source", gaps, batch=4, quiet=True)
    assert counts.replaced == int((mask == 0).sum()) and counts.slices == sum(AXIAL)
    run_hpc("predict", "--checkpoint", ckpt, inp, "--mask", msk, "-o", tmp_path / "cli.s.hdr", "--quiet",
            check=True)
    assert (tmp_path / "lib.s").read_bytes() == (tmp_path / "cli.s").read_bytes()


def test_gap_mask_sources(tmp_path):
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, inpaint=False)
    inp, msk, _, mask = study(tmp_path, "stir", ">f4")
    rep = I.load_repairer(ckpt, torch.device("cpu"))
    spec = read_header(inp)
    assert I.gap_mask(rep, spec) is None  # a plain model without gaps: every pixel predicted
    got = I.gap_mask(rep, spec, read_header(msk))(1, 4)
    np.testing.assert_array_equal(got, mask[0, 1:4])
    with pytest.raises(InputError, match="records no scanner; give --scanner"):
        I.gap_mask(rep, spec, dead_blocks=[1])
    make_checkpoint(ckpt, inpaint=True)
    with pytest.raises(InputError, match="--mask FILE or --dead-blocks"):
        I.gap_mask(I.load_repairer(ckpt, torch.device("cpu")), spec)


def test_file_jobs_with_a_raw_layout(tmp_path):
    """Headerless files read with RawLayout (data and mask dtypes differ); the outputs are named
    after the inputs in a directory; a missing mask per input is refused before any job exists."""
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt)
    rep = I.load_repairer(ckpt, torch.device("cpu"))
    rng = np.random.default_rng(0)
    data = rng.integers(0, 50, size=(sum(AXIAL), V, X)).astype("<u2")
    gaps = (rng.random(data.shape) > 0.3).astype(np.uint8)
    (tmp_path / "a.raw").write_bytes(data.tobytes())
    (tmp_path / "a_mask.raw").write_bytes(gaps.tobytes())
    raw = IO.RawLayout((1, sum(AXIAL), V, X), "uint16")
    with pytest.raises(InputError, match="1 mask"):
        IO.file_jobs(rep, [str(tmp_path / "a.raw")] * 2, tmp_path / "out", [str(tmp_path / "a_mask.raw")], raw=raw)
    (job,) = IO.file_jobs(rep, [str(tmp_path / "a.raw")], tmp_path / "fixed.raw",
                         [str(tmp_path / "a_mask.raw")], raw=raw)
    assert job.output == Path(tmp_path / "fixed.raw") and job.spec.slice_shape == (V, X)
    read, mask, close = job.open()
    try:
        np.testing.assert_array_equal(read(0, 2), data[:2])
        np.testing.assert_array_equal(mask(0, 2), gaps[:2])
        path, counts = IO.predict_study(rep, job.spec, read, job.output, job.fmt, mask, batch=3, quiet=True)
    finally:
        close()
    assert counts.replaced == int((gaps == 0).sum())
    with SinogramReader(IO.open_input(path, raw)) as r:
        out = r.read(0, sum(AXIAL))
    np.testing.assert_array_equal(out[gaps == 1], data[gaps == 1])


def test_stored_float_mask_keeps_its_measured_fractions(tmp_path):
    """A converted study's float32 mask (span-compressed bins that lost part of their LORs) reaches
    the repair as the measured fraction itself, not thresholded to 0/1 (a bin measured at 0.4 keeps
    0.6 of the network's prediction, not none)."""
    import h5py

    from hpc.io.shards import Dataset

    from helpers import make_dataset

    root = make_dataset(tmp_path / "d", studies=1, mask=True)
    rng = np.random.default_rng(3)
    info = Dataset.open(root).studies[0]
    want = []
    for sh in info.shards:
        with h5py.File(sh.path, "r+") as f:
            frac = rng.choice(np.array([0.0, 0.4, 1.0], np.float32), size=f["mask"].shape)
            del f["mask"]
            f.create_dataset("mask", data=frac)
            want.append(frac)
    read, mask, close = IO._open_study(info, None)
    try:
        got = mask(0, info.num_slices)
    finally:
        close()
    np.testing.assert_array_equal(got, np.concatenate(want))
    assert got.dtype == np.float32
