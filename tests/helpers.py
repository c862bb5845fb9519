"""Helpers shared by the test modules (tests import them from here, never from each other).

- CLI and services: ``run_hpc``/``hpc_cmd`` (the real CLI in a subprocess), ``require`` (skip on a
  laptop, FAIL under CI=true), ``mpirun_cmd``, ``require_dali``.
- Fixture writers that follow the specs rather than the code under test: ``make_dataset`` (a
  dataset per docs/FORMAT.md with plain h5py + json), ``write_stir``/``write_siemens_tof`` (Interfile
  by hand), ``make_checkpoint`` (a tiny untrained model saved the way hpc.train.train saves it).
- ``loader_cfg``/``decode`` for loader tests, ``shard_differences`` to compare converted datasets,
  ``records`` to read a run's metrics.jsonl.

Heavy modules (torch, h5py) are imported inside the functions that need them: conftest imports
this module for every test.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch

    from hpc.config import Config

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TINY = ROOT / "configs" / "tiny.yaml"  # the tiny training config the train tests use

IN_CI = os.environ.get("CI", "").lower() == "true"
V, X = 8, 12  # slice size of study() and make_checkpoint()
AXIAL = [4, 2]  # study()'s two segments: windows must not cross from one into the other


def require(what: str, available: bool, why: str = "") -> None:
    """Skip (laptop) or fail (CI=true) when a real service/dependency is missing."""
    if available:
        return
    msg = f"{what} not available{': ' + why if why else ''}"
    if IN_CI:
        pytest.fail(f"{msg} (CI=true: service tests must not skip)", pytrace=False)
    pytest.skip(msg)


def require_mpi() -> str:
    """Path of mpirun with a working mpi4py, or skip/fail."""
    mpirun = shutil.which("mpirun")
    ok = mpirun is not None
    why = "mpirun not on PATH (apt-get install openmpi-bin libopenmpi-dev)"
    if ok:
        r = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; MPI.COMM_WORLD.Get_rank()"],
                           capture_output=True, text=True, timeout=60)
        ok, why = r.returncode == 0, r.stderr.strip().splitlines()[-1:] or ["mpi4py failed"]
        why = why[0] if isinstance(why, list) else why
    require("MPI", ok, why)
    return mpirun


def env_lines(text: str) -> list[dict[str, str]]:
    """`hpc env` lines (one per rank) -> dicts sorted by RANK. Each rank writes its line in one write(2)
    (hpc/launch/rankenv.py), but mpirun forwards the ranks' streams as it reads them, so a line may
    arrive glued to the next one: find the lines rather than split on newlines."""
    found = re.findall(r"RANK=\d+ WORLD_SIZE=\d+ LOCAL_RANK=\d+ MASTER_ADDR=\S+ MASTER_PORT=\S+ LAUNCHER=[a-z]+", text)
    return sorted((dict(kv.split("=", 1) for kv in m.split()) for m in found), key=lambda row: int(row["RANK"]))


def mpirun_cmd(np_: int) -> list[str]:
    """mpirun prefix that works as root and on 2 cores."""
    return [require_mpi(), "--allow-run-as-root", "--oversubscribe", "-np", str(np_)]


def require_dali() -> None:
    try:
        import nvidia.dali  # noqa: F401
        ok, why = True, ""
    except Exception as exc:  # ImportError or a broken install
        ok, why = False, repr(exc)
    require("NVIDIA DALI", ok, why)


def hpc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpc", *map(str, args)]


def run_hpc(*args: str, check: bool = False, timeout: float = 600, env: dict | None = None,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (exit codes and stderr are part of the contract)."""
    full_env = {**os.environ, **(env or {})}
    r = subprocess.run(hpc_cmd(*args), capture_output=True, text=True, timeout=timeout,
                       env=full_env, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"hpc {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


# ---------------------------------------------------------------- hostile input: one line, exit 2
QUIET_ENV = {"PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled"}  # library warnings are not our output


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, f"expected one line, got:\n{err}"
    return lines[0]


def hidden_temporaries(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.exists() for p in d.rglob(".*.tmp")]


def refuse(capsys, argv, *, sources=(), outputs=(), names=(), words=(), code=2) -> str:
    """Run `hpc ARGV` here; assert the exit code, one line naming each of ``names`` and containing
    each of ``words``, sources unchanged, no output and no temporary file left."""
    from hpc.cli import main

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
                      mem_gb: float | None = None, cwd=ROOT, env: dict | None = None) -> str:
    """The same for `python -m hpc ARGV` in a child (optionally with an address-space limit; ``env``
    on top of QUIET_ENV, e.g. PYTHONWARNINGS=default where library warnings are the point)."""
    before = snapshot(*sources)
    limit = None if mem_gb is None else int(mem_gb * 2**30)
    r = subprocess.run(hpc_cmd(*argv), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env={**os.environ, **QUIET_ENV, **(env or {})},
                       preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))) if limit else None)
    line = one_line(r.stderr)
    assert r.returncode == code, line
    for text in (*map(str, names), *words):
        assert text in line, f"{text!r} not in {line!r}"
    assert snapshot(*sources) == before
    for out in outputs:
        assert not Path(out).exists(), f"{out} was written"
    return line


