"""hpc predict: source-format round trips (Siemens, STIR), measured pixels byte-identical, windows
built like the loader's, integer rounding/clipping counted, mismatched checkpoints refused;
several inputs into a directory, a converted dataset as input, two torchrun ranks splitting the studies."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from hpc.io.headers import read_header
from hpc.io.sinogram import SinogramReader, write_sinogram
from hpc.repair.inference import Counts, load_repairer, model_output, stack_bounds, to_dtype, windows

from helpers import AXIAL, V, X, convert_studies, make_checkpoint, run_hpc, studies, study


@pytest.mark.parametrize("fmt,dtype,inpaint", [("siemens", "<u2", True), ("stir", ">f4", False)])
def test_round_trip_keeps_format_and_measured_bytes(tmp_path, fmt, dtype, inpaint):
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, inpaint=inpaint)
    inp, msk, _, mask = study(tmp_path, fmt, dtype)
    out = tmp_path / ("out.s.hdr" if fmt == "siemens" else "out.hs")
    r = run_hpc("predict", "--checkpoint", ckpt, inp, "--mask", msk, "-o", out, "--quiet", "--batch", "3")
    assert r.returncode == 0, r.stderr
    assert "pixels predicted" in r.stdout
    src, dst = read_header(inp), read_header(out)  # readable by the same converter
    assert (dst.kind, dst.dtype, dst.order, dst.segments, dst.axial_counts, dst.slice_shape) == \
        (src.kind, src.dtype, src.order, src.segments, src.axial_counts, src.slice_shape)
    assert dst.data_path.name == "out.s" and "repaired by hpc predict" in out.read_text()
    with SinogramReader(src) as a, SinogramReader(dst) as b:
        before, after = a.read(0, src.num_slices), b.read(0, dst.num_slices)
    measured = mask[0] == 1
    assert before[measured].tobytes() == after[measured].tobytes()  # byte-identical, byte order kept
    assert not np.array_equal(before[~measured], after[~measured])  # the gaps were filled
    assert src.data_path.read_bytes() == (tmp_path / src.data_path.name).read_bytes()  # source untouched


def test_h5_output(tmp_path):
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt)
    inp, msk, _, mask = study(tmp_path, "siemens", "<u2")
    r = run_hpc("predict", "--checkpoint", ckpt, inp, "--mask", msk, "-o", tmp_path / "o.h5",
                "--format", "h5", "--quiet")
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "o.h5") as f, SinogramReader(read_header(inp)) as src:
        rep = f["repaired"][:]
        assert rep.dtype == np.uint16 and rep.shape == (sum(AXIAL), V, X)
        np.testing.assert_array_equal(rep[mask[0] == 1], src.read(0, sum(AXIAL))[mask[0] == 1])
        np.testing.assert_array_equal(f["segment"][:], [0, 0, 0, 0, -1, -1])  # STIR numbers


def test_windows_match_the_loader_and_stay_in_their_stack(tmp_path):
    """Slice 3 is the last of segment 0: its window replicates it instead of reaching slice 4."""
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, inpaint=False)
    rep = load_repairer(ckpt, torch.device("cpu"))
    inp, _, _, _ = study(tmp_path, "siemens", "<u2")
    spec = read_header(inp)
    lo, hi = stack_bounds(spec)
    np.testing.assert_array_equal(lo, [0, 0, 0, 0, 4, 4])
    ids = windows(rep, spec, np.array([3, 4]))
    np.testing.assert_array_equal(ids, [[2, 3, 3], [4, 4, 5]])
    ids = ids[:1]
    with SinogramReader(spec) as reader:
        slab = reader.read(0, spec.num_slices)
    got = model_output(rep, slab[ids], None)
    stack = torch.from_numpy(slab[[2, 3, 3]].astype(np.float32))[None]  # (1, 3, V, X) by hand
    x, st = rep.pre.forward(stack)
    with torch.no_grad():
        want = rep.pre.inverse(rep.model(x, torch.ones_like(x[:, :1])), st)[:, 0].double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_integer_outputs_are_rounded_and_clipped_with_counts():
    c = Counts()
    out = to_dtype(np.array([-3.2, 0.4, 2.0, 70000.0, np.nan]), np.dtype("<u2"), c)
    np.testing.assert_array_equal(out, [0, 0, 2, 65535, 0])
    assert (c.rounded, c.clipped_low, c.clipped_high, c.nonfinite) == (2, 1, 1, 1)  # -3.2 and 0.4 rounded


def test_refuses_checkpoint_for_other_slice_size(tmp_path):
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, slice_shape=(8, 16))
    inp, msk, _, _ = study(tmp_path, "siemens", "<u2")
    r = run_hpc("predict", "--checkpoint", ckpt, inp, "--mask", msk, "-o", tmp_path / "o.s.hdr")
    assert r.returncode == 2
    assert "8x12" in r.stderr and "trained on 8x16" in r.stderr and str(ckpt) in r.stderr
    assert not (tmp_path / "o.s").exists()


def test_inpainting_model_needs_gaps_and_weights_must_fit(tmp_path):
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt)
    inp, _, _, _ = study(tmp_path, "siemens", "<u2")
    r = run_hpc("predict", "--checkpoint", ckpt, inp, "-o", tmp_path / "o.s.hdr")
    assert r.returncode == 2 and "--mask FILE or --dead-blocks" in r.stderr
    state = torch.load(ckpt, weights_only=True)
    state["config"]["data"]["context"] = 2  # 5 channels, weights built for 3
    torch.save(state, ckpt)
    r = run_hpc("predict", "--checkpoint", ckpt, inp, "-o", tmp_path / "o.s.hdr")
    assert r.returncode == 2 and "weights do not match" in r.stderr


def test_dead_blocks_from_geometry_replace_only_their_lors(tmp_path):
    from hpc.physics import geometry as G
    from hpc.physics import projdata as P

    sc = G.get_scanner("test")  # 4 rings, 12 views x 12 bins, blocks of 4 crystals x 2 rings
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, slice_shape=(sc.views, sc.bins))
    rng = np.random.default_rng(3)
    planes = P.dead_block_mask(sc, [1], segments=[0])  # (4, 12, 12) 1 = measured
    data = (rng.integers(1, 50, size=planes.shape) * planes).astype("<i2")
    inp = write_sinogram(tmp_path / "scan", data, axial_counts=[len(planes)])
    r = run_hpc("predict", "--checkpoint", ckpt, inp, "--dead-blocks", "1", "--scanner", "test",
                "-o", tmp_path / "fixed.s.hdr", "--quiet")
    assert r.returncode == 0, r.stderr
    with SinogramReader(read_header(tmp_path / "fixed.s.hdr")) as rd:
        out = rd.read(0, len(planes))
    assert out.dtype == np.int16 and (planes == 0).any()
    np.testing.assert_array_equal(out[planes == 1], data[planes == 1])
    assert (out[planes == 0] != 0).any()
    r = run_hpc("predict", "--checkpoint", ckpt, inp, "--dead-blocks", "99", "--scanner", "test",
                "-o", tmp_path / "x.s.hdr")
    assert r.returncode == 2 and "dead blocks [99]" in r.stderr


def test_refuses_to_overwrite_its_input_and_bad_masks(tmp_path):
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt)
    inp, msk, _, _ = study(tmp_path, "siemens", "<u2")
    before = read_header(inp).data_path.read_bytes()
    r = run_hpc("predict", "--checkpoint", ckpt, inp, "--mask", msk, "-o", inp)
    assert r.returncode == 2 and "would overwrite the input" in r.stderr
    assert read_header(inp).data_path.read_bytes() == before
    other = write_sinogram(tmp_path / "short_mask", np.ones((3, V, X), np.uint8), axial_counts=[3])
    r = run_hpc("predict", "--checkpoint", ckpt, inp, "--mask", other, "-o", tmp_path / "o.s.hdr")
    assert r.returncode == 2 and "short_mask" in r.stderr and "mask is 3x8x12" in r.stderr
    assert not list(tmp_path.glob("o.*")) and not list(tmp_path.glob(".o.*"))


def test_several_inputs_go_to_a_directory_with_one_mask_each(tmp_path):
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt)
    sts = studies(tmp_path, 2)
    r = run_hpc("predict", "--checkpoint", ckpt, sts[0][0], sts[1][0], "--mask", sts[0][1],
                "-o", tmp_path / "fixed", "--quiet")
    assert r.returncode == 2 and "1 mask(s) for 2 input(s)" in r.stderr
    assert not (tmp_path / "fixed").exists()
    twin = tmp_path / "elsewhere"
    twin.mkdir()
    same, same_mask = study(twin, "siemens", "<u2", tag="0")[:2]  # the first study's file name
    r = run_hpc("predict", "--checkpoint", ckpt, sts[0][0], same, "--mask", sts[0][1], same_mask,
                "-o", tmp_path / "fixed")
    assert r.returncode == 2 and "both write" in r.stderr and not (tmp_path / "fixed").exists()
    r = run_hpc("predict", "--checkpoint", ckpt, sts[0][0], sts[1][0], "--mask", sts[0][1], sts[1][1],
                "-o", tmp_path / "fixed", "--quiet")
    assert r.returncode == 0, r.stderr
    for inp, msk, _mask in sts:
        single = tmp_path / f"single_{inp.name}"  # the same input alone: same values
        run_hpc("predict", "--checkpoint", ckpt, inp, "--mask", msk, "-o", single, "--quiet", check=True)
        with SinogramReader(read_header(tmp_path / "fixed" / inp.name)) as a, \
                SinogramReader(read_header(single)) as b:
            np.testing.assert_array_equal(a.read(0, sum(AXIAL)), b.read(0, sum(AXIAL)))


def test_dataset_input_equals_the_source_files(tmp_path):
    """A converted dataset's studies (stored gapped data + stored mask) repair to exactly what the
    source files repair to, as HDF5 per study; --studies picks, unknown ids are refused."""
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt)
    sts = studies(tmp_path, 2)
    ds = convert_studies(tmp_path, sts)
    ids = [s["id"] for s in json.loads((ds / "manifest.json").read_text())["studies"]]
    r = run_hpc("predict", "--checkpoint", ckpt, ds, "--studies", "nope", "-o", tmp_path / "fixed")
    assert r.returncode == 2 and "no study nope" in r.stderr
    r = run_hpc("predict", "--checkpoint", ckpt, ds, "-o", ds)
    assert r.returncode == 2 and "inside the input dataset" in r.stderr
    r = run_hpc("predict", "--checkpoint", ckpt, ds, "--studies", ids[1], "-o", tmp_path / "fixed", "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "fixed").iterdir()) == [f"{ids[1]}_repaired.h5"]
    done = tmp_path / "fixed" / f"{ids[1]}_repaired.h5"
    stamp = done.stat().st_mtime_ns
    r = run_hpc("predict", "--checkpoint", ckpt, ds, "-o", tmp_path / "fixed", "--quiet", "--skip-existing")
    assert r.returncode == 0 and f"kept {done}" in r.stdout and done.stat().st_mtime_ns == stamp
    assert (tmp_path / "fixed" / f"{ids[0]}_repaired.h5").exists()  # the missing one was done
    inp, msk, _ = sts[1]
    run_hpc("predict", "--checkpoint", ckpt, inp, "--mask", msk, "-o", tmp_path / "ref.h5", "--format", "h5",
            "--quiet", check=True)
    with h5py.File(tmp_path / "fixed" / f"{ids[1]}_repaired.h5") as a, h5py.File(tmp_path / "ref.h5") as b:
        np.testing.assert_array_equal(a["repaired"][:], b["repaired"][:])
        np.testing.assert_array_equal(a["segment"][:], b["segment"][:])


def test_two_ranks_split_the_studies(tmp_path):
    """torchrun --nproc_per_node=2: each rank repairs every other study (no collectives), so three
    studies give three outputs, each written once, equal to a single-process run."""
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt)
    ds = convert_studies(tmp_path, studies(tmp_path, 3))
    run_hpc("predict", "--checkpoint", ckpt, ds, "-o", tmp_path / "one", "--quiet", check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "hpc", "predict", "--checkpoint", str(ckpt), str(ds), "-o", str(tmp_path / "two"),
                        "--quiet", "--device", "cpu"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 3  # each study by exactly one rank
    one, two = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 3
    for a, b in zip(one, two, strict=True):
        with h5py.File(a) as fa, h5py.File(b) as fb:
            np.testing.assert_array_equal(fa["repaired"][:], fb["repaired"][:])
