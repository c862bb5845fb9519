"""Download the wheels a GPU node without a package registry needs beyond its image.

The node's python3 (3.12, a venv holding torch, h5py, numpy, pyyaml, pytest, ...) lacks what hpc
imports at top level for reading shards: hdf5plugin (the blosc filter) and numcodecs. DALI (an
extra, ~200 MB) and the dependencies of it that the image lacks come with --dali, into their own
folder: they travel in parts (bench/dali_parts.py). Versions are pinned: one version of each.

    python bench/gpu_wheels.py                         # .gpu-wheels/ for the node (cp312), ~54 MiB
    python bench/gpu_wheels.py --dali                  # .dali/wheels-cp312/ (DALI and its extras)
    python bench/gpu_wheels.py --python-version local -d /tmp/w   # the same set for this Python

A folder that already holds every pinned wheel for that Python is left as it is (no download);
wheels of other versions or Pythons of the same packages are removed from it.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What hpc imports beyond the node's image (the image has h5py, numpy, torch, pyyaml, xxhash, ...).
NODE = {"hdf5plugin": "7.1.0", "numcodecs": "0.16.6"}
# DALI for CUDA 13 and the dependencies the image lacks. Its nvimgcodec and nvcomp (image decoders,
# decompression: ~52 MiB) are loaded only by operators hpc does not use; --codecs adds them.
DALI = {"nvidia-dali-cuda130": "2.4.0", "astunparse": "1.6.3", "gast": "0.7.0", "libcst": "1.9.0",
        "makefun": "1.16.0", "nvtx": "0.2.17", "optree": "0.20.0"}
CODECS = {"nvidia-libnvcomp-cu13": "6.0.0.12", "nvidia-nvimgcodec-cu13": "0.9.0.20"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-d", "--dest", type=Path, help="folder (default .gpu-wheels, or .dali/wheels-cpXY with --dali)")
    ap.add_argument("--python-version", default="3.12", help="X.Y of the Python that installs them, or 'local'")
    ap.add_argument("--dali", action="store_true", help="DALI and its dependencies instead of hpc's")
    ap.add_argument("--codecs", action="store_true", help="with --dali: also DALI's image codecs and nvcomp")
    args = ap.parse_args(argv)
    if args.python_version == "local":
        args.python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    parts = args.python_version.split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        ap.error(f"--python-version: expected X.Y or 'local', got {args.python_version!r}")
    if args.codecs and not args.dali:
        ap.error("--codecs: only with --dali")
    tag = "".join(parts)
    args.dest = args.dest or (ROOT / (f".dali/wheels-cp{tag}" if args.dali else ".gpu-wheels"))
    args.pins = {**DALI, **(CODECS if args.codecs else {})} if args.dali else dict(NODE)
    args.tag = tag
    return args


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


def _fits(wheel: Path, tag: str) -> bool:
    """A wheel for CPython X.Y (``tag`` = "XY"): pure-Python and py3 wheels fit every Python."""
    python_tag = wheel.name.split("-")[-3]
    return f"cp{tag}" in python_tag or not python_tag.startswith("cp")


def stale(dest: Path, pins: dict[str, str], tag: str) -> list[Path]:
    """Wheels in ``dest`` of a pinned package but another version or Python."""
    names = {_norm(n): v for n, v in pins.items()}
    out = []
    for w in dest.glob("*.whl"):
        name, version = w.name.split("-")[:2]
        if _norm(name) in names and (version != names[_norm(name)] or not _fits(w, tag)):
            out.append(w)
    return out


def missing(dest: Path, pins: dict[str, str], tag: str) -> dict[str, str]:
    """The pins with no fitting wheel in ``dest``."""
    have = {(_norm(w.name.split("-")[0]), w.name.split("-")[1]) for w in dest.glob("*.whl") if _fits(w, tag)}
    return {n: v for n, v in pins.items() if (_norm(n), v) not in have}


def download(dest: Path, pins: dict[str, str], python_version: str) -> None:
    """pip download of exactly these wheels (no dependencies: each is pinned here) for that Python."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    r = subprocess.run(cmd + [f"{n}=={v}" for n, v in pins.items()], capture_output=True, text=True)
    if r.returncode != 0:
        errors = [line for line in r.stderr.splitlines() if line.startswith("ERROR")] or r.stderr.splitlines()[-1:]
        raise SystemExit(f"gpu_wheels: pip download failed: {' '.join(errors)[:300]}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for w in stale(args.dest, args.pins, args.tag):
        w.unlink()  # two versions of one package stop a --no-deps install
    todo = missing(args.dest, args.pins, args.tag)
    if todo:
        download(args.dest, todo, args.python_version)
    left = missing(args.dest, args.pins, args.tag)
    if left:
        print(f"gpu_wheels: no wheel for {', '.join(left)} (Python {args.python_version})", file=sys.stderr)
        return 2
    size = sum(w.stat().st_size for w in args.dest.glob("*.whl"))
    print(f"gpu_wheels: {args.dest}: {len(list(args.dest.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB "
          f"(Python {args.python_version}{', downloaded ' + ', '.join(todo) if todo else ', already there'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