def records(run_dir: Path, kind: str) -> list[dict]:
    """The ``kind`` ("train", "val", ...) records of a run's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes()).hexdigest()


def make_dataset(root: Path, studies: int = 3, segments: tuple[int, ...] = (0,), axial: tuple[int, ...] = (8,),
                 tof: int = 1, views: int = 6, bins: int = 8, shard_slices: int = 5, paired: bool = False,
                 mask: bool = False, scanner: str = "", counts: bool = False, seed: int = 0,
                 aux: bool = False, expected: bool = False) -> Path:
    """A dataset dir per FORMAT.md. ``counts``: uint16 Poisson counts instead of encoded ids;
    ``aux``: float32 ``mult`` (0 on a few bins, like virtual crystals) and ``randoms`` datasets;
    ``expected``: float32 noise-free counts, the target + 0.25 (the same slice ids when encoded)."""
    import h5py

    rng = np.random.default_rng(seed)
    (root / "shards").mkdir(parents=True)
    n = tof * sum(axial)
    entries, shard_list, gid, scale = [], [], 0, 0.0
    for s in range(studies):
        if counts:
            target = rng.poisson(50, size=(n, views, bins)).astype(np.uint16)
        else:
            pix = np.arange(views * bins, dtype=np.float32).reshape(views, bins)
            target = (np.arange(gid, gid + n, dtype=np.float32)[:, None, None] * 1000 + pix)
        seg = np.repeat(np.tile(np.array(segments, np.int32), tof), np.tile(axial, tof))
        ax = np.concatenate([np.arange(a, dtype=np.int32) for a in axial] * tof)
        tf = np.repeat(np.arange(tof, dtype=np.int32), sum(axial))
        extra = {}
        if paired:
            extra["input"] = (target / 2).astype(target.dtype)
        if mask:
            extra["mask"] = (rng.random((n, views, bins)) > 0.3).astype(np.uint8)
        if aux:
            extra["mult"] = (rng.random((n, views, bins)) * (rng.random((n, views, bins)) > 0.05)).astype(np.float32)
            extra["randoms"] = rng.random((n, views, bins)).astype(np.float32)
        if expected:
            extra["expected"] = target.astype(np.float32) + np.float32(0.25)
        shards = []
        for k, lo in enumerate(range(0, n, shard_slices)):
            hi = min(n, lo + shard_slices)
            rel = f"shards/s{s}-{k:04d}.h5"
            arrays = {"target": target[lo:hi], "tof": tf[lo:hi], "segment": seg[lo:hi], "axial": ax[lo:hi],
                      **{name: a[lo:hi] for name, a in extra.items()}}
            with h5py.File(root / rel, "w") as f:
                f.attrs.update(format="hpc-sinogram", format_version=1, axes="slice,view,bin", study=f"s{s}")
                for name, a in arrays.items():
                    per_slice = {"chunks": (1, views, bins), "fletcher32": True} if a.ndim == 3 else {}
                    d = f.create_dataset(name, data=a, **per_slice)
                    d.attrs["sha256"] = _sha(a)
            shards.append({"path": rel, "first_slice": lo, "num_slices": hi - lo,
                           "sha256": {name: _sha(a) for name, a in arrays.items()},
                           "bytes": (root / rel).stat().st_size})
            shard_list.append(rel)
        scale = max(scale, float(target.max()))
        entries.append({"id": f"s{s}", "source": f"s{s}.s.hdr", "kind": "raw", "sha256": "0" * 64,
                        "num_slices": n, "slice_shape": [views, bins], "dtype": str(target.dtype),
                        "tof_bins": tof, "segments": list(segments), "axial_counts": list(axial),
                        "has_input": paired, "has_mask": mask, "has_mult": aux, "has_randoms": aux,
                        "has_expected": expected, "scanner": scanner,
                        "max": float(target.max()), "shards": shards})
        gid += n
    manifest = {"format": "hpc-sinogram", "format_version": 1, "slice_shape": [views, bins],
                "dtype": entries[0]["dtype"], "scanner": scanner, "scale": scale,
                "num_slices": gid, "studies": entries, "shards": shard_list}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def loader_cfg(path: Path, **data) -> Config:
    from hpc.config import Config

    cfg = Config()
    cfg.data.path = str(path)
    cfg.data.device = "cpu"
    cfg.data.workers = 0
    cfg.data.batch_size = 4
    cfg.data.run_length = 4
    cfg.data.context = 1
    cfg.data.split = [1.0, 0.0, 0.0]
    cfg.data.pad_multiple = 1
    cfg.data.normalize = "none"
    cfg.corrupt.dead_blocks = 0
    cfg.augment.enabled = False
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def decode(x: torch.Tensor) -> torch.Tensor:
    """Slice ids of encoded pixels (any shape ending in V, X)."""
    import torch

    return torch.div(x[..., 0, 0], 1000, rounding_mode="floor").long()


def make_checkpoint(path, *, inpaint: bool = True, slice_shape=(V, X), context: int = 1,
                    seed: int = 0, fill: str = "zero") -> Config:
    """A tiny untrained model saved the way hpc.train.train saves checkpoints (model, config, data);
    ``fill="linear"`` also feeds the gap mask as an input channel (the demo's setting)."""
    import torch

    from hpc.config import Config, to_dict
    from hpc.train.models import build_model

    cfg = Config()
    cfg.data.context, cfg.data.normalize, cfg.data.fill = context, "max", fill
    cfg.model.mask_input = fill == "linear"
    cfg.model.name, cfg.model.base, cfg.model.norm, cfg.model.inpaint = "light", 4, "none", inpaint
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.in_channels())
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    torch.nn.init.constant_(last.bias, 0.5)  # predictions around half the peak, not rounded to 0
    torch.save({"model": model.state_dict(), "optim": {}, "step": 0, "epoch": 0, "config": to_dict(cfg),
                "data": {"scale": 100.0, "slice_shape": list(slice_shape), "scanner": ""}}, path)
    return cfg


