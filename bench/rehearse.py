"""Rehearse one call to a borrowed GPU node on this CPU, under the node's rules, so that a command
fails here where it would fail there (and the node's few minutes are not spent finding out).

The rules reproduced:
- python3 is a venv made from a venv, holding the node image's packages only (torch, h5py, numpy,
  pyyaml, pytest, ...: IMAGE below, linked from this Python's environment) and no package registry
  (pip config ignored, PIP_NO_INDEX, no network where `unshare -n` works). What else a command needs
  must travel as wheels and be installed with `pip install --no-index --no-deps --target`.
- What travels: the repository's tracked and untracked-but-not-ignored files plus the --carry paths,
  64 MiB in all; more is refused before anything runs (exit 3).
- A time limit per call (at most 600 s): TERM, then KILL 5 s later; rc 124 or 137.
- $OUT starts empty; back come at most 8 plain files, 16 MiB each, 64 MiB together, at most 2
  folders deep, named in letters, digits, '.', '_' and '-'; the rest is listed as left out (exit 1).
- Between calls a warm node keeps what a command wrote outside the travelling files (ignored
  folders, /tmp): --state keeps it too; --cold starts from a bare node.

    python bench/rehearse.py --carry .gpu-wheels=/tmp/w311 -- bash bench/gpu_check.sh --cpu
    python bench/rehearse.py --carry .dali-carry -- python3 bench/dali_parts.py receive

--carry DEST[=SRC]: the ignored path DEST travels (SRC, default DEST, from this machine: here the
wheels are for this Python, on the node for its 3.12). The report (JSON: rc, timed_out, wall_s,
travelled_mib, files, files_left_out) is the last line of stdout and STATE/report.json; returned
files are copied to STATE/back. Exit: the command's success and every file back (0), else 1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
TRAVEL_LIMIT, FILE_LIMIT, BACK_LIMIT, MAX_FILES, MAX_FOLDERS = 64 * MIB, 16 * MIB, 64 * MIB, 8, 2
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
# The node image's Python packages (read on such a node, 2026-11-17); hpc's hdf5plugin, numcodecs,
# submitit, wandb and DALI are not among them.
IMAGE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp""".split())


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_links(links: Path) -> int:
    """Link the top-level files of this environment's IMAGE distributions into ``links``."""
    site = Path(sysconfig.get_paths()["purelib"])
    n = 0
    for info in site.glob("*.dist-info"):
        meta = (info / "METADATA").read_text(errors="replace") if (info / "METADATA").is_file() else ""
        name = next((line[5:].strip() for line in meta.splitlines() if line.startswith("Name:")), "")
        if _norm(name) not in IMAGE or not (info / "RECORD").is_file():
            continue
        tops = {line.split(",")[0].split("/")[0] for line in (info / "RECORD").read_text().splitlines()}
        for top in tops - {""}:
            if top.startswith("..") or top.endswith(".pth") or not (site / top).exists():
                continue  # scripts outside site-packages; .pth hooks (an editable install's)
            if not (links / top).exists():
                (links / top).symlink_to(site / top)
        n += 1
    return n


def build_image(state: Path) -> Path:
    """STATE/image: a venv made from this (venv) Python whose site holds only the image's packages;
    its bin/python3 plays the node's python3. Built once per state folder."""
    image = state / "image"
    py = image / "bin" / "python3"
    if py.exists():
        return py
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(image)], check=True)
    links = state / "image-site"
    links.mkdir(exist_ok=True)
    if image_links(links) == 0:
        raise SystemExit(f"rehearse: no package of the node image found in {sysconfig.get_paths()['purelib']}")
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "node_image.pth").write_text(f"import site; site.addsitedir({str(links)!r})\n")
    return py


def travelling(carry: list[tuple[str, Path]]) -> tuple[list[tuple[str, Path]], int, int]:
    """(relative path, source) of every file that travels; bytes of the tree and of the carry."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"], check=True,
                            capture_output=True).stdout.decode().split("\0")
    dests = [d for d, _ in carry]
    files = [(rel, ROOT / rel) for rel in listed if rel and os.path.lexists(ROOT / rel)
             and not any(rel == d or rel.startswith(d + "/") for d in dests)]
    tree = sum((ROOT / rel).lstat().st_size for rel, _ in files)
    carried = 0
    for dest, src in carry:
        found = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else []
        for p in found:
            files.append((dest if p == src else f"{dest}/{p.relative_to(src)}", p))
            carried += p.stat().st_size
    return files, tree, carried


def sync(repo: Path, files: list[tuple[str, Path]], carry: list[tuple[str, Path]]) -> None:
    """Copy what travels over the node's copy; carried paths are replaced whole (removed when absent)."""
    for dest, _ in carry:
        target = repo / dest
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif os.path.lexists(target):
            target.unlink()
    for rel, src in files:
        target = repo / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(target) and (target.is_symlink() or src.is_symlink()):
            target.unlink()
        shutil.copy2(src, target, follow_symlinks=False)


