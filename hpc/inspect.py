"""Summarize a converted dataset, one shard, a checkpoint or a run directory.

A dataset or shard shows studies, slices, shape, dtype, compression, size and checksum status
(--verify re-reads every shard and compares the SHA-256 of each dataset). --png draws a few slices
of one study (target, and input/mask when present) so a person can look at the data.

examples:
  hpc inspect data/demo                          # dataset summary, one line per study
  hpc inspect data/demo --verify                 # + re-check every shard's checksums
  hpc inspect data/demo --png demo.png --study p01 --slices 6
  hpc inspect data/demo/shards/p01-0000.h5       # one shard: attributes and datasets
  hpc inspect runs/demo                          # run dir (config.yaml) or checkpoint (*.pt)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from hpc.errors import InputError
from hpc.io.atomic import atomic_path, refuse_onto
from hpc.io.shards import Dataset, open_shard, read_slab, verify_shard


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="dataset dir, shard (.h5), checkpoint (.pt) or run dir")
    p.add_argument("--verify", action="store_true", help="re-read shards and check their checksums")
    p.add_argument("--png", metavar="FILE", help="render slices of one study to this PNG")
    p.add_argument("--study", default="", help="study for --png (default: the first)")
    p.add_argument("--slices", type=int, default=4, help="number of slices for --png (evenly spaced)")


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _verify_status(path: Path, expected: dict | None, verify: bool, shard=None) -> str:
    """ok / not checked / MISSING / BAD (why). With the manifest's ``shard`` entry also its slice
    count and first slice against the shard's own datasets and attributes."""

    if not path.is_file():
        return "MISSING"
    if not verify:
        return "not checked"
    ok, why = verify_shard(path)
    if not ok:
        return f"BAD ({why})"
    if expected is not None:
        with open_shard(path) as f:
            stored = {name: d.attrs["sha256"] for name, d in f.items()}
            n, first = len(f["target"]), f.attrs.get("first_slice")
        if stored != expected:
            return "BAD (checksums differ from manifest.json)"
        if shard is not None and n != shard.num_slices:
            return f"BAD (manifest.json lists {shard.num_slices} slices, the shard holds {n})"
        if shard is not None and first is not None and int(first) != shard.first_slice:
            return f"BAD (manifest.json says first slice {shard.first_slice}, the shard {int(first)})"
    return "ok"


def _layout_problems(study) -> list[str]:
    """The manifest's own arithmetic: shards tile the study's slices in order, without gaps."""
    problems, expect = [], 0
    for sh in study.shards:
        if sh.first_slice != expect or sh.num_slices < 1:
            problems.append(f"shard {sh.path.name} starts at slice {sh.first_slice}, expected {expect}")
        expect = sh.first_slice + sh.num_slices
    if expect != study.num_slices:
        problems.append(f"shards hold {expect} slices, the study lists {study.num_slices}")
    return problems


def inspect_dataset(root: Path, verify: bool) -> tuple[str, int]:
    """(report text, number of bad shards)."""

    ds = Dataset.open(root)
    m = ds.manifest
    itemsize = np.dtype(ds.dtype).itemsize * ds.slice_shape[0] * ds.slice_shape[1]
    on_disk = sum(p.stat().st_size for s in ds.studies for p in s.shard_paths if p.is_file())
    lines = [
        f"dataset {root}  ({m['format']} v{m['format_version']}, {m.get('created_by', '?')}, {m.get('created', '?')})",
        f"  {len(ds.studies)} studies, {ds.num_slices} slices of {ds.slice_shape} {ds.dtype}, "
        f"scanner {ds.scanner or '?'}, scale {ds.scale:g}",
        f"  compression {m['options']['compression']}, {len(m['shards'])} shards, {_mb(on_disk)} on disk "
        f"({_mb(ds.num_slices * itemsize)} of target slices)",
        f"  {'study':<20} {'slices':>7} {'shards':>6} {'tof':>4} {'segs':>4}  {'input':<5} {'mask':<5} "
        f"{'max':>10}  checksums",
    ]
    bad = 0
    for s in ds.studies:
        status = [_verify_status(sh.path, sh.sha256, verify, sh) for sh in s.shards]
        status += [f"BAD ({p})" for p in _layout_problems(s)] if verify else []
        worst = next((st for st in status if st != "ok" and st != "not checked"), status[0])
        bad += sum(st.startswith(("BAD", "MISSING")) for st in status)
        lines.append(f"  {s.id:<20} {s.num_slices:>7} {len(s.shards):>6} {s.tof_bins:>4} {len(s.segments):>4}  "
                     f"{'yes' if s.has_input else 'no':<5} {'yes' if s.has_mask else 'no':<5} {s.max:>10g}  {worst}")
    return "\n".join(lines), bad


def _filters(dset) -> str:
    """HDF5 filter names of a dataset (h5py's ``.compression`` does not know plugin filters)."""
    plist = dset.id.get_create_plist()
    names = [plist.get_filter(i)[3].decode() for i in range(plist.get_nfilters())]
    return "+".join(names) or "none"