def make_reproject_checkpoint(path, iters: int | None = None, fill_iters: int = 4, fill: str = "reproject"):
    """make_checkpoint for the "test" scanner's 12 x 12 slices, its config saying data.fill=``fill``
    with ``fill_iters``; ``iters``: the reproject iteration count its validation chose (metrics)."""
    import torch

    from hpc.physics.geometry import get_scanner

    sc = get_scanner("test")
    make_checkpoint(path, slice_shape=(sc.views, sc.bins))  # same seed: the same weights every time
    state = torch.load(path, weights_only=True)
    state["config"]["data"]["fill"], state["config"]["data"]["fill_iters"] = fill, fill_iters
    state["data"]["scanner"] = "test"
    if iters is not None:
        state["metrics"] = {"reproject_iters": iters, "nmse_gap": 0.1}
    torch.save(state, path)
    return path


def study(tmp_path, fmt: str, dtype: str, seed: int = 1, tag: str = ""):
    """(gapped input header, mask header, clean data, mask) with ~1/4 of the pixels missing."""
    from hpc.io.sinogram import write_sinogram

    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 60, size=(1, sum(AXIAL), V, X)).astype(dtype)
    mask = (rng.random(clean.shape) > 0.25).astype(np.uint8)
    inp = write_sinogram(tmp_path / f"in{tag}_{fmt}", clean * mask.astype(dtype), fmt=fmt, axial_counts=AXIAL)
    msk = write_sinogram(tmp_path / f"mask{tag}_{fmt}", mask, fmt=fmt, axial_counts=AXIAL)
    return inp, msk, clean, mask


