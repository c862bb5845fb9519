"""Hostile inputs from the command line (issue 12): every case ends with exit status 2 (130 for
Ctrl-C), ONE line on stderr naming the file and the problem, no traceback, no partial output, and
every source byte-identical afterwards (hashed before and after).

Most cases run the real CLI entry point in this process (`hpc.cli.main`: the same code path as
the `hpc` command, much faster); cases about signals, hangs, memory or the training loop run
`python -m hpc` in a subprocess with a timeout (and a memory limit where that is the point).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
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
    hpc_cmd,
    make_checkpoint,
    make_dataset,
    require_dali,
    snapshot,
    study,
)

QUIET_ENV = {"PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled"}  # library warnings are not our output


# ---------------------------------------------------------------- the world every case starts from
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Sources (Siemens/STIR/raw studies with masks), checkpoints (good, NaN, pickled object) and
    a converted dataset (uncompressed and lzf), shared read-only by every case."""
    w = tmp_path_factory.mktemp("world")
    study(w, "siemens", "<u2")  # in_siemens.s.hdr/.s, mask_siemens.s.hdr/.s
    study(w, "siemens", "<u2", seed=2, tag="b")
    rng = np.random.default_rng(0)
    rng.integers(0, 60, (sum(AXIAL), V, X)).astype("<u2").tofile(w / "in.raw")
    (rng.random((sum(AXIAL), V, X)) > 0.2).astype("u1").tofile(w / "m.raw")
    fmask = (rng.random((1, sum(AXIAL), V, X)) > 0.2).astype("<f4")
    fmask[0, 3, 2, 2] = np.nan
    write_sinogram(w / "nanmask", fmask, axial_counts=AXIAL)  # nanmask.s.hdr: float mask with a NaN
    make_checkpoint(w / "m.pt")
    make_checkpoint(w / "plain.pt", inpaint=False)  # predicts every pixel: no mask needed
    state = torch.load(w / "m.pt", weights_only=True)
    state["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    torch.save(state, w / "nan.pt")
    torch.save({"model": Evil()}, w / "evil.pt")
    big = (1, 6, 12, 16)  # evaluate needs slices of at least the 11x11 SSIM window
    write_sinogram(w / "ev", rng.integers(0, 60, big).astype("<u2"))
    write_sinogram(w / "evmask", (rng.random(big) > 0.2).astype("u1"))
    evnan = (rng.random(big) > 0.2).astype("<f4")
    evnan[0, 2, 5, 5] = np.nan
    write_sinogram(w / "evnan", evnan)
    make_checkpoint(w / "ev.pt", slice_shape=big[2:])
    assert main(["convert", "--quiet", str(w / "ev.s.hdr"), "--mask", str(w / "evmask.s.hdr"), "-o", str(w / "ds-ev"),
                 "--compression", "lzf"]) == 0
    for comp in ("none", "lzf"):
        assert main(["convert", "--quiet", str(w / "in_siemens.s.hdr"), str(w / "inb_siemens.s.hdr"),
                     "--mask", str(w / "mask_siemens.s.hdr"), str(w / "maskb_siemens.s.hdr"),
                     "-o", str(w / f"ds-{comp}"), "--compression", comp]) == 0
    return w


class Evil:
    """A pickled object: loading it would run code; weights_only refuses it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, f"expected one line, got:\n{err}"
    return lines[0]


def hidden_temporaries(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.exists() for p in d.rglob(".*.tmp")]


def refuse(capsys, argv, *, sources=(), outputs=(), names=(), words=(), code=2) -> str:
    """Run `hpc ARGV` here; assert the exit code, one line naming each of ``names`` and containing
    each of ``words``, sources unchanged, no output and no temporary file left."""
    before = snapshot(*sources)
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    refuse.stdout = captured.out  # what the verb printed before failing (inspect's report)
    line = one_line(captured.err)
    assert rc == code, line
    for text in (*map(str, names), *words):
        assert text in line, f"{text!r} not in {line!r}"
    assert snapshot(*sources) == before
    for out in outputs:
        assert not Path(out).exists(), f"{out} was written"
    assert hidden_temporaries(*{Path(o).parent for o in outputs}) == []
    return line


def refuse_subprocess(argv, *, sources=(), outputs=(), names=(), words=(), code=2, timeout=120,
                      mem_gb: float | None = None, cwd=ROOT) -> str:
    """The same for `python -m hpc ARGV` in a child (optionally with an address-space limit)."""
    before = snapshot(*sources)
    limit = None if mem_gb is None else int(mem_gb * 2**30)
    r = subprocess.run(hpc_cmd(*argv), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env={**os.environ, **QUIET_ENV},
                       preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))) if limit else None)
    line = one_line(r.stderr)
    assert r.returncode == code, line
    for text in (*map(str, names), *words):
        assert text in line, f"{text!r} not in {line!r}"
    assert snapshot(*sources) == before
    for out in outputs:
        assert not Path(out).exists(), f"{out} was written"
    return line


def predict(world: Path, *args) -> list:
    return ["predict", "--checkpoint", world / "m.pt", "--quiet", "--device", "cpu", *args]


# ---------------------------------------------------------------- predict: outputs onto inputs
def _onto_data_via_other_header(w, tmp):  # -o in_siemens.hs: its data file is the input's in_siemens.s
    return [w / "in_siemens.s.hdr", "--mask", w / "mask_siemens.s.hdr", "-o", w / "in_siemens.hs"], w / "in_siemens.s"


def _onto_mask_header(w, tmp):
    return [w / "in_siemens.s.hdr", "--mask", w / "mask_siemens.s.hdr", "-o", w / "mask_siemens.s.hdr"], \
        w / "mask_siemens.s.hdr"


def _onto_raw_mask(w, tmp):
    return [w / "in.raw", "--shape", f"1,{sum(AXIAL)},{V},{X}", "--dtype", "uint16", "--mask", w / "m.raw",
            "-o", w / "m.raw"], w / "m.raw"


def _through_symlink(w, tmp):
    (tmp / "alias.s").symlink_to(w / "in_siemens.s")
    return [w / "in_siemens.s.hdr", "--mask", w / "mask_siemens.s.hdr", "-o", tmp / "alias.s.hdr"], w / "in_siemens.s"


def _through_dotdot(w, tmp):
    return [w / "in_siemens.s.hdr", "--mask", w / "mask_siemens.s.hdr", "-o",
            Path(f"{w}/nowhere/../././in_siemens.s.hdr")], w / "in_siemens.s.hdr"


def _hard_link(w, tmp):
    os.link(w / "mask_siemens.s", tmp / "hard.s")
    return [w / "in_siemens.s.hdr", "--mask", w / "mask_siemens.s.hdr", "-o", tmp / "hard.s.hdr"], "mask_siemens.s"


def _onto_mult(w, tmp):  # --mult/--randoms files (data.fill=reproject) are inputs too
    return [w / "in_siemens.s.hdr", "--mask", w / "mask_siemens.s.hdr", "--mult", w / "inb_siemens.s.hdr", "-o",
            w / "inb_siemens.hs"], \
        w / "inb_siemens.s"


def _several_into_their_own_dir(w, tmp):
    return [w / "in_siemens.s.hdr", w / "inb_siemens.s.hdr", "--mask", w / "mask_siemens.s.hdr",
            w / "maskb_siemens.s.hdr", "-o", w], w / "in_siemens.s.hdr"


@pytest.mark.parametrize("case", [_onto_data_via_other_header, _onto_mask_header, _onto_raw_mask, _through_symlink,
                                  _through_dotdot, _hard_link, _onto_mult, _several_into_their_own_dir])
def test_predict_never_writes_onto_an_input_or_mask(world, tmp_path, capsys, case):
    """Issue 12.1: refused before anything is written, whatever path spelling leads there."""
    args, victim = case(world, tmp_path)
    refuse(capsys, predict(world, *args), sources=[world], names=[victim], words=["would overwrite"])


def test_predict_refuses_outputs_inside_the_input_dataset(world, capsys):
    ds = world / "ds-none"
    refuse(capsys, predict(world, ds, "--format", "h5", "-o", ds / "shards" / "fixed"), sources=[world],
           outputs=[ds / "shards" / "fixed"], names=[ds], words=["inside the input dataset"])


# ---------------------------------------------------------------- predict/export/evaluate: checkpoints
@pytest.mark.parametrize("verb", ["predict", "export", "evaluate"])
def test_nan_checkpoints_are_refused(world, tmp_path, capsys, verb):
    """Issue 12.2: a diverged run's weights are refused by every consumer."""
    out = tmp_path / "out"
    argv = {"predict": ["predict", world / "in_siemens.s.hdr", "--mask", world / "mask_siemens.s.hdr", "-o", out],
            "export": ["export", "--format", "torchscript", "-o", out],
            "evaluate": ["evaluate", "--dataset", world / "ds-none", "--split", "all", "-o", out]}[verb]
    refuse(capsys, [argv[0], "--checkpoint", world / "nan.pt", *argv[1:]], sources=[world], outputs=[out],
           names=[world / "nan.pt"], words=["not finite", "NaN"])


def test_pickled_objects_are_refused_without_advising_weights_only_false(world, tmp_path, capsys):
    line = refuse(capsys, ["predict", "--checkpoint", world / "evil.pt", world / "in_siemens.s.hdr", "--mask",
                           world / "mask_siemens.s.hdr", "-o", tmp_path / "o.s.hdr"], sources=[world],
                  outputs=[tmp_path / "o.s.hdr"], names=[world / "evil.pt"], words=["refused"])
    assert "weights_only=False" not in line and "trust" not in line


def test_a_flipped_byte_in_checkpoint_tensors_fails_its_checksum(world, tmp_path, capsys):
    from hpc.train.checkpoint import Checkpointer

    state = torch.load(world / "m.pt", weights_only=True)
    path = Checkpointer(tmp_path).save(state, 1)
    raw = bytearray(path.read_bytes())
    weights = state["model"][next(iter(state["model"]))].numpy().tobytes()
    at = bytes(raw).find(weights[:16])  # the first tensor's bytes, stored uncompressed in the zip
    assert at > 0
    raw[at + 3] ^= 0x40
    path.write_bytes(bytes(raw))
    refuse(capsys, ["export", "--checkpoint", path, "--format", "torchscript", "-o", tmp_path / "x.pt"],
           outputs=[tmp_path / "x.pt"], names=[path], words=["checksum mismatch"])


# ---------------------------------------------------------------- predict: outputs that cannot be written
def test_predict_h5_on_a_full_disk(world, tmp_path, tmpfs, capsys):
    """Issue 12.4: was a raw OSError and a segfault (exit 139)."""
    disk = tmpfs("64k")
    out = disk / "fixed.h5"
    data = np.random.default_rng(5).integers(0, 60, (1000, V, X)).astype("<u2")  # 192 kB of slices
    h = write_sinogram(tmp_path / "big", data)
    refuse(capsys, ["predict", "--checkpoint", world / "plain.pt", "--quiet", "--device", "cpu", h, "--format", "h5",
                    "-o", out], sources=[world, tmp_path / "big.s"], outputs=[out], names=[out],
           words=["no space left on device"])
    assert list(disk.iterdir()) == []


def test_predict_into_a_read_only_directory(world, tmpfs, capsys):
    out = tmpfs("64k", readonly=True) / "fixed.s.hdr"
    refuse(capsys, predict(world, world / "in_siemens.s.hdr", "--mask", world / "mask_siemens.s.hdr", "-o", out),
           sources=[world], outputs=[out], names=["fixed.s"], words=["read-only file system"])


def test_predict_planted_temporary_symlink_is_never_followed(world, tmp_path, capsys):
    """Issue 12.3: a symlink at the old fixed temporary name `.<name>.tmp` made predict --format h5
    overwrite any file. Not an error: the output is written, the victim untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / ".fixed.h5.tmp").symlink_to(victim)
    rc = main([str(a) for a in predict(world, world / "in_siemens.s.hdr", "--mask", world / "mask_siemens.s.hdr",
                                       "--format", "h5", "-o", tmp_path / "fixed.h5")])
    assert rc == 0 and victim.read_bytes() == b"precious"
    with h5py.File(tmp_path / "fixed.h5", "r") as f:
        assert f["repaired"].shape == (sum(AXIAL), V, X)


def test_predict_float_mask_with_nan_is_an_error(world, tmp_path, capsys):
    out = tmp_path / "o.s.hdr"
    refuse(capsys, predict(world, world / "in_siemens.s.hdr", "--mask", world / "nanmask.s.hdr", "-o", out),
           sources=[world], outputs=[out], names=[world / "nanmask.s.hdr"], words=["slice 3", "NaN"])


# ---------------------------------------------------------------- converted datasets: integrity on read
def corrupt_copy(world: Path, tmp: Path, comp: str, shard: str = "in_siemens-0000.h5", index: int = 2) -> Path:
    ds = tmp / f"ds-{comp}"
    shutil.copytree(world / f"ds-{comp}", ds)
    flip_chunk_byte(ds / "shards" / shard, "target", index)
    return ds


@pytest.mark.parametrize("comp", ["none", "lzf"])
def test_predict_names_the_corrupt_shard_and_slice(world, tmp_path, capsys, comp):
    """Issue 12.6: fletcher32 on every chunk; a flipped bit is found on read, not used silently."""
    ds = corrupt_copy(world, tmp_path, comp)
    out = tmp_path / "fixed"
    refuse(capsys, predict(world, ds, "--format", "h5", "-o", out), sources=[ds],
           outputs=[out / "in_siemens_repaired.h5"], names=[ds / "shards" / "in_siemens-0000.h5"],
           words=["'target' slice 2"])


def test_evaluate_corrupt_lzf_shard_writes_no_panels_and_no_report(world, tmp_path, capsys):
    ds = corrupt_copy(world, tmp_path, "ev", shard="ev-0000.h5", index=4)
    out = tmp_path / "eval"
    refuse(capsys, ["evaluate", "--checkpoint", world / "ev.pt", "--dataset", ds, "--split", "all", "-o", out,
                    "--quiet", "--device", "cpu", "--baselines", "linear"], sources=[ds],
           outputs=[out / "report.md", out / "panels" / "ev.png", out / "metrics.json"], names=["ev-0000.h5"],
           words=["slice 4"])


def test_inspect_verify_names_a_bit_flip_in_an_uncompressed_shard(world, tmp_path, capsys):
    ds = corrupt_copy(world, tmp_path, "none")
    line = refuse(capsys, ["inspect", ds, "--verify"], sources=[ds], names=[ds], words=["failing checksum"])
    assert "1 shard(s)" in line
    assert "BAD (dataset 'target' slice 2 (study slice 2) checksum mismatch (fletcher32)" in refuse.stdout


def test_inspect_png_of_a_corrupt_slice(world, tmp_path, capsys):
    ds = corrupt_copy(world, tmp_path, "lzf", index=0)
    png = tmp_path / "p.png"
    refuse(capsys, ["inspect", ds, "--png", png, "--study", "in_siemens", "--slices", "2"], sources=[ds],
           outputs=[png], names=["in_siemens-0000.h5"], words=["slice 0"])


def _manifest(ds: Path, edit) -> None:
    m = json.loads((ds / "manifest.json").read_text())
    edit(m)
    (ds / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("path", ["../other/x.h5", "/etc/passwd", "shards/../../x.h5"])
def test_manifest_shard_paths_stay_inside_the_dataset(world, tmp_path, capsys, path):
    ds = tmp_path / "ds"
    shutil.copytree(world / "ds-none", ds)
    _manifest(ds, lambda m: m["studies"][0]["shards"][0].update(path=path))
    refuse(capsys, ["inspect", ds], sources=[ds], names=[ds / "manifest.json"], words=[path, "outside the dataset"])


def test_inspect_verify_compares_manifest_slice_counts_with_the_shards(world, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(world / "ds-none", ds)

    def edit(m):
        st = m["studies"][0]
        st["num_slices"] += 1
        st["shards"][0]["num_slices"] += 1
    _manifest(ds, edit)
    refuse(capsys, ["inspect", ds, "--verify"], sources=[ds], names=[ds], words=["1 shard(s)"])
    assert "BAD (manifest.json lists 7 slices, the shard holds 6)" in refuse.stdout


def test_inspect_png_of_an_unknown_study(world, tmp_path, capsys):
    png = tmp_path / "p.png"
    refuse(capsys, ["inspect", world / "ds-none", "--png", png, "--study", "nope"], sources=[world], outputs=[png],
           names=[world / "ds-none"], words=["no study 'nope'"])


@pytest.mark.parametrize("target", ["manifest", "shard", "shard itself"])
def test_inspect_png_never_overwrites_what_it_draws(world, capsys, target):
    ds = world / "ds-none"
    shard = sorted((ds / "shards").rglob("*.h5"))[0]
    what, png = {"manifest": (ds, ds / "manifest.json"), "shard": (ds, shard), "shard itself": (shard, shard)}[target]
    refuse(capsys, ["inspect", what, "--png", png], sources=[world], names=[png], words=["would overwrite the input"])


def test_inspect_png_into_a_read_only_directory(world, tmpfs, capsys):
    png = tmpfs("64k", readonly=True) / "p.png"
    refuse(capsys, ["inspect", world / "ds-none", "--png", png], sources=[world], outputs=[png], names=[png],
           words=["read-only file system"])


def test_evaluate_output_is_an_existing_file(world, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    refuse(capsys, ["evaluate", "--checkpoint", world / "m.pt", "--dataset", world / "ds-none", "-o", out],
           sources=[world, out], names=[out], words=["not a directory"])


def test_evaluate_into_a_read_only_directory(world, tmpfs, capsys):
    out = tmpfs("64k", readonly=True) / "ev"
    refuse(capsys, ["evaluate", "--checkpoint", world / "ev.pt", "--quiet", "--device", "cpu", "--study",
                    world / "ev.s.hdr", world / "ev.s.hdr", world / "evmask.s.hdr", "-o", out],
           sources=[world], outputs=[out], names=[out], words=["read-only file system"])


def test_evaluate_float_mask_with_nan(world, tmp_path, capsys):
    out = tmp_path / "eval"
    refuse(capsys, ["evaluate", "--checkpoint", world / "ev.pt", "--quiet", "--device", "cpu", "--study",
                    world / "ev.s.hdr", world / "ev.s.hdr", world / "evnan.s.hdr", "-o", out],
           sources=[world], outputs=[out / "report.md"], names=[world / "evnan.s.hdr"], words=["NaN"])


@pytest.mark.parametrize("studies,words", [
    ([{"id": "../../escaped", "files": {}}], ["'../../escaped'", "not a plain name"]),  # panels/<id>.png outside -o
    (5, ["not a list"]),
    ([{"name": "s"}], ["malformed", "'id'"]),
    ("fifo", ["named pipe"]),
])
def test_evaluate_simulation_with_a_hostile_studies_json(world, tmp_path, capsys, studies, words):
    sim = tmp_path / "sim"
    sim.mkdir()
    if studies == "fifo":
        os.mkfifo(sim / "studies.json")
    else:
        for r in studies if isinstance(studies, list) else []:
            r.setdefault("files", {}).update({"gaps": str(world / "ev.s.hdr"), "target": str(world / "ev.s.hdr"),
                                              "mask": str(world / "evmask.s.hdr")})
        (sim / "studies.json").write_text(json.dumps({"studies": studies}))
    out = tmp_path / "a" / "b" / "ev"
    refuse(capsys, ["evaluate", "--checkpoint", world / "ev.pt", "--quiet", "--device", "cpu", "--simulation", sim,
                    "-o", out], sources=[world], outputs=[out, out.parent / "escaped.png"],  # out/panels/../../
           names=[sim / "studies.json"], words=words)


# ---------------------------------------------------------------- export
def test_export_huge_slice_shape_is_refused_before_allocating(world, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    refuse(capsys, ["export", "--checkpoint", world / "m.pt", "--format", "onnx", "-o", out, "--slice-shape",
                    "100000,100000"], sources=[world], outputs=[out], names=["100000,100000"], words=["larger than"])


@pytest.mark.parametrize("spelling", ["same", "symlink", "dotdot"])
def test_export_never_overwrites_its_checkpoint(world, tmp_path, capsys, spelling):
    (tmp_path / "link.pt").symlink_to(world / "m.pt")
    out = {"same": world / "m.pt", "symlink": tmp_path / "link.pt", "dotdot": Path(f"{world}/x/../m.pt")}[spelling]
    refuse(capsys, ["export", "--checkpoint", world / "m.pt", "--format", "torchscript", "-o", out],
           sources=[world], names=[out, world / "m.pt"], words=["would overwrite the input"])


def test_export_into_a_read_only_directory(world, tmpfs, capsys):
    out = tmpfs("64k", readonly=True) / "m.pt"
    refuse(capsys, ["export", "--checkpoint", world / "m.pt", "--format", "torchscript", "-o", out],
           sources=[world], outputs=[out], names=[out], words=["read-only file system"])


# ---------------------------------------------------------------- convert: headers and data files
HEADER = ("!INTERFILE:=\n!name of data file:={data}\nnumber format:=unsigned integer\n!number of bytes per pixel:=2\n"
          "number of dimensions:=3\nmatrix size[1]:={x}\nmatrix size[2]:={v}\nmatrix size[3]:={planes}\n"
          "%number of TOF time bins:={tof}\n%segment table:={{{planes}}}\ndata offset in bytes[1]:=0\n"
          "!END OF INTERFILE:=\n")


def header(tmp: Path, name: str = "h", data: str = "d.s", x="4", v="3", planes="2", tof="1", size=48) -> Path:
    (tmp / name).write_text(HEADER.format(data=data, x=x, v=v, planes=planes, tof=tof))
    if size is not None and not (tmp / data).exists():
        (tmp / data).write_bytes(bytes(size))
    return tmp / name


@pytest.mark.parametrize("fields,words", [
    ({"x": "inf"}, ["matrix size [1]", "'inf'"]),
    ({"v": "1e400"}, ["matrix size [2]", "'1e400'"]),
    ({"x": "2.5"}, ["matrix size [1]", "'2.5'"]),
    ({"x": "99999999999999999999"}, ["matrix size [1]", "integer up to"]),
    ({"planes": "-2", "tof": "-3"}, ["invalid layout"]),  # -3 TOF bins x -2 planes must not be 6 slices
    ({"x": "0"}, ["invalid layout"]),
    ({"size": 40}, ["truncated"]),
    ({"size": 50}, ["size mismatch"]),
])
def test_convert_bad_sizes_are_one_line(tmp_path, capsys, fields, words):
    h = header(tmp_path, **fields)
    refuse(capsys, ["convert", "--quiet", h, "-o", tmp_path / "ds"], sources=[tmp_path], outputs=[tmp_path / "ds"],
           words=words)


@pytest.mark.parametrize("extra,words", [
    ("number of scan data types:=3000000000\n", ["number of scan data types", "3000000000"]),  # was a list per set
    ("number of scan data types:=0\n", ["number of scan data types", "is 0"]),  # was IndexError
    ("number of scan data types:=2\ndata offset in bytes[2]:=-48\n", ["invalid layout", "-48"]),
])
def test_convert_hostile_data_sets_are_one_line(tmp_path, capsys, extra, words):
    h = header(tmp_path)  # a Siemens prompts + randoms file's keys (hpc.io.headers), one of them hostile
    h.write_text(h.read_text().replace("!END OF INTERFILE", extra + "!END OF INTERFILE"))
    refuse(capsys, ["convert", "--quiet", h, "-o", tmp_path / "ds"], sources=[tmp_path], outputs=[tmp_path / "ds"],
           names=[h], words=words)


def test_convert_nan_in_the_randoms_data_set(tmp_path, capsys):
    """A float prompts + randoms file: NaN in the randoms (stored as `delayed`) is named, not stored."""
    h = header(tmp_path, size=None)
    h.write_text(h.read_text().replace("unsigned integer", "float").replace("pixel:=2", "pixel:=4")
                 .replace("!END OF INTERFILE", "number of scan data types:=2\nscan data type description[1]:=prompts\n"
                          "scan data type description[2]:=randoms\ndata offset in bytes[2]:=96\n!END OF INTERFILE"))
    data = np.ones((2, 2, 3, 4), np.float32)  # (data set, slice, V, X)
    data[1, 1, 2, 3] = np.nan
    (tmp_path / "d.s").write_bytes(data.astype("<f4").tobytes())
    refuse(capsys, ["convert", "--quiet", h, "-o", tmp_path / "ds"], sources=[h, tmp_path / "d.s"],
           outputs=[tmp_path / "ds" / "manifest.json"], names=[h], words=["slice 1", "NaN"])


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "dir"])
def test_convert_header_that_is_not_a_regular_file(tmp_path, capsys, special):
    """A FIFO would block open() forever and /dev/zero never end: refused before reading."""
    path = Path(special) if special.startswith("/") else tmp_path / special
    if special == "fifo":
        os.mkfifo(path)
    elif special == "dir":
        path.mkdir()
    refuse(capsys, ["convert", "--quiet", path, "-o", tmp_path / "ds"], outputs=[tmp_path / "ds"], names=[path],
           words=["not a header file"])


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_convert_data_file_that_is_not_a_regular_file(tmp_path, capsys, special):
    data = special if special.startswith("/") else str(tmp_path / special)
    if special == "fifo":
        os.mkfifo(data)
    h = header(tmp_path, data=data, size=None)
    refuse(capsys, ["convert", "--quiet", h, "-o", tmp_path / "ds"], sources=[h], outputs=[tmp_path / "ds"],
           names=[data], words=["not a regular file"])


def test_convert_raw_data_that_is_a_fifo(tmp_path, capsys):
    os.mkfifo(tmp_path / "x.raw")
    refuse(capsys, ["convert", "--quiet", tmp_path / "x.raw", "--shape", "1,2,3,4", "--dtype", "uint16", "-o",
                    tmp_path / "ds"], outputs=[tmp_path / "ds"], names=[tmp_path / "x.raw"], words=["named pipe"])


def test_a_2gb_data_file_given_as_the_header_is_not_read(tmp_path):
    """Was read whole (2 GB resident). Now refused by its size before reading, under a 1.5 GB
    address-space limit that reading it would break. A sparse file: no disk space used."""
    big = tmp_path / "scan.s"
    with open(big, "wb") as fh:
        fh.write(b"!INTERFILE :=\n" + b"x := 1\n" * 1000)
        fh.truncate(2 << 30)
    refuse_subprocess(["convert", "--quiet", big, "-o", tmp_path / "ds"], sources=[], outputs=[tmp_path / "ds"],
                      names=[big], words=["too large for a header"], mem_gb=1.5, timeout=60)


def test_convert_binary_header(tmp_path, capsys):
    (tmp_path / "b.hdr").write_bytes(b"!INTERFILE :=\n\x00\x01\x02")
    refuse(capsys, ["convert", "--quiet", tmp_path / "b.hdr", "-o", tmp_path / "ds"], sources=[tmp_path],
           outputs=[tmp_path / "ds"], words=["binary file"])


def test_convert_float_mask_with_nan(world, tmp_path, capsys):
    refuse(capsys, ["convert", "--quiet", world / "in_siemens.s.hdr", "--mask", world / "nanmask.s.hdr", "-o",
                    tmp_path / "ds"], sources=[world], outputs=[tmp_path / "ds" / "manifest.json"],
           names=[world / "nanmask.s.hdr"], words=["mask slice 3", "NaN"])


def test_convert_into_a_read_only_directory(world, tmpfs, capsys):
    out = tmpfs("64k", readonly=True) / "ds"
    refuse(capsys, ["convert", "--quiet", world / "in_siemens.s.hdr", "-o", out], sources=[world], outputs=[out],
           names=[out], words=["read-only file system"])


def test_convert_onto_a_full_disk(world, tmpfs, capsys):
    disk = tmpfs("64k")
    data = np.random.default_rng(6).integers(0, 60000, (400, 16, 20)).astype("<u2")  # 256 kB
    h = write_sinogram(world.parent / "big16", data)
    refuse(capsys, ["convert", "--quiet", h, "-o", disk / "ds", "--compression", "none"], sources=[world],
           outputs=[disk / "ds" / "manifest.json"], names=[disk / "ds" / "shards"], words=["no space left on device"])


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_convert_never_resumes_or_overwrites_into_a_users_directory(world, tmp_path, capsys, flag):
    """Issue 12.7: --resume into a directory that was not an hpc dataset deleted the user's own
    manifest.json and shards/*.h5."""
    mine = tmp_path / "mine"
    (mine / "shards").mkdir(parents=True)
    (mine / "manifest.json").write_text('{"my": "catalogue"}')
    with h5py.File(mine / "shards" / "in_siemens-0000.h5", "w") as f:
        f["x"] = np.arange(3)
    refuse(capsys, ["convert", "--quiet", world / "in_siemens.s.hdr", "-o", mine, flag], sources=[world, mine],
           names=[mine], words=["not a dataset written by hpc convert"])


# ---------------------------------------------------------------- convert: Ctrl-C and kill -9
def big_sources(tmp: Path, n: int = 2) -> list[Path]:
    """Studies big enough that a gzip conversion takes a while (to be interrupted half-way)."""
    rng = np.random.default_rng(5)
    return [write_sinogram(tmp / f"big{k}", rng.normal(100, 30, (96, 96, 128)).astype("<f4")) for k in range(n)]


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child its new parent has not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_convert(sources: list[Path], out: Path, *extra: str) -> subprocess.Popen:
    # its own session: Ctrl-C in a terminal signals the whole process group, as killpg does here
    return subprocess.Popen(hpc_cmd("convert", *sources, "-o", out, "--shard-slices", "4", "--compression", "gzip",
                                    "--quiet", *extra), stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **QUIET_ENV}, start_new_session=True)


def wait_until(cond, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("pool", [("--workers", "1"), ("--workers", "2"), ("--processes", "2")],
                         ids=["threads-1", "threads-2", "processes-2"])
def test_ctrl_c_during_convert_exits_130_with_no_partial_output(tmp_path, pool):
    """Was sometimes exit 0 (swallowed), sometimes `BufferError: cannot close exported pointers
    exist`. Always 130, one line, no manifest, no temporary shard, no worker left running
    (compressing threads: --workers; worker processes: --processes)."""
    sources = big_sources(tmp_path)
    before = snapshot(*[s.parent for s in sources])
    out = tmp_path / "ds"
    proc = start_convert(sources, out, *pool)
    # shards appear as hidden temporaries first (one pass writes a study's shards, then renames them)
    wait_until(lambda: list((out / "shards").glob("*.h5*")) if out.exists() else False)
    workers_seen = children(proc.pid) if pool[0] == "--processes" else []
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert one_line(err) == "hpc convert: interrupted"
    assert not (out / "manifest.json").exists() and hidden_temporaries(out) == []
    wait_until(lambda: not any(map(running, workers_seen)), timeout=20)
    sources_after = snapshot(*[s.parent for s in sources])
    assert {k: v for k, v in sources_after.items() if "/ds/" not in k} == before


def test_kill_9_of_convert_takes_its_workers_with_it(tmp_path):
    """Issue 12.8: workers were re-parented and kept writing after `kill -9` of hpc convert."""
    out = tmp_path / "ds"
    proc = start_convert(big_sources(tmp_path, 3), out, "--processes", "2")
    wait_until(lambda: len(children(proc.pid)) >= 3)  # the resource tracker and two workers
    wait_until(lambda: list((out / "shards").glob(".*.tmp")) if out.exists() else False)
    workers = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    wait_until(lambda: not any(map(running, workers)), timeout=20)
    written = {p: p.stat().st_size for p in (out / "shards").iterdir()}
    time.sleep(1.0)
    assert {p: p.stat().st_size for p in (out / "shards").iterdir() if p in written} == written  # nobody writes


# ---------------------------------------------------------------- YAML
def bomb(levels: int = 9) -> str:
    """A "billion laughs" as one YAML flow list: 9**levels values from a few hundred bytes of
    anchors and aliases (a validator printing it would build gigabytes)."""
    items = ["&a0 [1,1,1,1,1,1,1,1,1]"] + [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def test_yaml_alias_bomb_config_is_refused_in_bounded_time_and_memory(tmp_path):
    """Was 2.7 GB and 46 s, spent building the error message about data.split."""
    (tmp_path / "bomb.yaml").write_text(f"data:\n  split: {bomb()}\n")
    refuse_subprocess(["sbatch", "-t", "plain", "--config", tmp_path / "bomb.yaml", "--print"], sources=[tmp_path],
                      names=[tmp_path / "bomb.yaml"], words=["expands to more than"], mem_gb=1.0, timeout=60)


def test_yaml_alias_bomb_in_an_override_is_refused():
    refuse_subprocess(["sbatch", "-t", "plain", "--config", TINY, "--print", f"data.split={bomb()}"],
                      words=["override", "expands to more than"], mem_gb=1.0, timeout=60)


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_config_that_is_not_a_regular_file(tmp_path, special):
    path = Path(special) if special.startswith("/") else tmp_path / special
    if special == "fifo":
        os.mkfifo(path)
    refuse_subprocess(["sbatch", "-t", "plain", "--config", path, "--print"], names=[path],
                      words=["config file"], timeout=60)  # "not a config file" / "config file not found"


# ---------------------------------------------------------------- staging (sbatch -t dgx --stage-to)
@pytest.mark.parametrize("path,stage_to,words", [
    ("", "{tmp}/local", ["data.path", "not set"]),
    ("/", "{tmp}/local", ["/", "not a converted dataset"]),
    ("{ds}", "{ds}/local", ["--stage-to", "overlaps data.path"]),
    ("{ds}", "/", ["--stage-to", "filesystem root"]),
])
def test_staging_refuses_empty_root_or_overlapping_paths_when_rendering(world, tmp_path, capsys, path, stage_to,
                                                                        words):
    """Issue 12.9: `rsync -a --delete "$DATA/" "$STAGE_TO/"` with data.path unset copied / and
    deleted whatever was in the target."""
    fill = {"tmp": tmp_path, "ds": world / "ds-none"}
    refuse(capsys, ["sbatch", "-t", "dgx", "--config", TINY, "--print", "--stage-to", stage_to.format(**fill),
                    f"data.path={path.format(**fill)}"], sources=[world], words=words)


def stage(script: str, src: Path, dst: Path) -> subprocess.CompletedProcess:
    """Run the rendered script's stage_dataset function with real bash and rsync."""
    fn = script[script.index("stage_dataset() {"):script.index("\n}\n", script.index("stage_dataset() {")) + 3]
    return subprocess.run(["bash", "-c", fn + 'stage_dataset "$0" "$1"', str(src), str(dst)], capture_output=True,
                          text=True, timeout=60)


def test_staging_deletes_only_inside_its_own_marked_copy(world, tmp_path, capsys):
    assert main(["sbatch", "-t", "dgx", "--config", str(TINY), "--print", "--stage-to", str(tmp_path / "x"),
                 f"data.path={world / 'ds-none'}"]) == 0
    script = capsys.readouterr().out
    src, local, users = world / "ds-none", tmp_path / "local", tmp_path / "users"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    r = stage(script, src, users)  # a wrong --stage-to: refused, nothing deleted
    assert r.returncode == 2 and "not a staging of" in r.stderr and (users / "thesis.tex").exists()
    assert stage(script, src, local).returncode == 0  # empty: becomes a marked staging
    assert snapshot(src) == {k.replace(str(local), str(src)): v for k, v in snapshot(local).items()
                             if not k.endswith(".hpc-staging")}
    (local / "stale.h5").write_text("old shard")
    assert stage(script, src, local).returncode == 0 and not (local / "stale.h5").exists()  # our copy: mirrored
    for bad in (tmp_path / "empty-no-manifest", Path("/")):
        r = stage(script, bad, tmp_path / "other")
        assert r.returncode == 2 and "refusing source" in r.stderr


# ---------------------------------------------------------------- training
@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("train") / "ds", studies=3, views=16, bins=16, mask=True, counts=True)


def train_args(data: Path, run: Path, *overrides: str) -> list:
    return ["train", "--config", TINY, f"data.path={data}", f"train.run_dir={run}", *overrides]


def test_training_into_a_read_only_run_directory(train_data, tmpfs):
    run = tmpfs("64k", readonly=True) / "run"
    r = subprocess.run(hpc_cmd(*train_args(train_data, run, "train.samples=16")), capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env={**os.environ, **QUIET_ENV})
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(run) in errors[0] and "read-only file system" in errors[0].lower(), errors[0]
    assert not run.exists()


def test_diverging_training_stops_with_exit_2_and_never_writes_nan(train_data, tmp_path):
    """Issue 12.2: with optim.lr=1e10 the run exited 0, wrote all-NaN checkpoints, rotated the good
    ones out, and a rerun resumed from NaN."""
    run = tmp_path / "run"
    r = subprocess.run(hpc_cmd(*train_args(train_data, run, "train.samples=16")), capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env={**os.environ, **QUIET_ENV})
    assert r.returncode == 0, r.stderr
    good = sorted((run / "checkpoints").glob("*.pt"))
    r = subprocess.run(hpc_cmd(*train_args(train_data, run, "train.samples=400", "optim.lr=1e10", "train.val_every=0",
                                           "checkpoint.every=8")), capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**os.environ, **QUIET_ENV})
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    line = errors[0]
    assert str(run) in line and "step " in line and ("nan" in line or "inf" in line or "NaN" in line), line
    assert "no checkpoint written" in line
    for path in sorted((run / "checkpoints").glob("*.pt")):
        assert ck_finite(path), f"{path} holds NaN/inf"
    assert set(good) <= set((run / "checkpoints").glob("*.pt"))  # the good ones were not rotated out
    assert not (run / "train.lock").exists()


def ck_finite(path: Path) -> bool:
    from hpc.train import checkpoint as ck

    return ck.nonfinite(ck.load(path), ("model", "optim")) is None


def test_two_trainers_never_share_a_run_directory(train_data, tmp_path):
    """Issue 12.5: both ran and interleaved metrics.jsonl and checkpoints. The second is refused,
    naming the first; once the first is killed, its lock is taken over with a message."""
    run = tmp_path / "run"
    first = subprocess.Popen(hpc_cmd(*train_args(train_data, run, "train.samples=100000")), stderr=subprocess.PIPE,
                             text=True, cwd=ROOT, env={**os.environ, **QUIET_ENV})
    try:
        wait_until(lambda: (run / "train.lock").exists() or first.poll() is not None, timeout=180)
        assert first.poll() is None, first.stderr.read()
        refuse_subprocess(train_args(train_data, run, "train.samples=8"), sources=[train_data],
                          names=[run, f"pid {first.pid}"], words=["another hpc train"], timeout=300)
    finally:
        first.kill()
        first.wait()
    r = subprocess.run(hpc_cmd(*train_args(train_data, run, "train.samples=8")), capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env={**os.environ, **QUIET_ENV})
    assert r.returncode == 0 and f"taking over the lock of {run} from pid {first.pid}" in r.stderr, r.stderr
    assert not (run / "train.lock").exists()


@pytest.mark.parametrize("reader", [["data.workers=0"], ["data.workers=1"],
                                    pytest.param(["data.backend=dali", "data.workers=1"], marks=pytest.mark.dali)],
                         ids=["main", "dataloader-worker", "dali-worker"])
def test_training_on_a_corrupt_shard_names_it(train_data, tmp_path, reader):
    """Issue 12.6: a flipped bit changed training silently; now exit 2 naming shard and slice
    (also from a DataLoader or DALI worker process, whose error would otherwise carry its traceback)."""
    if "data.backend=dali" in reader:
        require_dali()
    ds = tmp_path / "ds"
    shutil.copytree(train_data, ds)
    for shard in sorted((ds / "shards").glob("*.h5")):
        flip_chunk_byte(shard, "target", 1)
    refuse_subprocess(train_args(ds, tmp_path / "run", *reader), sources=[ds],
                      names=[ds / "shards"], words=["'target' slice 1", "checksum mismatch"], timeout=300)


def test_training_on_a_manifest_escaping_the_dataset(train_data, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(train_data, ds)
    _manifest(ds, lambda m: m["studies"][1]["shards"][0].update(path="../../../etc/passwd"))
    refuse_subprocess(train_args(ds, tmp_path / "run"), sources=[ds], names=[ds / "manifest.json"],
                      words=["outside the dataset"], timeout=300)