def inspect_shard(path: Path, verify: bool) -> tuple[str, int]:
    import h5py


    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: cannot open as HDF5: {exc}") from None
    with f:
        lines = [f"shard {path}  ({_mb(path.stat().st_size)} on disk)"]
        lines += [f"  {k} = {v}" for k, v in f.attrs.items() if k != "convert_key"]
        for name, d in f.items():
            lines.append(f"  /{name}: {d.shape} {d.dtype} chunks={d.chunks} filters={_filters(d)}")
    status = _verify_status(path, None, verify)
    lines.append(f"  checksums: {status}")
    return "\n".join(lines), int(status.startswith("BAD"))


def _read(f, k: int, data: dict[str, list], label: str) -> None:
    """Append slice ``k`` of an open shard's target/input/mask and its title to ``data``."""

    for role in ("target", "input", "mask"):
        if role in f:
            d = f[role]
            data.setdefault(role, []).append(read_slab(d, k, k + 1, f.filename)[0] if d.ndim == 3 else d[()])
    data["label"].append(f"{label}\n(tof {f['tof'][k]}, seg {f['segment'][k]}, ax {f['axial'][k]})")


def _spaced(n_total: int, n: int) -> list[int]:
    return [int(i) for i in np.unique(np.linspace(0, n_total - 1, max(1, n)).round())]


def slices_for_png(path: Path, study_id: str, n: int) -> tuple[dict[str, list], str]:
    """``n`` evenly spaced slices of a dataset's study (or of one shard): role -> list of (V, X)
    arrays, "label" -> panel titles; and a figure title."""

    data: dict[str, list] = {"label": []}
    if path.is_dir():
        ds = Dataset.open(path)
        study = ds.study(study_id) if study_id else ds.studies[0]
        for i in _spaced(study.num_slices, n):
            shard, k = study.locate(i)
            with open_shard(shard.path) as f:
                _read(f, k, data, f"{study.id} slice {i}")
        return data, f"{path.name}: study {study.id}, {study.num_slices} slices of {study.slice_shape}"
    with open_shard(path) as f:
        sid, first = f.attrs.get("study", "?"), int(f.attrs.get("first_slice", 0))
        for k in _spaced(len(f["target"]), n):
            _read(f, k, data, f"{sid} slice {first + k}")
        return data, f"{path.name}: study {sid}, slices {first}..{first + len(f['target']) - 1}"


def _inputs(path: Path) -> list[Path]:
    """The files ``path`` (a shard, or a dataset: its manifest and shards) consists of."""

    if not path.is_dir():
        return [path]
    return [path / "manifest.json", *(sh.path for s in Dataset.open(path).studies for sh in s.shards)]


def render_png(path: Path, png: Path, study_id: str, n: int) -> Path:
    """Rows: target / input / mask; columns: evenly spaced slices; a colorbar on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refuse_onto([png], _inputs(path))  # --png onto the shard (or manifest) it draws
    data, title = slices_for_png(path, study_id, n)
    roles = [r for r in ("target", "input", "mask") if r in data]
    cols = len(data["label"])
    # fixed margins in inches: a layout engine (constrained/tight) triples the rendering time
    width, height = 3.6 * cols + 0.3, 3.2 * len(roles) + 0.6
    fig, axes = plt.subplots(len(roles), cols, squeeze=False, figsize=(width, height),
                             gridspec_kw={"hspace": 0.5, "wspace": 0.3, "left": 0.55 / width,
                                          "right": 1 - 0.1 / width, "bottom": 0.45 / height,
                                          "top": 1 - 0.85 / height})
    for row, role in enumerate(roles):
        for col, img in enumerate(data[role]):
            ax = axes[row][col]
            kw = {"cmap": "gray", "vmin": 0, "vmax": 1} if role == "mask" else {"cmap": "inferno"}
            im = ax.imshow(img, aspect="auto", interpolation="nearest", **kw)
            ax.set_title(f"{role}: {data['label'][col]}", fontsize=8)
            ax.set_xlabel("bin", fontsize=7)
            ax.set_ylabel("view", fontsize=7)
            ax.tick_params(labelsize=6)
            fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
    fig.suptitle(title)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return png


def _describe_checkpoint(path: Path) -> str:
    try:
        from hpc.train.checkpoint import describe  # late: torch, only for checkpoints
    except ImportError as exc:
        raise InputError(f"{path}: checkpoints and run dirs need hpc.train.checkpoint.describe, which is not "
                         f"available in this install ({exc})") from None
    return describe(path)


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.suffix == ".pt" or (path.is_dir() and (path / "config.yaml").is_file()):
        print(_describe_checkpoint(path))
        return 0
    if path.is_dir():
        text, bad = inspect_dataset(path, args.verify)
    elif path.suffix in (".h5", ".hdf5"):
        text, bad = inspect_shard(path, args.verify)
    else:
        raise InputError(f"{path}: not a dataset dir, shard (.h5), checkpoint (.pt) or run dir")
    print(text)
    if args.png:
        print(f"wrote {render_png(path, Path(args.png), args.study, args.slices)}")
    if bad:
        raise InputError(f"{path}: {bad} shard(s) missing or failing checksum verification")
    return 0