def studies(tmp_path, n: int) -> list[tuple]:
    """n gapped Siemens studies with their masks (different data, same layout)."""
    out = []
    for i in range(n):
        inp, msk, _, mask = study(tmp_path, "siemens", "<u2", seed=10 + i, tag=str(i))
        out.append((inp, msk, mask))
    return out


def convert_studies(tmp_path, sts) -> Path:
    """hpc convert of (input, mask, ...) studies into tmp_path/ds (the CLI, with their masks)."""
    ds = tmp_path / "ds"
    run_hpc("convert", *[s[0] for s in sts], "--mask", *[s[1] for s in sts], "-o", ds, "--quiet", check=True)
    return ds


def write_stir(tmp_path, segs, order, ring_diffs=True, name="s"):
    """STIR projection data by hand: segments in storage order, view-major or sinogram-major."""
    dtype, (_, V, X) = segs[0].dtype, segs[0].shape
    with open(tmp_path / f"{name}.s", "wb") as fh:
        for seg in segs:  # (A, V, X)
            fh.write(np.ascontiguousarray(seg.transpose(1, 0, 2) if order == "view" else seg).tobytes())
    k_ax, k_view = (2, 3) if order == "view" else (3, 2)
    counts = ",".join(str(len(s)) for s in segs)
    text = ("!INTERFILE  :=\nName of data file := %s.s\n!GENERAL DATA :=\n"  # noqa: UP031 (Interfile's % keys)
            "imagedata byte order := %s\n!Number Format := %s\n!number of bytes per pixel := %d\n"
            "number of dimensions := 4\nmatrix axis label [4] := segment\n!matrix size [4] := %d\n"
            "matrix axis label [%d] := view\n!matrix size [%d] := %d\n"
            "matrix axis label [%d] := axial coordinate\n!matrix size [%d] := { %s }\n"
            "matrix axis label [1] := tangential coordinate\n!matrix size[1] := %d\n"
            % (name, "BIGENDIAN" if dtype.byteorder == ">" else "LITTLEENDIAN",
               "float" if dtype.kind == "f" else "unsigned integer", dtype.itemsize, len(segs),
               k_view, k_view, V, k_ax, k_ax, counts, X))
    if ring_diffs:  # storage order 0, -1, +1 as STIR writes it
        text += "minimum ring difference per segment := { -1,-4,2 }\n"
        text += "maximum ring difference per segment := { 1,-2,4 }\n"
    text += "!END OF INTERFILE :=\n"
    (tmp_path / f"{name}.hs").write_text(text)
    return tmp_path / f"{name}.hs"


def write_siemens_tof(tmp_path, data, table, name="tof", fmt="signed integer"):
    """Siemens .s.hdr by hand: (T, planes, V, X) little-endian, plane order per TOF bin."""
    V, X = data.shape[-2:]
    data.astype(data.dtype.newbyteorder("<")).tofile(tmp_path / f"{name}.s")
    text = ("!INTERFILE:=\n%%comment:=test\n!originating system:=1104\n!name of data file:=%s.s\n"  # noqa: UP031 (Interfile's % keys)
            "number format:=%s\n!number of bytes per pixel:=%d\nnumber of dimensions:=3\n"
            "matrix size[1]:=%d\nmatrix size[2]:=%d\nmatrix size[3]:=%d\n"
            "%%number of TOF time bins:=%d\n%%number of segments:=%d\n%%segment table:={%s}\n"
            "data offset in bytes[1]:=0\n!END OF INTERFILE:=\n"
            % (name, fmt, data.dtype.itemsize, X, V, data.shape[1], data.shape[0], len(table),
               ",".join(map(str, table))))
    (tmp_path / f"{name}.s.hdr").write_text(text)
    return tmp_path / f"{name}.s.hdr"


