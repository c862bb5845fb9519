"""hpc predict --method: every registered baseline, the network (unet) and the network on its tuned
fill (hybrid) repair whole files through the same writers; each on a case with a known answer, the
refusals, and measured bins byte-identical for every method."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc.baselines.stack import Stack
from hpc.cli import main
from hpc.io.headers import read_header
from hpc.io.sinogram import SinogramReader, write_sinogram
from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.physics import recon as R
from hpc.physics.projector import default_grid
from hpc.registry import BASELINES
from hpc.repair.inference import load_repairer
from hpc.repair.methods import method_names, resolve_method

from helpers import make_checkpoint, make_reproject_checkpoint, refuse, study

SC = G.get_scanner("test")  # 4 rings, 12 views x 12 bins: OSEM in milliseconds


def read(header) -> np.ndarray:
    with SinogramReader(read_header(header)) as r:
        return r.read(0, r.spec.num_slices)


def predict(capsys, *argv) -> str:
    rc = main(["predict", *map(str, argv), "--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """Noise-free counts mult * A x + r of a known phantom (the projector's own model), a dead block's
    gaps, and the factors, as float32 STIR files naming the test scanner."""
    root = tmp_path_factory.mktemp("phantom")
    grid = default_grid(SC)
    yy, xx = np.mgrid[:grid.ny, :grid.nx] - (grid.ny - 1) / 2
    img = 10.0 * (yy ** 2 + xx ** 2 < (0.35 * grid.nx) ** 2) + 20.0 * ((yy - 2) ** 2 + xx ** 2 < (0.12 * grid.nx) ** 2)
    x = torch.from_numpy(np.stack([img * (1 + 0.2 * p) for p in range(SC.rings)])).float()
    rng = np.random.default_rng(0)
    mult = torch.from_numpy(rng.uniform(0.5, 1.0, (SC.rings, SC.views, SC.bins))).float()
    randoms = torch.full_like(mult, 2.0)
    truth = R.model_counts(SC, x, mult=mult, add=randoms).numpy()
    mask = P.dead_block_mask(SC, [1])  # (4, V, X) 0/1
    lay = P.span1_layout(SC, [0])
    files = {"truth": truth, "gaps": truth * mask, "mult": mult.numpy(), "randoms": randoms.numpy()}
    out = {k: write_sinogram(root / k, v.astype(np.float32), fmt="stir", layout=lay) for k, v in files.items()}
    out["mask"] = write_sinogram(root / "mask", mask.astype(np.uint8), fmt="stir", layout=lay)
    return {"files": out, "truth": truth, "mask": mask, "root": root}


def test_linear_is_exact_on_a_radial_ramp_and_adds_the_lost_fraction(tmp_path, capsys):
    """Counts linear in the radial bin: interpolation between measured bins is exact, so every gap
    holds the ramp (integers, no rounding); a half-measured bin gets its counts + half the ramp."""
    views, bins = np.arange(6)[:, None], np.arange(10)[None, :]
    ramp = np.broadcast_to(7 * bins + 3 * views + 5, (2, 6, 10)).astype("<u2")
    mask = np.ones(ramp.shape, np.float32)
    mask[:, :, 3:6] = 0  # interior gaps on every view
    mask[0, 2, 7] = 0.5  # a partly measured bin
    inp = ramp.copy()
    inp[mask == 0] = 999  # what a gap holds must not matter
    inp[0, 2, 7] = 40  # half of its counts measured
    src = write_sinogram(tmp_path / "ramp", inp)
    msk = write_sinogram(tmp_path / "mask", mask)
    out = predict(capsys, "--method", "linear", src, "--mask", msk, "-o", tmp_path / "out.s.hdr")
    got = read(tmp_path / "out.s.hdr")
    np.testing.assert_array_equal(got[mask == 0], ramp[mask == 0])
    assert got[0, 2, 7] == 40 + 0.5 * ramp[0, 2, 7]
    assert got[mask == 1].tobytes() == inp[mask == 1].tobytes()
    assert "0 rounded" in out and "repaired by hpc predict with --method linear" in (tmp_path / "out.s.hdr").read_text()


def nmse_gap(a: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    gap = mask < 1
    return float(((a - truth)[gap] ** 2).sum() / (truth[gap] ** 2).sum())


def test_reproject_recovers_a_noise_free_phantom_in_the_gaps(phantom, tmp_path, capsys):
    """With the known factors, OSEM from the measured LORs projected into the gaps is close to the
    truth there (interpolation is not), and the file is exactly the registered baseline's output."""
    f, truth, mask = phantom["files"], phantom["truth"], phantom["mask"]
    common = [f["gaps"], "--mask", f["mask"], "--method-param", "iters=8"]
    predict(capsys, "--method", "reproject", *common, "--mult", f["mult"], "--randoms", f["randoms"],
            "-o", tmp_path / "rep.hs")
    predict(capsys, "--method", "reproject", *common, "-o", tmp_path / "nofactors.hs")
    predict(capsys, "--method", "linear", f["gaps"], "--mask", f["mask"], "-o", tmp_path / "lin.hs")
    rep, lin, bare = (read(tmp_path / n) for n in ("rep.hs", "lin.hs", "nofactors.hs"))
    assert nmse_gap(rep, truth, mask) < 0.02 < nmse_gap(bare, truth, mask) < nmse_gap(lin, truth, mask)
    stack = Stack(read(f["gaps"]).astype(np.float64), mask.astype(np.float64), np.ones(mask.shape, bool),
                  read(f["mult"]).astype(np.float64), read(f["randoms"]).astype(np.float64), SC)
    want = BASELINES.get("reproject")(stack, np.arange(SC.rings), iters=8)
    np.testing.assert_array_equal(rep[mask < 1], want[mask < 1].astype(np.float32))
    assert "--method reproject (iters=8)" in (tmp_path / "rep.hs").read_text()


def test_a_baseline_takes_the_iterations_the_checkpoints_validation_chose(phantom, tmp_path, capsys):
    f = phantom["files"]
    ckpt = make_reproject_checkpoint(tmp_path / "m.pt", iters=1)
    common = ["--method", "reproject", f["gaps"], "--mask", f["mask"]]
    predict(capsys, *common, "--checkpoint", ckpt, "-o", tmp_path / "tuned.hs")
    predict(capsys, *common, "--method-param", "iters=1", "-o", tmp_path / "one.hs")
    predict(capsys, *common, "-o", tmp_path / "default.hs")
    predict(capsys, *common, "--checkpoint", ckpt, "--method-param", "iters=8", "-o", tmp_path / "given.hs")
    tuned, one, default, given = (read(tmp_path / n) for n in ("tuned.hs", "one.hs", "default.hs", "given.hs"))
    assert np.array_equal(tuned, one) and not np.array_equal(tuned, default)
    assert np.array_equal(given, default)  # --method-param wins over the checkpoint (8 is the default)
    assert "(iters=1)" in (tmp_path / "tuned.hs").read_text()


@pytest.fixture
def toys():
    """Two toy baselines returning, for each gap, the mean of the measured values at that (view, bin)
    over every slice they are handed: one whole_study, one per segment; their calls recorded."""
    calls = {"toywhole": [], "toyseg": []}

    def make(name):
        def toy(stack: Stack, planes: np.ndarray, scale: float = 1.0) -> np.ndarray:
            calls[name].append((stack.y.copy(), planes.copy(), stack.layout))
            src = stack.w >= 1
            mean = (stack.y * src).sum(0) / np.maximum(src.sum(0), 1)
            return np.where(src[planes], stack.y[planes], scale * mean)
        return toy

    BASELINES.register("toywhole", whole_study=True)(make("toywhole"))
    BASELINES.register("toyseg")(make("toyseg"))
    yield calls
    for name in calls:
        BASELINES.unregister(name)


def test_a_whole_study_baseline_sees_every_slice_at_once(toys, tmp_path, capsys):
    """A whole_study baseline is called once with all segments' slices in canonical order and the
    layout; a per-segment one once per segment; --method-param reaches the toy's own keyword."""
    lay = P.span1_layout(SC, [0, -1, 1])  # 4 + 3 + 3 planes
    rng = np.random.default_rng(3)
    data = rng.integers(1, 50, (lay.planes, SC.views, SC.bins)).astype(np.float32)
    mask = (rng.random(data.shape) > 0.2).astype(np.uint8)
    src = write_sinogram(tmp_path / "s", data * mask, fmt="stir", layout=lay)
    msk = write_sinogram(tmp_path / "m", mask, fmt="stir", layout=lay)
    for name in toys:
        predict(capsys, "--method", name, "--method-param", "scale=2", src, "--mask", msk,
                "-o", tmp_path / f"{name}.hs")
    (y, planes, layout), = toys["toywhole"]
    assert y.shape == (10, SC.views, SC.bins) and np.array_equal(y, data * mask)  # canonical order, gaps 0
    assert planes.tolist() == list(range(10)) and layout.segments == (0, -1, 1) and layout.axial_counts == (4, 3, 3)
    assert [c[0].shape[0] for c in toys["toyseg"]] == [4, 3, 3] and all(c[2] is None for c in toys["toyseg"])
    src_ = mask >= 1
    want = 2 * (data * src_).sum(0) / np.maximum(src_.sum(0), 1)
    got = read(tmp_path / "toywhole.hs")
    np.testing.assert_allclose(got[mask == 0], np.broadcast_to(want, data.shape)[mask == 0], rtol=1e-6)
    assert not np.array_equal(got, read(tmp_path / "toyseg.hs"))  # the segment means differ from the study's


def test_hybrid_runs_the_fill_its_validation_chose(phantom, tmp_path, capsys):
    """hybrid = the network with its reproject fill at the checkpoint's reproject_iters: the same file
    as a checkpoint trained with data.fill_iters at that count; 1 and 3 iterations differ."""
    f = phantom["files"]
    ckpts = {n: make_reproject_checkpoint(tmp_path / f"{n}.pt", **kw) for n, kw in
             {"val1": {"iters": 1}, "val3": {"iters": 3}, "fill1": {"fill_iters": 1},
              "fill3": {"fill_iters": 3}}.items()}
    common = [f["gaps"], "--mask", f["mask"]]
    for name, method in (("val1", "hybrid"), ("val3", "hybrid"), ("fill1", "unet"), ("fill3", "unet"),
                         ("val1", "unet")):
        predict(capsys, "--method", method, "--checkpoint", ckpts[name], *common,
                "-o", tmp_path / f"{method}-{name}.hs")
    predict(capsys, "--method", "hybrid", "--method-param", "iters=3", "--checkpoint", ckpts["val1"], *common,
            "-o", tmp_path / "given3.hs")
    out = {p.stem: read(p) for p in tmp_path.glob("*.hs")}
    gap = phantom["mask"] < 1
    assert np.array_equal(out["hybrid-val1"], out["unet-fill1"])
    assert np.array_equal(out["hybrid-val3"], out["unet-fill3"])
    assert np.array_equal(out["given3"], out["hybrid-val3"])
    assert not np.array_equal(out["hybrid-val1"][gap], out["hybrid-val3"][gap])
    assert not np.array_equal(out["hybrid-val1"][gap], out["unet-val1"][gap])  # unet: data.fill_iters=4
    # the network's input is the reprojection computed by hand with the chosen count
    x = torch.from_numpy(read(f["gaps"])[None, :3]).float()
    m = torch.from_numpy(phantom["mask"][None, :3]).float()
    for name, iters in (("val1", 1), ("val3", 3)):
        rep = resolve_method("hybrid", [], load_repairer(ckpts[name], torch.device("cpu")))
        want = R.reproject(SC, x[0], m[0], iters, R.REPROJECT_SUBSETS, valid=torch.from_numpy(G.gap_mask(SC) > 0))
        torch.testing.assert_close(rep.pre.gaps(x, m)[0], want)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """An `hpc simulate` study (Poisson counts, its scanner in the header, a dead block) and a
    reproject-fill checkpoint for it."""
    root = tmp_path_factory.mktemp("sim")
    assert main(["simulate", "-o", str(root / "sim"), "--studies", "1", "--scanner", "test", "--dead-blocks", "1",
                 "--counts", "3e5", "--seed", "9"]) == 0
    return root / "sim" / "s000", make_reproject_checkpoint(root / "m.pt", iters=2)


@pytest.mark.parametrize("method", method_names())
def test_every_method_keeps_the_measured_bins_byte_identical(simulated, method, tmp_path, capsys):
    s, ckpt = simulated
    extra = ["--checkpoint", ckpt] if method in ("unet", "hybrid") else []
    out = tmp_path / "out.s.hdr"
    before = {p: p.read_bytes() for p in s.parent.iterdir()}
    summary = predict(capsys, "--method", method, *extra, f"{s}_gaps.s.hdr", "--mask", f"{s}_mask.s.hdr",
                      "--mult", f"{s}_mult.s.hdr", "--randoms", f"{s}_randoms.s.hdr", "-o", out)
    inp, got, mask = read(f"{s}_gaps.s.hdr"), read(out), read(f"{s}_mask.s.hdr")
    assert got.dtype == inp.dtype and got.shape == inp.shape
    assert (mask == 0).any() and inp[mask == 1].tobytes() == got[mask == 1].tobytes()
    assert not np.array_equal(inp[mask == 0], got[mask == 0])  # the gaps were filled
    assert "pixels predicted" in summary and {p: p.read_bytes() for p in s.parent.iterdir()} == before


def test_a_dataset_is_repaired_with_its_stored_mask_and_factors(simulated, tmp_path, capsys):
    """A converted study's stored mult / randoms reach the baseline: the same repair as from its files."""
    s, _ = simulated
    assert main(["convert", f"{s}_gaps.s.hdr", "--mask", f"{s}_mask.s.hdr", "--mult", f"{s}_mult.s.hdr",
                 "--randoms", f"{s}_randoms.s.hdr", "-o", str(tmp_path / "ds"), "--quiet"]) == 0
    predict(capsys, "--method", "reproject", tmp_path / "ds", "-o", tmp_path / "fixed")
    predict(capsys, "--method", "reproject", f"{s}_gaps.s.hdr", "--mask", f"{s}_mask.s.hdr", "--mult",
            f"{s}_mult.s.hdr", "--randoms", f"{s}_randoms.s.hdr", "-o", tmp_path / "file.h5", "--format", "h5")
    import h5py

    (done,) = (tmp_path / "fixed").glob("*_repaired.h5")
    with h5py.File(done) as a, h5py.File(tmp_path / "file.h5") as b:
        assert np.array_equal(a["repaired"][:], b["repaired"][:])
    refuse(capsys, ["predict", "--method", "linear", tmp_path / "ds", "--split", "test", "-o", tmp_path / "x"],
           words=["--split", "--checkpoint"], outputs=[tmp_path / "x"])


@pytest.fixture
def plain(tmp_path):
    """A small Siemens study whose header names no scanner, a zero-fill checkpoint for it."""
    inp, msk, _, _ = study(tmp_path, "siemens", "<u2")
    ckpt = tmp_path / "zero.pt"
    make_checkpoint(ckpt)
    return inp, msk, ckpt


@pytest.mark.parametrize("argv,words", [
    (["--method", "nope"], ["--method nope", "unknown", "unet | hybrid | reproject"]),
    (["--method", "unet"], ["--method unet needs --checkpoint"]),
    (["--method", "hybrid"], ["--method hybrid needs --checkpoint"]),
    (["--method", "hybrid", "--checkpoint", "{zero}"], ["data.fill=reproject", "data.fill=zero"]),
    (["--method", "hybrid", "--checkpoint", "{noval}"], ["reproject_iters", "--method-param iters=N"]),
    (["--method", "unet", "--checkpoint", "{zero}", "--method-param", "iters=2"], ["unet takes no parameters"]),
    (["--method", "linear", "--method-param", "iters=2"], ["iters=2", "linear takes no parameters"]),
    (["--method", "reproject", "--scanner", "test", "--method-param", "bogus=1"], ["bogus=1", "reproject takes iters"]),
    (["--method", "reproject", "--scanner", "test", "--method-param", "iters=two"], ["iters=two", "an integer"]),
    (["--method", "reproject", "--scanner", "test", "--method-param", "iters=0"], ["iters=0", "positive"]),
    (["--method", "reproject", "--scanner", "test", "--method-param", "iters"], ["NAME=VALUE"]),
    (["--method", "reproject"], ["needs the scanner geometry", "--scanner"]),
    (["--method", "reproject", "--scanner", "test"], ["projects scanner 'test'", "12x12", "8x12"]),
    (["--method", "linear", "--no-mask"], ["--method linear fills gaps", "--mask"]),
])
def test_refusals(plain, tmp_path, capsys, argv, words):
    inp, msk, zero = plain
    noval = make_reproject_checkpoint(tmp_path / "noval.pt")
    argv = [a.format(zero=zero, noval=noval) for a in argv]
    gaps = [] if "--no-mask" in argv else ["--mask", msk]
    argv = [a for a in argv if a != "--no-mask"]
    refuse(capsys, ["predict", *argv, inp, *gaps, "-o", tmp_path / "out.s.hdr"], words=words,
           sources=[inp.parent], outputs=[tmp_path / "out.s.hdr"])