def returned(out: Path) -> tuple[list[str], list[str]]:
    """What comes back from $OUT (paths relative to it) and 'PATH (why)' for what does not."""
    back, left, total = [], [], 0
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if path.is_dir() and not path.is_symlink():
            if not NAME.match(path.name):
                left.append(f"{rel} (a name with odd characters)")
            continue
        why = ("a link" if path.is_symlink() else "not a plain file" if not path.is_file()
               else "a name with odd characters" if not all(NAME.match(p) for p in rel.parts)
               else "a folder too deep" if len(rel.parts) - 1 > MAX_FOLDERS
               else "over 16 MiB" if path.stat().st_size > FILE_LIMIT
               else "over 8 files" if len(back) >= MAX_FILES
               else "over 64 MiB together" if total + path.stat().st_size > BACK_LIMIT else "")
        if why:
            left.append(f"{rel} ({why})")
        else:
            back.append(str(rel))
            total += path.stat().st_size
    return back, left


def node_env(state: Path, py: Path, out: Path) -> dict[str, str]:
    """A bare environment like the node's: its python3 first on PATH, no pip configuration or index."""
    env = {"PATH": f"{py.parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": str(state / "home"), "TMPDIR": str(state / "tmp"), "OUT": str(out), "LANG": "C.UTF-8",
           "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for key in ("OMP_NUM_THREADS", "TERM"):  # the CPU's share of cores; not the node's business otherwise
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def no_network() -> list[str]:
    """`unshare -n` where it works (root): nothing outside can be reached, as on the node; its
    loopback is brought up, as the node's is (a local TCP store must still work)."""
    ok = shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up 2>/dev/null; exec "$@"', "sh"] if ok else []


def run(args: argparse.Namespace) -> dict:
    state = args.state
    if args.cold:
        for name in ("repo", "tmp", "home"):
            shutil.rmtree(state / name, ignore_errors=True)
    files, tree, carried = travelling(args.carry)
    report = {"travelled_mib": round((tree + carried) / MIB, 2), "tree_mib": round(tree / MIB, 2),
              "carried_mib": round(carried / MIB, 2), "limit_s": args.timeout}
    if tree + carried > TRAVEL_LIMIT:
        report["refused"] = f"the working tree is larger than 64 MiB ({(tree + carried) / MIB:.1f} MiB)"
        return report
    py = build_image(state)
    repo, out, back = state / "repo", state / "out", state / "back"
    for d in (out, back):
        shutil.rmtree(d, ignore_errors=True)
    for d in (repo, out, back, state / "tmp", state / "home"):
        d.mkdir(parents=True, exist_ok=True)
    sync(repo, files, args.carry)
    t0 = time.monotonic()
    with open(state / "output.log", "wb") as log:
        rc = subprocess.run([*no_network(), "timeout", "--kill-after=5", str(args.timeout), "bash", "-c", args.cmd],
                            cwd=repo, env=node_env(state, py, out), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True).returncode
    report |= {"rc": rc, "timed_out": rc in (124, 137), "wall_s": round(time.monotonic() - t0, 1)}
    report["files"], report["files_left_out"] = returned(out)
    for rel in report["files"]:
        (back / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / rel, back / rel)
    report["output_tail"] = (state / "output.log").read_bytes()[-12000:].decode(errors="replace")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "hpc-rehearsal",
                    help="the rehearsal node's folder (kept between calls, like a warm node)")
    ap.add_argument("--carry", action="append", default=[], metavar="DEST[=SRC]", help="an ignored path that travels")
    ap.add_argument("--timeout", type=int, default=600, help="the call's limit in seconds (1-600)")
    ap.add_argument("--cold", action="store_true", help="a bare node: forget what earlier calls left")
    ap.add_argument("cmd", nargs="+", help="the command (after --), run by bash in the node's copy")
    args = ap.parse_args(argv)
    if not 1 <= args.timeout <= 600:
        ap.error(f"--timeout: 1 to 600 seconds, got {args.timeout}")
    carry = []
    for spec in args.carry:
        dest, _, src = spec.partition("=")
        if not dest or dest.startswith("/") or ".." in Path(dest).parts:
            ap.error(f"--carry: DEST must be a path inside the repository, got {dest!r}")
        carry.append((dest.rstrip("/"), Path(src) if src else ROOT / dest))
    args.carry, args.cmd = carry, " ".join(args.cmd)
    args.state = args.state.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.state.mkdir(parents=True, exist_ok=True)
    report = run(args)
    (args.state / "report.json").write_text(json.dumps(report, indent=1))
    if "refused" in report:
        print(f"rehearse: refused: {report['refused']}", file=sys.stderr)
        print(json.dumps(report))
        return 3
    sys.stdout.write(report["output_tail"])
    print(f"\nrehearse: rc={report['rc']} in {report['wall_s']} s (limit {args.timeout} s); travelled "
          f"{report['travelled_mib']} MiB (carried {report['carried_mib']}); back: {', '.join(report['files']) or '-'}"
          + (f"; LEFT OUT: {', '.join(report['files_left_out'])}" if report["files_left_out"] else ""))
    print(json.dumps({k: v for k, v in report.items() if k != "output_tail"}))
    return 0 if report["rc"] == 0 and not report["files_left_out"] else 1


if __name__ == "__main__":
    sys.exit(main())