def shard_differences(a: str | os.PathLike, b: str | os.PathLike, exact: bool = True) -> list[str]:
    """Compare the shards of two converted datasets; say *what* differs (names, datasets, dtypes,
    chunks, filters, attributes, values) in a few short lines, so a failure in CI's log tail is
    readable instead of a dump of raw HDF5 bytes. ``exact`` also requires equal bytes: right for
    none/gzip/blosc, wrong for lzf, whose bytes depend on what the process compressed before
    (h5py's liblzf leaves its hash table uninitialised; decoded values are always the same)."""
    import h5py
    import numpy as np

    def files(root):
        return {p.name: p for p in sorted((Path(root) / "shards").glob("*.h5"))}

    fa, fb = files(a), files(b)
    if fa.keys() != fb.keys():
        return [f"shard names differ: only in {a}: {sorted(fa.keys() - fb.keys())}, "
                f"only in {b}: {sorted(fb.keys() - fa.keys())}"]
    problems = []
    for name, pa in fa.items():
        da, db = pa.read_bytes(), fb[name].read_bytes()
        if da == db:
            continue
        first = next((i for i, (x, y) in enumerate(zip(da, db, strict=False)) if x != y), min(len(da), len(db)))
        why = [f"{name}: bytes differ ({len(da)} vs {len(db)} bytes, first at offset {first}):"]
        with h5py.File(pa, "r") as ha, h5py.File(fb[name], "r") as hb:
            if dict(ha.attrs).keys() != dict(hb.attrs).keys() or any(
                    np.any(ha.attrs[k] != hb.attrs[k]) for k in ha.attrs):
                why.append("  root attributes differ")
            for key in sorted(set(ha) | set(hb)):
                if key not in ha or key not in hb:
                    why.append(f"  dataset {key} only in one file")
                    continue
                x, y = ha[key], hb[key]
                for what in ("shape", "dtype", "chunks", "compression", "shuffle"):
                    if getattr(x, what) != getattr(y, what):
                        why.append(f"  {key}.{what}: {getattr(x, what)} vs {getattr(y, what)}")
                if dict(x.attrs) != dict(y.attrs):
                    why.append(f"  {key} attributes: {dict(x.attrs)} vs {dict(y.attrs)}")
                if x.shape == y.shape and not np.array_equal(x[()], y[()]):
                    why.append(f"  {key} values differ")
        if len(why) > 1:
            problems += why
        elif exact:
            problems += [*why, "  same datasets, attributes, chunks and filters: only the encoding differs"]
    return problems


def def_sections(path: Path) -> dict[str, str]:
    """{"header": ..., "arguments": ..., "files": ..., "post": ..., ...} of an Apptainer .def file
    (tests/test_containers.py compares it with the Dockerfile, tests/test_image.py builds it)."""
    sections, name = {"header": []}, "header"
    for line in Path(path).read_text().splitlines():
        if m := re.match(r"^%(\w+)\s*$", line):
            name = m.group(1)
            sections[name] = []
        else:
            sections[name].append(line)
    return {k: "\n".join(v).strip() for k, v in sections.items()}


def flip_chunk_byte(shard: Path, name: str = "target", index: int = 0, offset: int | None = None) -> None:
    """Flip one byte of the stored chunk ``index`` of ``shard``'s dataset ``name`` (its bytes on
    disk: compressed data, or raw data for an uncompressed shard), as a failing disk would."""
    import h5py

    with h5py.File(shard, "r") as f:
        info = f[name].id.get_chunk_info(index)
    at = info.byte_offset + (info.size // 2 if offset is None else offset)
    with open(shard, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0x5A]))


def snapshot(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under ``roots`` (path -> digest): sources must be byte-identical after."""
    out = {}
    for root in roots:
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def lm_scanner(**kw):
    """An mMR-like scanner small enough for brute-force references (list mode, norm, randoms): 8
    blocks of 9 crystals with one virtual crystal each, 8 rings, 48 bins; ``kw`` overrides fields."""
    from hpc.physics.geometry import Scanner

    args = dict(name="lmtest", stir_name="hpc lm test", rings=8, detectors_per_ring=72, block_trans=9,
                block_axial=4, bins=48, inner_radius_mm=100.0, doi_mm=5.0, bin_size_mm=4.0, ring_spacing_mm=4.0,
                virtual_trans=1, span=3, max_ring_diff=7)
    args.update(kw)
    return Scanner(**args)
